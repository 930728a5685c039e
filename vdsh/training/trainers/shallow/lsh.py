"""LSH: random hyperplane hashing (Charikar, STOC 2002), the data-independent floor for every baseline.

Each bit is the side of a random hyperplane through the training mean: b = sgn((x - mu) w) with
w ~ N(0, I). Only the mean is learned; the hyperplanes come from the seed. Two codes agree on a bit
with probability 1 - angle / pi, so Hamming distance estimates angle after centring.
"""

from __future__ import annotations

import numpy as np
import torch

from vdsh.training.trainers.shallow.inputs import check_bits, feature_matrix
from vdsh.training.encoders.shallow import LshEncoder




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
