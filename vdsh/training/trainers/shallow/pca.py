"""Principal components, shared by ITQ and spectral hashing (both start from a PCA projection)."""

from __future__ import annotations

import torch


def principal_components(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, D) float64 -> mean (D,), the top-k directions (D, k) and their variances (k,), largest first.

    Each direction's sign is fixed (its largest-magnitude entry is positive) so that a fit is the same
    on every machine: eigen-solvers return either sign.
    """
    if not 1 <= k <= x.shape[1]:
        raise ValueError(f"cannot take {k} principal components of {x.shape[1]}-dimensional features")
    mean = x.mean(dim=0)
    centred = x - mean
    covariance = centred.T @ centred / max(x.shape[0] - 1, 1)
    variances, directions = torch.linalg.eigh(covariance)  # ascending
    variances, directions = variances.flip(0)[:k], directions.flip(1)[:, :k]
    largest = directions.abs().argmax(dim=0)
    signs = torch.sign(directions[largest, torch.arange(k)])
    return mean, directions * signs, variances.clamp(min=0)
