"""The `vdsh` command line: one typer app, one sub-command per job."""

from __future__ import annotations

import os

import typer

from vdsh.app.bench.commands import bench
from vdsh.app.bench.cnn import bench_cnn, bench_cnn_train
from vdsh.app.bench.features import bench_features, bench_int8
from vdsh.app.bench.methods import bench_methods
from vdsh.app.bench.milvus import bench_milvus
from vdsh.app.bench.parallel import bench_parallel
from vdsh.app.cli import index as index_commands
from vdsh.app.bench.train import bench_train
from vdsh.app.cli.train import train
from vdsh.app.cli.demo import demo
from vdsh.app.cli.evaluate import encode_command, evaluate

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Supervised deep hashing for image retrieval.")
app.command("demo")(demo)
app.command("train")(train)
app.command("eval")(evaluate)
app.command("encode")(encode_command)
bench.command("train")(bench_train)
app.add_typer(bench, name="bench")
bench.command("cnn")(bench_cnn)
bench.command("cnn-train")(bench_cnn_train)
app.add_typer(index_commands.index_app, name="index")
app.command("query")(index_commands.query_command)
app.command("serve")(index_commands.serve_command)
bench.command("methods")(bench_methods)
bench.command("features")(bench_features)
bench.command("int8")(bench_int8)
bench.command("milvus")(bench_milvus)
bench.command("parallel")(bench_parallel)


@app.callback()
def options(quiet: bool = typer.Option(False, "--quiet", "-q", envvar="VDSH_QUIET",
                                       help="no progress bars or notes (for scripts); results still print")) -> None:
    """Supervised deep hashing for image retrieval."""
    from vdsh.progress import set_quiet

    set_quiet(quiet)


@app.command()
def version() -> None:
    """Print the vdsh version."""
    from vdsh import __version__

    typer.echo(__version__)


def main() -> None:
    """Run the CLI; bad input (missing files, wrong shapes, corrupt data) ends in one clear line, exit 2."""
    try:
        app()
    except (FileNotFoundError, ValueError) as exc:
        if os.environ.get("VDSH_DEBUG"):
            raise
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise SystemExit(2) from None
