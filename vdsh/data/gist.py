"""GIST-512 descriptors (Oliva & Torralba 2001), as used for CIFAR-10 in the supervised-hashing literature.

The reference MATLAB `LMgist` with its hashing-paper settings: greyscale, 32×32, log + whitening
prefilter with local contrast normalisation (fc = 4), 32-pixel symmetric boundary extension, Gabor
energy at 4 scales × 8 orientations in the frequency domain, averaged on a 4×4 grid:
4 · 8 · 16 = 512 numbers. Vectorised in torch: one FFT per image, all 32 filters in one product.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from vdsh.data.cache import cached_array, images_fingerprint
from vdsh.data.paths import cache_dir

IMAGE_SIZE = 32
BOUNDARY = 32  # symmetric padding before filtering, as LMgist's boundaryExtension
ORIENTATIONS = (8, 8, 8, 8)
GRID = 4
PREFILTER_FC = 4


def gabor_filters(size: int, orientations: tuple[int, ...] = ORIENTATIONS) -> torch.Tensor:
    """(F, size, size) transfer functions of LMgist's `createGabor` (zero frequency at [0, 0])."""
    f = torch.arange(-size // 2, size // 2, dtype=torch.float64)
    fy, fx = torch.meshgrid(f, f, indexing="ij")
    radius = torch.fft.fftshift(torch.sqrt(fx**2 + fy**2))
    angle = torch.fft.fftshift(torch.atan2(fy, fx))
    filters = []
    for scale, n_or in enumerate(orientations):
        for j in range(n_or):
            centre, width, spread, theta = 0.35, 0.3 / 1.85**scale, 16 * n_or**2 / 32**2, math.pi / n_or * j
            t = angle + theta
            t = t + 2 * math.pi * (t < -math.pi) - 2 * math.pi * (t > math.pi)
            filters.append(torch.exp(-10 * centre * (radius / size / width - 1) ** 2 - 2 * spread * math.pi * t**2))
    return torch.stack(filters).float()


def symmetric_pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Mirror padding that repeats the edge pixel (MATLAB padarray 'symmetric'), on the last two axes."""
    x = torch.cat([x[..., :pad, :].flip(-2), x, x[..., -pad:, :].flip(-2)], -2)
    return torch.cat([x[..., :pad].flip(-1), x, x[..., -pad:].flip(-1)], -1)


def prefilter(img: torch.Tensor, fc: float = PREFILTER_FC) -> torch.Tensor:
    """LMgist `prefilt`: log intensity, whitening, local contrast normalisation. img (N, H, W) in 0..255."""
    pad = 5
    x = symmetric_pad(torch.log(img + 1), pad)
    size = x.shape[-1]
    s1 = fc / math.sqrt(math.log(2))
    f = torch.arange(-size // 2, size // 2, dtype=torch.float32, device=img.device)
    fy, fx = torch.meshgrid(f, f, indexing="ij")
    gauss = torch.fft.fftshift(torch.exp(-(fx**2 + fy**2) / s1**2))
    out = x - torch.fft.ifft2(torch.fft.fft2(x) * gauss).real
    local_std = torch.sqrt(torch.fft.ifft2(torch.fft.fft2(out**2) * gauss).real.abs())
    out = out / (0.2 + local_std)
    return out[..., pad:-pad, pad:-pad]


def greyscale_32(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float (N, 32, 32) in 0..255 (luma for RGB, bilinear resize when needed)."""
    x = images.float()
    if x.shape[1] == 3:
        x = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]
    elif x.shape[1] != 1:
        raise ValueError(f"GIST needs 1- or 3-channel images, got {x.shape[1]} channels")
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = torch.nn.functional.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return x[:, 0]


@torch.no_grad()
def gist_features(images: torch.Tensor | np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> GIST-512 float32 (N, 512), on the images' device, in batches.

    Channel order: scale-major, then orientation, then the 4×4 grid row-major (LMgist's order).
    """
    images = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if images.ndim != 4:
        raise ValueError(f"expected images (N, C, H, W), got shape {tuple(images.shape)}")
    size = IMAGE_SIZE + 2 * BOUNDARY
    filters = gabor_filters(size).to(images.device)
    chunks = []
    for start in range(0, len(images), batch_size):
        img = prefilter(greyscale_32(images[start : start + batch_size]))
        spectrum = torch.fft.fft2(symmetric_pad(img, BOUNDARY))[:, None]  # (n, 1, size, size)
        energy = torch.fft.ifft2(spectrum * filters).abs()[..., BOUNDARY:-BOUNDARY, BOUNDARY:-BOUNDARY]
        # Mean over each cell of the 4×4 grid (32 / 4 = 8 pixels a side).
        cells = torch.nn.functional.avg_pool2d(energy, IMAGE_SIZE // GRID)
        chunks.append(cells.flatten(1))
    return torch.cat(chunks) if chunks else torch.empty(0, 512)


def cached_gist_features(images: np.ndarray, name: str = "images") -> torch.Tensor:
    """GIST of `images`, computed once and stored under cache_dir()/gist/<name>-<fingerprint>.npy (atomic)."""
    path = cache_dir() / "gist" / f"{name}-{images_fingerprint(images, 'gist-v1')}.npy"
    return torch.from_numpy(cached_array(path, lambda: gist_features(images).numpy()))
