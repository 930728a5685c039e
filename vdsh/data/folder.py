"""Any folder of images with one sub-folder per class: ROOT/<class>/<image>.

Class names are the sub-folder names (sorted); an item's source is its file path. Images are decoded
once at one shape (C x S x S: shorter side resized to S, centre crop) and cached. The shape is chosen
before anything is decoded: the caller's (a model's input), else the images' own, read from the file
headers of a sample: greyscale if every sampled image is, and their median shorter side up to MAX_SIZE.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vdsh.data.cache import cached_imageset, fingerprint
from vdsh.data.imageset import ImageSet
from vdsh.data.info import DatasetInfo
from vdsh.data.paths import DatasetNotFoundError
from vdsh.data.transforms import ImageDecodeError, load_image
from vdsh.progress import progress_bar

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MAX_SIZE = 64  # the largest side chosen from the images themselves; larger needs --image-size
SHAPE_SAMPLE = 200  # file headers read to choose the shape
GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}
INFO = DatasetInfo("folder", None, None, None, None,
                   "any folder with one sub-folder of images per class; an item's source is its file path")


def decode_images(paths: list[Path], channels: int, size: int) -> np.ndarray:
    """Decode every image; a bad file stops the load with its path, rather than silently vanishing."""
    images = np.empty((len(paths), channels, size, size), dtype=np.uint8)
    with progress_bar(f"decoding {len(paths)} images to {channels}x{size}x{size}", len(paths)) as advance:
        for i, path in enumerate(paths):
            try:
                images[i] = load_image(path, channels, size)
            except ImageDecodeError as exc:
                raise DatasetNotFoundError(f"cannot use {path}: {exc}. Remove or replace the file.") from exc
            advance()
    return images


def list_folder(folder: Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """(image paths, class index of each, class names) of folder/<class>/<image>, in sorted order."""
    if not folder.is_dir():
        raise DatasetNotFoundError(f"image folder {folder} does not exist (expected {folder}/<class>/<image files>)")
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir())
    files = [(f, c) for c, d in enumerate(class_dirs) for f in sorted(d.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DatasetNotFoundError(f"no images found in {folder}: expected {folder}/<class>/<image files> ({sorted(IMAGE_SUFFIXES)})")
    return [f for f, _ in files], np.array([c for _, c in files], dtype=np.int64), [d.name for d in class_dirs]


def own_shape(paths: list[Path], max_size: int = MAX_SIZE) -> tuple[int, int]:
    """(channels, size) that fit these images, from the headers of up to SHAPE_SAMPLE of them (no decoding)."""
    sample = [paths[i] for i in np.linspace(0, len(paths) - 1, min(len(paths), SHAPE_SAMPLE)).astype(int)]
    sides, grey = [], True
    for path in sample:
        try:
            with Image.open(path) as image:
                sides.append(min(image.size))
                grey = grey and image.mode in GREY_MODES
        except (OSError, ValueError) as exc:
            raise DatasetNotFoundError(f"cannot use {path}: not a readable image ({exc}). Remove or replace the file.") from exc
    return (1 if grey else 3), int(min(max_size, np.median(sides)))


def load_folder(folder: Path, channels: int | None = None, size: int | None = None) -> ImageSet:
    """Every image under folder/<class>/, classes in sorted order, at channels x size x size (None: the
    images' own, see `own_shape`); decoded once, then cached."""
    paths, classes, class_names = list_folder(folder)
    if channels is None or size is None:
        own_channels, own_size = own_shape(paths)
        channels, size = channels or own_channels, size or own_size
    if channels not in (1, 3) or size < 1:
        raise ValueError(f"images decode to 1 or 3 channels and a positive size, got {channels} x {size}")

    def build() -> ImageSet:
        labels = np.zeros((len(paths), len(class_names)), dtype=np.uint8)
        labels[np.arange(len(paths)), classes] = 1
        return ImageSet(f"folder:{folder}", decode_images(paths, channels, size), labels, class_names,
                        [str(p) for p in paths])

    return cached_imageset("folder-" + fingerprint(paths, channels=channels, size=size), build)
