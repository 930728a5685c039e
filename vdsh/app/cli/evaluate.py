"""`vdsh eval`: score query codes against database codes, from code files or a trained model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import typer
from rich.console import Console

from vdsh.app.items import ScoredPart, codes_from_model
from vdsh.app.runs import print_report
from vdsh.app.cli.protocol_options import (CHANNELS, IMAGE_SIZE, PROTOCOL_HELP, QUERIES_PER_CLASS, TRAIN_PER_CLASS,
                                       model_shape, protocol_options, run_protocol)
from vdsh.files import atomic_write_text
from vdsh.index.codes import load_codes, save_codes
from vdsh.index.metrics import retrieval_metrics
from vdsh.progress import note

console = Console()






def save_scored_codes(folder: Path, query: ScoredPart, database: ScoredPart, class_names: list[str], suffix: str) -> list[Path]:
    """query.<suffix> and database.<suffix>: packed codes, bits, labels, ids (pool positions), class names."""
    paths = [folder / f"query{suffix}", folder / f"database{suffix}"]
    for path, part in zip(paths, (query, database)):
        save_codes(path, part.codes, part.ids, class_names)
    return paths




def evaluate(
    query: Path = typer.Option(None, help="Query codes file (.npz/.h5 with 'codes' and 'labels')."),
    database: Path = typer.Option(None, help="Database codes file (.npz/.h5)."),
    model: Path = typer.Option(None, help="A trained model: encode the protocol's queries and database with it."),
    protocol: str = typer.Option(None, help=f"For --model: {PROTOCOL_HELP}. Default: the split saved beside the model "
                                              "(its run folder's split.npz), else the protocol it records."),
    queries_per_class: int = QUERIES_PER_CLASS,
    train_per_class: str = TRAIN_PER_CLASS,
    image_size: int = IMAGE_SIZE,
    channels: int = CHANNELS,
    exclude: list[str] = typer.Option([], "--exclude", help="SPLIT:PART (e.g. runs/x/split.npz:train): leave those items "
                                                            "out of the database; repeatable"),
    data_root: Path = typer.Option(None, envvar="VDSH_DATA", help="Root of the datasets."),
    seed: int = typer.Option(0, help="Protocol seed (a saved split keeps its own)."),
    map_at: list[int] = typer.Option([], "--map-at", help="Also report mAP@k (e.g. 5000)."),
    save_codes_to: Path = typer.Option(None, "--save-codes", help="With --model: write the scored codes to this folder "
                                       "(query and database files: packed codes, bits, labels, ids, class names)."),
    codes_format: str = typer.Option("npz", "--codes-format", help="npz or h5, for --save-codes"),
    out: Path = typer.Option(Path("runs/eval"), help="Folder for metrics.json and pr_curve.png."),
) -> None:
    """Print mAP@all, mAP@k, P@k and P@H<=2, and write metrics.json and a PR-curve PNG."""
    from vdsh.app.plots import plot_pr_curves

    if codes_format not in ("npz", "h5"):
        raise typer.BadParameter(f"--codes-format must be npz or h5, got {codes_format!r}")
    if model is not None:
        if protocol is None and run_protocol(model) is None:
            protocol, seed = recorded_protocol(model)
        protocol = protocol or run_protocol(model)
        data = {**protocol_options(queries_per_class, train_per_class, None, None), **model_shape(model, channels, image_size)}
        try:
            query_part, db_part, class_names = codes_from_model(model, protocol, data_root, seed, data, exclude)
        except ValueError as exc:  # e.g. --exclude leaves nothing: a usage error
            raise typer.BadParameter(str(exc)) from None
        query_set, db_set = query_part.codes, db_part.codes
        title = f"{model.name} on {getattr(protocol, 'name', protocol)}"
        if save_codes_to is not None:
            written = save_scored_codes(save_codes_to, query_part, db_part, class_names, f".{codes_format}")
            console.print(f"wrote {', '.join(map(str, written))}")
    elif query is not None and database is not None:
        if save_codes_to is not None or exclude:
            raise typer.BadParameter("--save-codes and --exclude need --model (code files are already codes)")
        query_set, db_set = load_codes(query), load_codes(database)
        title = f"{query.name} vs {database.name}"
    else:
        raise typer.BadParameter("give --query and --database code files, or --model")
    if query_set.bits != db_set.bits:
        raise typer.BadParameter(f"query codes have {query_set.bits} bits, database codes {db_set.bits}")
    n_db = len(db_set.packed)
    precision_at = tuple(k for k in (100, 500, 1000) if k <= n_db)
    note(f"scoring {len(query_set.packed)} queries against {n_db} items ({query_set.bits} bits)")
    report = retrieval_metrics(query_set.codes, query_set.labels, db_set.codes, db_set.labels,
                               map_at=tuple(map_at), precision_at=precision_at)
    print_report(report, f"{title}: {report.n_query} queries x {report.n_database} items, {report.bits} bits")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metrics.json", json.dumps(report.to_dict(), indent=2))
    plot_pr_curves({f"{report.bits} bits": report.to_dict()["pr_curve"]}, out / "pr_curve.png")
    console.print(f"wrote {out / 'metrics.json'} and {out / 'pr_curve.png'}")


def recorded_protocol(model: Path):
    """(protocol, seed) a model file records, for models moved away from their run folder: the spec that redraws
    its split when recorded (user protocols), else the protocol's name."""
    from vdsh.data.protocols import ProtocolSpec
    from vdsh.training.encoders.model import read_model_metadata

    info = read_model_metadata(model)["info"]
    if info.get("protocol_spec"):
        return ProtocolSpec.from_dict(info["protocol_spec"]), int(info.get("seed", 0))
    if info.get("protocol") is None:
        raise typer.BadParameter(f"{model} records no protocol and has no split.npz beside it: pass --protocol")
    return info["protocol"], int(info.get("seed", 0))


def encode_command(
    images: list[Path] = typer.Argument(..., exists=True, dir_okay=False, help="image files (JPEG, PNG, WebP...)"),
    model: Path = typer.Option(..., "--model", exists=True, dir_okay=False, help="a trained model (.safetensors)"),
    out: Path = typer.Option(None, "--out", help="write the codes to this .npz or .h5 file (packed codes, bits, "
                                                 "sources) instead of printing them"),
    bits_format: bool = typer.Option(False, "--bits", help="print codes as 0/1 strings rather than hex"),
) -> None:
    """The hash code of each image: printed as `<hex code>  <file>` (the form POST /search takes), or written to a file."""
    from vdsh.app.server.uploads import code_hex
    from vdsh.data.transforms import load_image
    from vdsh.index.codes import pack_codes
    from vdsh.training.encoders.model import load_model

    hashing_model = load_model(model)
    spec = hashing_model.input_spec
    pixels = np.stack([load_image(path, spec.channels, spec.size) for path in images])
    packed = pack_codes(hashing_model.encode(pixels))
    if out is not None:
        write_codes(out, packed, hashing_model.bits, [str(p) for p in images])
        typer.echo(f"wrote {len(images)} codes of {hashing_model.bits} bits to {out}")
        return
    for path, row in zip(images, packed):
        code = "".join(str(b) for b in np.unpackbits(row)[: hashing_model.bits]) if bits_format else code_hex(row)
        typer.echo(f"{code}  {path}")


def write_codes(path: Path, packed: np.ndarray, bits: int, sources: list[str]) -> None:
    """Codes of unlabelled images: packed codes, bits and each image's path, in .npz or .h5 (atomic)."""
    from vdsh.files import atomic_path

    suffix = path.suffix.lower()
    if suffix not in (".npz", ".h5", ".hdf5"):
        raise typer.BadParameter(f"--out must end in .npz or .h5, got {path.name}")
    with atomic_path(path) as tmp:
        if suffix == ".npz":
            with open(tmp, "wb") as f:
                np.savez(f, codes=packed, bits=np.int64(bits), sources=np.asarray(sources, dtype=str))
        else:
            import h5py

            with h5py.File(tmp, "w") as f:
                f.create_dataset("codes", data=packed)
                f.create_dataset("sources", data=np.asarray(sources, dtype=object), dtype=h5py.string_dtype())
                f.attrs["bits"] = bits
