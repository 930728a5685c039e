"""CIFAR-10 from the python pickles in ROOT/cifar-10-batches-py/.

Read directly rather than through torchvision, which checks the original files' md5s: copies rebuilt
losslessly (e.g. without the `filenames` key) are refused there but are the same images.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from vdsh.data.imageset import ImageSet
from vdsh.data.info import DatasetInfo
from vdsh.data.paths import DatasetNotFoundError

FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCHES = ["test_batch"]
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
INFO = DatasetInfo("cifar10", 3, 32, CLASSES, "photos",
                   "60,000 colour photos (50,000 training then 10,000 test); an item's source cifar10:N is its "
                   "position N in that order", features="gist")  # GIST: the input of VDSH's and SDH's CIFAR-10 figures


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise DatasetNotFoundError(
            f"CIFAR-10 batch {path.name} not found in {path.parent}. Put the python version of CIFAR-10 "
            f"in ROOT/{FOLDER}/ (set --data-root or $VDSH_DATA to ROOT), or pass download=True to fetch it."
        )
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise DatasetNotFoundError(f"{path} is corrupt or truncated ({exc}); replace it with the original batch") from exc


def _read_batches(folder: Path, names: list[str]) -> ImageSet:
    meta = _unpickle(folder / "batches.meta")
    class_names = list(meta["label_names"])
    images, targets = [], []
    for name in names:
        batch = _unpickle(folder / name)
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise DatasetNotFoundError(f"{folder / name}: expected data of shape (n, 3072), got {data.shape}")
        images.append(data.reshape(-1, 3, 32, 32))
        targets.append(np.asarray(batch["labels"], dtype=np.int64))
    target = np.concatenate(targets)
    labels = np.zeros((len(target), len(class_names)), dtype=np.uint8)
    labels[np.arange(len(target)), target] = 1
    return ImageSet("cifar10", np.concatenate(images), labels, class_names)


def download_cifar10(root: Path) -> None:
    """Fetch and extract the official archive with torchvision (online users only; never used by tests)."""
    from torchvision.datasets import CIFAR10

    CIFAR10(str(root), train=True, download=True)


def load_cifar10(root: Path, split: str = "all", download: bool = False) -> ImageSet:
    """CIFAR-10 as an ImageSet; 'all' is the 50,000 training images followed by the 10,000 test images."""
    if download:
        download_cifar10(root)
    batches = {"train": TRAIN_BATCHES, "test": TEST_BATCHES, "all": TRAIN_BATCHES + TEST_BATCHES}
    if split not in batches:
        raise ValueError(f"CIFAR-10 split must be 'train', 'test' or 'all', got {split!r}")
    return _read_batches(root / FOLDER, batches[split])
