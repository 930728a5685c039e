"""Decoded datasets cached as .npy files, so the second run starts in seconds."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from vdsh.data.imageset import ImageSet
from vdsh.data.paths import cache_dir
from vdsh.files import atomic_path, atomic_write_text


def fingerprint(files: list[Path], **params: object) -> str:
    """A key that changes when any source file (path, size, mtime) or parameter changes."""
    h = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode())
    for f in sorted(files):
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _atomic_save(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def images_fingerprint(images: np.ndarray, salt: str) -> str:
    """Content hash of an image array (shape + bytes + `salt`, which names what is computed from it)."""
    h = hashlib.sha256(str(images.shape).encode() + salt.encode())
    h.update(np.ascontiguousarray(images).data)
    return h.hexdigest()[:16]


def cached_array(path: Path, build: Callable[[], np.ndarray]) -> np.ndarray:
    """The array stored at `path` (.npy), built and written atomically on a miss: computed features."""
    if path.is_file():
        return np.load(path)
    array = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save(path, array)
    return array


def cached_imageset(key: str, build: Callable[[], ImageSet]) -> ImageSet:
    """Return the cached ImageSet for `key`, building and storing it on a miss.

    A build or write that fails (a bad image, a full disk, Ctrl-C) removes the entry's folder: no
    half-written cache is left behind to fill the disk.
    """
    folder = cache_dir() / "datasets" / key
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        sources = meta["sources"]
        return ImageSet(
            meta["name"],
            np.load(folder / "images.npy", mmap_mode="r"),
            np.load(folder / "labels.npy"),
            meta["class_names"],
            sources,
        )
    try:
        imageset = build()
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_save(folder / "images.npy", imageset.images)
        _atomic_save(folder / "labels.npy", imageset.labels)
        meta = {"name": imageset.name, "class_names": imageset.class_names, "sources": imageset.sources}
        atomic_write_text(meta_path, json.dumps(meta))  # written last: its presence means the entry is complete
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return imageset
