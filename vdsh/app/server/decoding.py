"""Decoding uploads within a budget set by their decoded size, not their byte size.

A 5 KB PNG can hold 40 M pixels, so the upload's length says nothing about what decoding it costs.
The server therefore reads the header first (microseconds: format, size, mode, frames), asks JPEG
for a reduced decode (DCT scaling to 1/2, 1/4 or 1/8, `Image.draft`), and refuses what is still over
`ImageLimits.max_pixels` before a pixel is decoded: one message for every such decompression bomb.
What is accepted is decoded, converted to the model's mode, box-reduced and resized to the model's
input, and `decode_bytes` says how much memory that takes at most, so that the server can reserve
it from its memory budget (`vdsh.app.server.budget`) before the work starts. Only the first frame of an
animated PNG or WebP is decoded.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from vdsh.data.transforms import ImageDecodeError, to_array

# The model sees size x size pixels; an upload more than this many times larger on a side carries
# nothing it can use, only decode time and memory (64x: a 1792-px side for 28-px MNIST models).
PIXEL_LIMIT_SIDE_FACTOR = 64
PIXEL_LIMIT_FLOOR = 4 * 1024 * 1024  # a 2048 x 2048 image is always accepted
PIXEL_LIMIT_CEILING = 16 * 1024 * 1024  # 64 MB decoded at 4 bytes a pixel
DECODE_OVERHEAD_BYTES = 1024 * 1024  # decoder state, line buffers, the resized copy
# bytes a pixel as Pillow holds it: multi-band modes are stored 4 bytes a pixel (RGB as RGBX)
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}


def default_max_pixels(input_size: int) -> int:
    """The pixel limit for a model whose input is input_size x input_size (see PIXEL_LIMIT_*)."""
    return int(min(PIXEL_LIMIT_CEILING, max(PIXEL_LIMIT_FLOOR, (PIXEL_LIMIT_SIDE_FACTOR * input_size) ** 2)))


@dataclass(frozen=True)
class ImageLimits:
    """What one upload may cost: decoded pixels (after JPEG's reduced decode), and the model's input."""

    max_pixels: int
    channels: int
    size: int

    def worst_case_bytes(self) -> int:
        """The most one decode can hold in memory: `decode_bytes` of the largest acceptable image."""
        return decode_bytes(self.max_pixels, "RGBA", self.channels)


@dataclass(frozen=True)
class ImageHeader:
    format: str
    width: int  # after JPEG's reduced decode, i.e. what will be decoded
    height: int
    mode: str
    frames: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def too_many_pixels(pixels: int | str, limit: int) -> ImageDecodeError:
    """The one message for every image over the pixel limit (decompression bombs)."""
    return ImageDecodeError(
        f"upload: the image has {pixels} pixels, over this server's limit of {limit:,} decoded pixels "
        "(decompression-bomb guard); send a smaller image")


def read_header(data: bytes, limits: ImageLimits) -> ImageHeader:
    """Format, decoded size, mode and frames from the header alone; ImageDecodeError for unreadable
    headers and for images over the pixel limit. Nothing is decoded."""
    with _opened(data, limits) as image:
        return ImageHeader(image.format or "", image.width, image.height, image.mode, getattr(image, "n_frames", 1))


@contextmanager
def _opened(data: bytes, limits: ImageLimits) -> Iterator[Image.Image]:
    """The image opened lazily (header only), JPEG set to its reduced decode, checked against the limit."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format == "JPEG":  # decode at 1/2, 1/4 or 1/8 scale while that still covers the model's input
                image.draft("L" if limits.channels == 1 else "RGB", (limits.size, limits.size))
            if image.width * image.height > limits.max_pixels:
                raise too_many_pixels(f"{image.width}x{image.height} = {image.width * image.height:,}", limits.max_pixels)
            yield image
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError:  # Pillow's own guard, far above ours: the same answer
        raise too_many_pixels(f"more than {2 * Image.MAX_IMAGE_PIXELS:,}", limits.max_pixels) from None
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(f"upload: not a readable image ({exc})") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(f"upload: corrupt or truncated image ({exc})") from exc


def decode_bytes(pixels: int, mode: str, channels: int) -> int:
    """Upper bound on the memory a decode holds: the decoded image, its copy in the model's mode and a
    fixed overhead (the upload's own bytes are reserved with the request body, `BodySizeLimit`)."""
    decoded = pixels * _BYTES_PER_PIXEL.get(mode, 4)
    converted = pixels * (1 if channels == 1 else 4)
    return decoded + converted + DECODE_OVERHEAD_BYTES


def decode_for_model(data: bytes, limits: ImageLimits) -> np.ndarray:
    """Upload bytes -> uint8 (C, size, size) as the model expects, within `limits`; ImageDecodeError
    for bad images and images over the pixel limit."""
    with _opened(data, limits) as image:
        image.load()  # the first frame only; truncated files fail here
        picture = image.convert("L" if limits.channels == 1 else "RGB")
    factor = min(picture.size) // (2 * limits.size)  # box-reduce to at least twice the model's input first
    if factor >= 2:
        picture = picture.reduce(factor)
    return to_array(picture, limits.channels, limits.size)
