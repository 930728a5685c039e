"""GIST-512: shape, determinism, orientation selectivity and the cache."""

import numpy as np
import torch

from vdsh.data.gist import cached_gist_features, gist_features


def grating(vertical: bool, period: int = 4) -> np.ndarray:
    coords = np.arange(32)
    wave = (127 + 120 * np.sin(2 * np.pi * coords / period)).astype(np.uint8)
    img = np.tile(wave, (32, 1)) if vertical else np.tile(wave[:, None], (1, 32))
    return img[None, None]


def orientation_energy(features: torch.Tensor) -> torch.Tensor:
    """(N, 512) -> (N, 8): energy per orientation summed over scales and grid cells."""
    return features.view(-1, 4, 8, 16).sum((1, 3))


def test_shape_and_determinism():
    images = np.random.default_rng(0).integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    a, b = gist_features(images), gist_features(images)
    assert a.shape == (5, 512) and a.dtype == torch.float32
    assert torch.equal(a, b) and bool(torch.isfinite(a).all())
    assert gist_features(np.zeros((2, 1, 28, 28), np.uint8)).shape == (2, 512)  # MNIST size is resized


def test_orientation_selective():
    vertical = orientation_energy(gist_features(grating(True)))[0]
    horizontal = orientation_energy(gist_features(grating(False)))[0]
    assert vertical.argmax() != horizontal.argmax()
    # The channel each grating excites most responds far less to the other grating.
    assert vertical[vertical.argmax()] > 3 * horizontal[vertical.argmax()]
    assert horizontal[horizontal.argmax()] > 3 * vertical[horizontal.argmax()]


def test_cache_returns_the_same_features(tmp_path, monkeypatch):
    monkeypatch.setenv("VDSH_CACHE", str(tmp_path))
    images = np.random.default_rng(1).integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    first = cached_gist_features(images, "t")
    assert len(list((tmp_path / "gist").glob("t-*.npy"))) == 1
    assert torch.equal(cached_gist_features(images, "t"), first)
