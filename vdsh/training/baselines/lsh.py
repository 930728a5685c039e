"""LSH: random hyperplane hashing (Charikar, STOC 2002), the data-independent floor for every baseline.

Each bit is the side of a random hyperplane through the training mean: b = sgn((x - mu) w) with
w ~ N(0, I). Only the mean is learned; the hyperplanes come from the seed. Two codes agree on a bit
with probability 1 - angle / pi, so Hamming distance estimates angle after centring.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from vdsh.training.baselines.inputs import as_output, check_bits, feature_matrix


class LshEncoder(nn.Module):
    """x -> (x - mean) @ projection; the sign of each output is one bit."""

    def __init__(self, in_features: int, bits: int) -> None:
        super().__init__()
        self.in_features, self.bits = in_features, bits
        self.register_buffer("mean", torch.zeros(in_features, dtype=torch.float64))
        self.register_buffer("projection", torch.zeros(in_features, bits, dtype=torch.float64))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features.flatten(1).to(self.mean.dtype)
        if x.shape[1] != self.in_features:
            raise ValueError(f"LSH encoder expects {self.in_features} features, got {x.shape[1]}")
        return as_output((x - self.mean) @ self.projection, features)

    def config(self) -> dict:
        return {"in_features": self.in_features, "bits": self.bits}

    @classmethod
    def from_config(cls, cfg: dict) -> "LshEncoder":
        return cls(int(cfg["in_features"]), int(cfg["bits"]))


def fit_lsh(
    features: torch.Tensor, labels: np.ndarray | None, bits: int, seed: int = 0
) -> LshEncoder:
    """Centre on the training mean and draw `bits` Gaussian hyperplanes from `seed`; labels are ignored."""
    check_bits(bits)
    x = feature_matrix(features)
    generator = torch.Generator().manual_seed(seed)
    encoder = LshEncoder(x.shape[1], bits)
    encoder.mean.copy_(x.mean(dim=0))
    encoder.projection.copy_(torch.randn(x.shape[1], bits, generator=generator, dtype=torch.float64))
    return encoder
