"""Shared fixtures: the real data root, when this machine has one."""

import os
from pathlib import Path

import pytest
import torch


def real_data_root() -> Path | None:
    root = os.environ.get("VDSH_DATA")
    return Path(root) if root and (Path(root) / "MNIST" / "raw").is_dir() else None


@pytest.fixture
def data_root() -> Path:
    root = real_data_root()
    if root is None:
        pytest.skip("real datasets not available: set VDSH_DATA to a root holding MNIST/raw and cifar-10-batches-py")
    return root


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Keep each test session's dataset cache out of the user's home."""
    monkeypatch.setenv("VDSH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def mnist_sample_features():
    """Pixels (normalised) and multi-hot labels of 1,000 training images (every 5th) of the embedded MNIST sample."""
    from vdsh.data.protocols import load_protocol
    from vdsh.training.encoders.model import InputSpec

    images, split = load_protocol("mnist-sample")
    idx = split.train[::5]
    x = InputSpec(1, 28, "pixels", [0.1307], [0.3081]).prepare(images.images[idx])
    return x, torch.as_tensor(images.labels[idx]).float()


@pytest.fixture
def one_thread():
    """A small net gains nothing from a second thread, and spinning threads stall on a shared 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
