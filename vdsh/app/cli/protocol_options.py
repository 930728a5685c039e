"""The command-line options that choose a protocol and an image shape, shared by train, eval, index build, bench.

One word for one thing: `--protocol` wherever a split (queries / training set / database) is meant,
`--dataset` wherever raw images are meant.
"""

from __future__ import annotations

from pathlib import Path

import typer

from vdsh.progress import note

PROTOCOL_HELP = ("a protocol of PROTOCOL.md (mnist-5k, cifar10-5k, ...), a dataset (folder:PATH, mnist, cifar10, "
                 "nuswide, mnist-sample) split by --queries-per-class / --train-per-class, or a saved split: a run "
                 "folder, its protocol.json or split.npz (reloaded exactly)")
QUERIES_PER_CLASS = typer.Option(None, "--queries-per-class", min=1,
                                 help="with --protocol DATASET: queries drawn per class (default: min(100, a tenth of the smallest class))")
TRAIN_PER_CLASS = typer.Option(None, "--train-per-class", "--train",
                               help="with --protocol DATASET: training images drawn per class from the database, or 'all' (default: all)")
IMAGE_SIZE = typer.Option(None, "--image-size", min=1,
                          help="decode folder images at SIZE x SIZE (default: the model's input, else the images' own size up to 64)")
CHANNELS = typer.Option(None, "--channels", min=1, max=3, help="decode folder images to 1 (grey) or 3 (RGB) channels (default: as --image-size)")
DEPRECATED_DATASET = typer.Option(None, "--dataset", hidden=True, help="deprecated spelling of --protocol here")


def protocol_options(queries_per_class: int | None, train_per_class: str | None, channels: int | None,
                     image_size: int | None) -> dict:
    """Keyword arguments of `vdsh.data.protocols.load_protocol` from the options above."""
    if train_per_class is not None and train_per_class != "all" and not train_per_class.isdigit():
        raise typer.BadParameter(f"--train-per-class takes a number or 'all', got {train_per_class!r}")
    return {"queries_per_class": queries_per_class, "train_per_class": train_per_class, "channels": channels,
            "size": image_size}


def chosen_protocol(protocol: str | None, deprecated_dataset: str | None, default: str | None = None) -> str | None:
    """--protocol, or the old `--dataset` spelling of it (with a deprecation note)."""
    if deprecated_dataset is not None:
        if protocol is not None:
            raise typer.BadParameter("give --protocol only (--dataset is its deprecated spelling here)")
        note(f"[yellow]--dataset is deprecated here: a split is a --protocol (use --protocol {deprecated_dataset})[/]")
        return deprecated_dataset
    return protocol if protocol is not None else default


def model_shape(model_path: Path, channels: int | None, image_size: int | None) -> dict:
    """channels/size that a model's input fixes; explicit options that disagree are refused before decoding."""
    from vdsh.training.encoders.model import read_model_metadata

    spec = read_model_metadata(model_path)["input"]
    for option, asked, takes in (("--channels", channels, spec["channels"]), ("--image-size", image_size, spec["size"])):
        if asked is not None and asked != takes:
            raise typer.BadParameter(f"{option} {asked}, but {model_path} takes {spec['channels']} x {spec['size']} x "
                                     f"{spec['size']} images: drop {option} (images are decoded at the model's input)")
    return {"channels": spec["channels"], "size": spec["size"]}


def run_protocol(model_path: Path) -> str | None:
    """The saved split beside a model (its run folder's split.npz), if there is one."""
    split = model_path.parent / "split.npz"
    return str(split) if split.is_file() else None
