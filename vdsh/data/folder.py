"""Any folder of images with one sub-folder per class: ROOT/<class>/<image>."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vdsh.data.cache import cached_imageset, fingerprint
from vdsh.data.imageset import ImageSet
from vdsh.data.paths import DatasetNotFoundError
from vdsh.data.transforms import ImageDecodeError, load_image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def decode_images(paths: list[Path], channels: int, size: int) -> np.ndarray:
    """Decode every image; a bad file stops the load with its path, rather than silently vanishing."""
    images = np.empty((len(paths), channels, size, size), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            images[i] = load_image(path, channels, size)
        except ImageDecodeError as exc:
            raise DatasetNotFoundError(f"cannot use {path}: {exc}. Remove or replace the file.") from exc
    return images


def load_folder(folder: Path, channels: int = 3, size: int = 64) -> ImageSet:
    """Every image under folder/<class>/, classes in sorted order; decoded once, then cached."""
    if not folder.is_dir():
        raise DatasetNotFoundError(f"image folder {folder} does not exist (expected {folder}/<class>/<image files>)")
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir())
    files = [(f, c) for c, d in enumerate(class_dirs) for f in sorted(d.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DatasetNotFoundError(f"no images found in {folder}: expected {folder}/<class>/<image files> ({sorted(IMAGE_SUFFIXES)})")
    paths = [f for f, _ in files]

    def build() -> ImageSet:
        labels = np.zeros((len(files), len(class_dirs)), dtype=np.uint8)
        labels[np.arange(len(files)), [c for _, c in files]] = 1
        return ImageSet(f"folder:{folder}", decode_images(paths, channels, size), labels,
                        [d.name for d in class_dirs], [str(p) for p in paths])

    return cached_imageset("folder-" + fingerprint(paths, channels=channels, size=size), build)
