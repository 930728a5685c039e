"""`load(name, root, split)`: one entry point for every dataset vdsh reads."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from dataclasses import replace

from vdsh.data import cifar10, folder, mnist, nuswide
from vdsh.data.cifar10 import load_cifar10
from vdsh.data.folder import load_folder
from vdsh.data.imageset import ImageSet
from vdsh.data.info import DatasetInfo
from vdsh.data.mnist import load_mnist, read_mnist_split
from vdsh.data.nuswide import load_nuswide
from vdsh.data.paths import data_root

DATASETS = ("mnist", "cifar10", "nuswide", "mnist-sample", "folder:<path>")
SAMPLE_INFO = replace(mnist.INFO, name="mnist-sample",
                      description="the official MNIST test set (10,000 digits), embedded in the package; an item's "
                                  "source mnist-sample:N is its position N")
INFOS = {info.name: info for info in (mnist.INFO, cifar10.INFO, nuswide.INFO, SAMPLE_INFO)}


def dataset_info(name: str) -> DatasetInfo:
    """The facts of a dataset by name ('folder:<path>' gives the folder's, whatever the path)."""
    if name.startswith("folder:"):
        return folder.INFO
    if name not in INFOS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return INFOS[name]


def load_sample() -> ImageSet:
    """The official MNIST test set (10,000 digits), shipped inside the package for offline quick starts."""
    with resources.as_file(resources.files("vdsh.data") / "sample") as folder:
        imageset = read_mnist_split(Path(folder), "test", name="mnist-sample")
    return imageset


def load(name: str, root: str | Path | None = None, split: str = "all", download: bool = False,
         channels: int | None = None, size: int | None = None) -> ImageSet:
    """Images and multi-hot labels of a dataset split.

    name: 'mnist', 'cifar10', 'nuswide', 'mnist-sample' (embedded, needs no root) or 'folder:<path>'.
    split: 'train', 'test' or 'all' (train followed by test); NUS-WIDE also 'database'.
    channels, size: the decoded shape for folders and NUS-WIDE (None: the images' own for folders, 3 x 64
    for NUS-WIDE); for fixed-shape datasets only checked, before anything is read.
    """
    dataset_info(name).check_shape(channels, size)
    if name == "mnist-sample":
        if split not in ("all", "test"):
            raise ValueError("mnist-sample is the 10,000 MNIST test images: its only split is 'all'")
        return load_sample()
    if name.startswith("folder:"):
        return load_folder(Path(name.removeprefix("folder:")).expanduser(), channels, size)
    base = data_root(root)
    if name in ("mnist", "cifar10"):
        imageset = (load_mnist if name == "mnist" else load_cifar10)(base, split, download)
        if split != "all":  # positions within the split, and the source says which split: mnist:test:17
            imageset.sources = [f"{name}:{split}:{i}" for i in range(len(imageset))]
        return imageset
    if name == "nuswide":
        return load_nuswide(base, split, channels or 3, size or 64)
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
