"""Shared fixtures: the real data root, when this machine has one."""

import os
from pathlib import Path

import pytest


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
