"""The `vdsh` command line: one typer app, one sub-command per job."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Supervised deep hashing for image retrieval.")


@app.command()
def version() -> None:
    """Print the vdsh version."""
    from vdsh import __version__

    typer.echo(__version__)


def main() -> None:
    app()


from vdsh.app import train_commands  # noqa: E402

app.command("train")(train_commands.train)
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that write BENCHMARKS.md sections.")
bench_app.command("train")(train_commands.bench_train)
app.add_typer(bench_app, name="bench")
