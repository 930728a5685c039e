"""Turning image files and uploads into the uint8 (C, H, W) arrays every encoder takes."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# Refuse images whose pixel count could exhaust memory when decoded (decompression bombs).
MAX_PIXELS = 40_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class ImageDecodeError(ValueError):
    """An image could not be decoded: corrupt, truncated, too large, or not an image."""


def open_image(source: str | Path | bytes) -> Image.Image:
    """Open and fully decode an image, turning every failure into ImageDecodeError."""
    name = "upload" if isinstance(source, bytes) else str(source)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            if image.width * image.height > MAX_PIXELS:
                raise ImageDecodeError(f"{name}: {image.width}x{image.height} exceeds {MAX_PIXELS} pixels")
            image.load()  # decode now so truncated files fail here, not later
            return image.copy()
    except ImageDecodeError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"{name}: not a readable image ({exc})") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(f"{name}: corrupt or truncated image ({exc})") from exc


def to_array(image: Image.Image, channels: int, size: int) -> np.ndarray:
    """Resize the shorter side to `size`, centre-crop to size x size, return uint8 (C, size, size)."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    image = image.convert("L" if channels == 1 else "RGB")
    scale = size / min(image.width, image.height)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    if (width, height) != image.size:
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    left, top = (width - size) // 2, (height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1).copy()


def load_image(source: str | Path | bytes, channels: int, size: int) -> np.ndarray:
    """Decode and resize one image file or upload to uint8 (C, size, size)."""
    return to_array(open_image(source), channels, size)


def thumbnail(image: np.ndarray, size: int = 64) -> np.ndarray:
    """An (h, w, C) uint8 thumbnail of a (C, H, W) image, for index metadata and the web page: the image
    shrunk to fit in size x size (aspect kept, never enlarged, never padded, so a 32 px CIFAR-10 image
    costs a quarter of a padded 64 x 64 one in the index and the server's memory); one channel for
    grey images, else RGB. The page scales it up to its cell."""
    pil = Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0))
    pil.thumbnail((size, size), Image.Resampling.BILINEAR)
    picture = np.array(pil, dtype=np.uint8)  # a copy, writable
    return picture[..., None] if picture.ndim == 2 else picture
