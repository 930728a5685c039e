"""MNIST from torchvision's layout: ROOT/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from vdsh.data.imageset import ImageSet
from vdsh.data.info import DatasetInfo
from vdsh.data.paths import DatasetNotFoundError

CLASSES = [str(d) for d in range(10)]
INFO = DatasetInfo("mnist", 1, 28, tuple(CLASSES), "digits",
                   "70,000 handwritten digits (60,000 training then 10,000 test); an item's source mnist:N is its "
                   "position N in that order", pixel_stats=((0.1307,), (0.3081,)))  # the usual MNIST mean and std
_PREFIX = {"train": "train", "test": "t10k"}


def _find(raw: Path, stem: str) -> Path:
    for candidate in (raw / stem, raw / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DatasetNotFoundError(
        f"MNIST file {stem}[.gz] not found in {raw}. Put the four MNIST files in ROOT/MNIST/raw/ "
        f"(set --data-root or $VDSH_DATA to ROOT), or pass download=True to fetch them."
    )


def _read_idx(path: Path, magic: int, shape_dims: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DatasetNotFoundError(f"{path} is corrupt or truncated ({exc}); replace it with the original file") from exc
    header = np.frombuffer(data[: 4 * (1 + shape_dims)], dtype=">u4")
    if len(header) != 1 + shape_dims or header[0] != magic:
        raise DatasetNotFoundError(f"{path} is not an MNIST IDX file (magic {header[:1]}, expected {magic})")
    shape = tuple(int(d) for d in header[1:])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 * (1 + shape_dims))
    if body.size != int(np.prod(shape)):
        raise DatasetNotFoundError(f"{path} is truncated: {body.size} bytes of data, expected {int(np.prod(shape))}")
    return body.reshape(shape)


def read_mnist_split(raw: Path, split: str, name: str = "mnist") -> ImageSet:
    """Read one official split ('train' or 't10k' files) from a folder of IDX files."""
    prefix = _PREFIX[split]
    images = _read_idx(_find(raw, f"{prefix}-images-idx3-ubyte"), 2051, 3)
    targets = _read_idx(_find(raw, f"{prefix}-labels-idx1-ubyte"), 2049, 1)
    if len(images) != len(targets):
        raise DatasetNotFoundError(f"MNIST {split} in {raw}: {len(images)} images but {len(targets)} labels")
    labels = np.zeros((len(targets), 10), dtype=np.uint8)
    labels[np.arange(len(targets)), targets] = 1
    return ImageSet(name, images[:, None].copy(), labels, CLASSES)


def download_mnist(root: Path) -> None:
    """Fetch the official files with torchvision (online users only; never used by tests)."""
    from torchvision.datasets import MNIST

    MNIST(str(root), train=True, download=True)
    MNIST(str(root), train=False, download=True)


def load_mnist(root: Path, split: str = "all", download: bool = False) -> ImageSet:
    """MNIST as an ImageSet; 'all' is the 60,000 training images followed by the 10,000 test images."""
    raw = root / "MNIST" / "raw"
    if download:
        download_mnist(root)
    if split == "all":
        return ImageSet.concat("mnist", [read_mnist_split(raw, "train"), read_mnist_split(raw, "test")])
    if split not in _PREFIX:
        raise ValueError(f"MNIST split must be 'train', 'test' or 'all', got {split!r}")
    return read_mnist_split(raw, split)
