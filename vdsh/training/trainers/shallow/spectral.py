"""Spectral hashing (Weiss, Torralba & Fergus, NIPS 2008), the classic unsupervised non-linear baseline.

Spectral hashing wants codes that are the thresholded eigenvectors of a Gaussian affinity graph. For
data spread uniformly in a box the graph Laplacian's eigenfunctions are known in closed form, which
gives an out-of-sample rule in three steps:

1. PCA to min(bits, D) directions (so the box axes are the principal directions);
2. fit a box [a_i, b_i] along each direction (the data's range there);
3. the 1-D eigenfunctions are Phi_k(y) = sin(pi/2 + k pi (y - a) / (b - a)) with eigenvalue growing
   as (k / (b - a))^2; keep the `bits` modes (direction i, multiple k >= 1) of smallest eigenvalue,
   i.e. low frequencies along the widest directions. Bit j is the sign of its eigenfunction.

sin(pi/2 + t) = cos(t), which is what `forward` computes. Outer products of 1-D eigenfunctions are
eigenfunctions too, but the authors' code keeps only single-direction ones, and so does this. The fit is deterministic: `seed` is accepted for a uniform signature.
"""

from __future__ import annotations

import numpy as np
import torch

from vdsh.training.trainers.shallow.inputs import check_bits, feature_matrix
from vdsh.training.encoders.shallow import SpectralEncoder
from vdsh.training.trainers.shallow.pca import principal_components




def select_modes(widths: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `bits` (direction, multiple) pairs of smallest eigenvalue (k / width)^2, smallest first.

    Multiples 1..bits per direction suffice: the widest direction alone offers `bits` candidates
    with k / width <= bits / max(width), and any larger multiple elsewhere exceeds that. Ties go
    to the lower direction, then the lower multiple (a stable sort of direction-major candidates).
    """
    multiples = torch.arange(1, bits + 1, dtype=torch.float64)
    eigenvalues = (multiples[None, :] / widths[:, None]) ** 2  # (directions, bits)
    order = torch.sort(eigenvalues.flatten(), stable=True).indices[:bits]
    return order // bits, multiples[order % bits]


def fit_spectral(
    features: torch.Tensor, labels: np.ndarray | None, bits: int, seed: int = 0
) -> SpectralEncoder:
    """PCA, box fit and eigenfunction selection; labels and seed are ignored (the fit is deterministic)."""
    check_bits(bits)
    x = feature_matrix(features)
    components = min(bits, x.shape[1])
    mean, directions, _ = principal_components(x, components)
    projected = (x - mean) @ directions
    lower, upper = projected.min(dim=0).values, projected.max(dim=0).values
    width = upper - lower
    if not (width > 0).all():
        raise ValueError(
            f"the features vary along fewer than {components} principal directions: use fewer bits or more rows"
        )
    dims, multiples = select_modes(width, bits)
    encoder = SpectralEncoder(x.shape[1], bits, components)
    encoder.mean.copy_(mean)
    encoder.pca.copy_(directions)
    encoder.lower.copy_(lower)
    encoder.width.copy_(width)
    encoder.mode_dims.copy_(dims)
    encoder.mode_multiples.copy_(multiples)
    return encoder
