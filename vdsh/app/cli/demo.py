"""`vdsh demo`: the whole pipeline on the embedded MNIST sample, offline, on a CPU, in a few minutes.

train (VDSH's ADMM on a deep plain MLP) -> evaluate on the protocol -> build a Hamming index of the
database -> query it with held-out images written as PNG files, as a user would.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import typer
from PIL import Image

PROTOCOL = "mnist-sample"


def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Folder for the model, index, metrics and plots."),
    trainer: str = typer.Option("admm", help="admm (VDSH's ADMM), proxprop or backprop."),
    depth: int = typer.Option(8, help="Hidden layers of the plain ReLU MLP."),
    width: int = typer.Option(256, help="Units per hidden layer."),
    bits: int = typer.Option(48, help="Code length."),
    iterations: int = typer.Option(None, help="ADMM/ProxProp sweeps or back-prop epochs (default: the trainer's own)."),
) -> None:
    """Train, evaluate, index and query on the embedded MNIST sample (no data root, no GPU, no download)."""
    from vdsh.app.items import build_index, codes_from_model, load_items
    from vdsh.app.runs import print_report, save_run
    from vdsh.app.plots import plot_pr_curves
    from vdsh.training.run import RunConfig, run
    from vdsh.index.codes import pack_codes
    from vdsh.index.metrics import retrieval_metrics
    from vdsh.training.encoders.model import load_model

    out.mkdir(parents=True, exist_ok=True)
    model_path = out / "model.safetensors"
    typer.echo(f"1/4 training a plain {depth} x {width} ReLU MLP with {trainer} on {PROTOCOL} (5,000 images)")
    default_iterations = {"admm": 10, "proxprop": 10, "backprop": 10}[trainer]
    save_run(out, run(RunConfig(PROTOCOL, trainer, bits, depth=depth, width=width, iterations=iterations or default_iterations)))

    typer.echo("2/4 evaluating: 1,000 queries against the 9,000-image database")
    query_part, db_part, _ = codes_from_model(model_path, PROTOCOL, None, 0)
    query_set, db_set = query_part.codes, db_part.codes
    report = retrieval_metrics(query_set.codes, query_set.labels, db_set.codes, db_set.labels)
    print_report(report, f"{trainer}, {depth} x {width}, {bits} bits on {PROTOCOL}")
    (out / "metrics.json").write_text(json.dumps(report.to_dict(), indent=2))
    plot_pr_curves({f"{trainer} {bits} bits": report.to_dict()["pr_curve"]}, out / "pr_curve.png")

    typer.echo("3/4 building a Hamming index of the database")
    pool, database = load_items(None, "all", PROTOCOL, "database", None)
    index = build_index(model_path, pool, "flat", out / "index", device="cpu", ids=database)

    typer.echo("4/4 querying the index with three held-out digits, read back from PNG files")
    model = load_model(model_path)
    _, queries = load_items(None, "all", PROTOCOL, "query", None)
    from vdsh.data.transforms import load_image

    for n, position in enumerate(queries[:3]):
        path = out / f"query_{n}.png"
        Image.fromarray(np.asarray(pool.images[position, 0])).save(path)
        code = model.encode(load_image(path, channels=1, size=28)[None])
        ids, dists = index.search(pack_codes(code), 5, device="cpu")
        found = [pool.class_names[np.flatnonzero(row)[0]] for row in index.labels_of(ids[0])]
        truth = pool.class_names[int(np.flatnonzero(pool.labels[position])[0])]
        typer.echo(f"  {path.name}: digit {truth} -> top 5 labels {found}, Hamming distances {dists[0].tolist()}")
    typer.echo(f"done. Serve it: vdsh serve --index {out / 'index'} --model {model_path}")
