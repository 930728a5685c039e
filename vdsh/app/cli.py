"""The `vdsh` command line: one typer app, one sub-command per job."""

from __future__ import annotations

import typer

from vdsh.app import index_commands

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Supervised deep hashing for image retrieval.")
app.add_typer(index_commands.index_app, name="index")
app.command("query")(index_commands.query_command)
app.command("serve")(index_commands.serve_command)


@app.command()
def version() -> None:
    """Print the vdsh version."""
    from vdsh import __version__

    typer.echo(__version__)


def main() -> None:
    app()
