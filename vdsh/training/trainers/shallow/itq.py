"""ITQ: iterative quantisation (Gong & Lazebnik, CVPR 2011), the standard unsupervised linear baseline.

Centre, project onto the top `bits` principal directions (V = (x - mu) P), then look for the
orthogonal rotation R that brings V R closest to the hypercube corners:

    min_{B, R} ||B - V R||_F^2,   B in {-1,+1}^{N x bits},   R^T R = I.

Alternate two exact steps: B = sgn(V R) for fixed R, and for fixed B the orthogonal Procrustes
solution R = U W^T where U S W^T = svd(V^T B). Neither step increases the loss. PCA-sign hashing is
the special case R = I; the rotation spreads variance evenly over the bits, which is why ITQ beats it.
"""

from __future__ import annotations

import numpy as np
import torch

from vdsh.training.trainers.shallow.inputs import check_bits, feature_matrix
from vdsh.training.encoders.shallow import ItqEncoder
from vdsh.training.trainers.shallow.pca import principal_components




def quantisation_loss(projected: torch.Tensor, rotation: torch.Tensor) -> float:
    """||sgn(V R) - V R||_F^2, the quantity ITQ minimises."""
    rotated = projected @ rotation
    return float(((torch.where(rotated >= 0, 1.0, -1.0) - rotated) ** 2).sum())


def itq_rotation(projected: torch.Tensor, iterations: int, generator: torch.Generator) -> torch.Tensor:
    """Alternate B = sgn(V R) and the Procrustes R for `iterations` rounds from a random orthogonal R."""
    bits = projected.shape[1]
    # A random orthogonal start, as in the authors' code; the seed makes it reproducible.
    gaussian = torch.randn(bits, bits, generator=generator, dtype=torch.float64)
    rotation, _ = torch.linalg.qr(gaussian)
    for _ in range(iterations):
        codes = torch.where(projected @ rotation >= 0, 1.0, -1.0).to(projected.dtype)
        u, _, wt = torch.linalg.svd(projected.T @ codes)
        rotation = u @ wt
    return rotation


def fit_itq(
    features: torch.Tensor, labels: np.ndarray | None, bits: int, seed: int = 0, iterations: int = 50
) -> ItqEncoder:
    """PCA to `bits` dimensions, then `iterations` rounds of ITQ rotation; labels are ignored."""
    x = feature_matrix(features)
    check_bits(bits, at_most=x.shape[1], why="ITQ projects onto at most as many directions as features")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    mean, directions, _ = principal_components(x, bits)
    projected = (x - mean) @ directions
    generator = torch.Generator().manual_seed(seed)
    encoder = ItqEncoder(x.shape[1], bits)
    encoder.mean.copy_(mean)
    encoder.pca.copy_(directions)
    encoder.rotation.copy_(itq_rotation(projected, iterations, generator))
    return encoder
