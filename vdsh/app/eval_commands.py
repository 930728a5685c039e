"""`vdsh eval`: score query codes against database codes, from code files or a trained model."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from vdsh.index.codes import CodeSet, load_codes
from vdsh.index.metrics import RetrievalReport, retrieval_metrics

console = Console()


def codes_from_model(model_path: Path, protocol: str, data_root: Path | None, seed: int) -> tuple[CodeSet, CodeSet]:
    """Encode the protocol's queries and database with a trained model."""
    from vdsh.data import load_protocol
    from vdsh.training.model import load_model

    model = load_model(model_path)
    pool, split = load_protocol(protocol, data_root, seed)
    encode = lambda idx: CodeSet.from_codes(model.encode(pool.images[idx]), pool.labels[idx])  # noqa: E731
    return encode(split.query), encode(split.database)


def print_report(report: RetrievalReport, title: str) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in report.rows():
        table.add_row(name, f"{value:.4f}")
    console.print(table)


def evaluate(
    query: Path = typer.Option(None, help="Query codes file (.npz/.h5 with 'codes' and 'labels')."),
    database: Path = typer.Option(None, help="Database codes file (.npz/.h5)."),
    model: Path = typer.Option(None, help="A trained model: encode the protocol's queries and database with it."),
    protocol: str = typer.Option(None, help="Protocol for --model (e.g. mnist-5k); defaults to the one it was trained on."),
    data_root: Path = typer.Option(None, envvar="VDSH_DATA", help="Root of the datasets."),
    seed: int = typer.Option(0, help="Protocol seed."),
    map_at: list[int] = typer.Option([], "--map-at", help="Also report mAP@k (e.g. 5000)."),
    out: Path = typer.Option(Path("runs/eval"), help="Folder for metrics.json and pr_curve.png."),
) -> None:
    """Print mAP@all, mAP@k, P@k and P@H<=2, and write metrics.json and a PR-curve PNG."""
    from vdsh.app.plots import plot_pr_curves

    if model is not None:
        if protocol is None:
            from vdsh.training.model import read_model_metadata

            protocol = read_model_metadata(model)["info"].get("protocol")
            if protocol is None:
                raise typer.BadParameter("this model records no protocol: pass --protocol")
        query_set, db_set = codes_from_model(model, protocol, data_root, seed)
        title = f"{model.name} on {protocol}"
    elif query is not None and database is not None:
        query_set, db_set = load_codes(query), load_codes(database)
        title = f"{query.name} vs {database.name}"
    else:
        raise typer.BadParameter("give --query and --database code files, or --model")
    if query_set.bits != db_set.bits:
        raise typer.BadParameter(f"query codes have {query_set.bits} bits, database codes {db_set.bits}")
    n_db = len(db_set.packed)
    precision_at = tuple(k for k in (100, 500, 1000) if k <= n_db)
    report = retrieval_metrics(query_set.codes, query_set.labels, db_set.codes, db_set.labels,
                               map_at=tuple(map_at), precision_at=precision_at)
    print_report(report, f"{title}: {report.n_query} queries x {report.n_database} items, {report.bits} bits")
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report.to_dict(), indent=2))
    plot_pr_curves({f"{report.bits} bits": report.to_dict()["pr_curve"]}, out / "pr_curve.png")
    console.print(f"wrote {out / 'metrics.json'} and {out / 'pr_curve.png'}")
