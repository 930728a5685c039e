"""Where datasets and caches live, and the error a missing dataset raises."""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "VDSH_DATA"
CACHE_ENV = "VDSH_CACHE"


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing or unreadable; the message names the path and the fix."""


def data_root(root: str | Path | None = None) -> Path:
    """The data root: the argument, else $VDSH_DATA, else ~/.vdsh/data."""
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    return Path.home() / ".vdsh" / "data"


def cache_dir() -> Path:
    """Writable cache for decoded datasets and features: $VDSH_CACHE, else ~/.cache/vdsh.

    Never inside the data root, which may be read-only.
    """
    path = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "vdsh").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path
