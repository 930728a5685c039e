"""Checks shared by the baseline fitters: the feature matrix, the label matrix and the code length.

Every fitter works in float64: eigen-decompositions, ridge solves and the ITQ rotation lose bits
that decide code signs in float32.
"""

from __future__ import annotations

import numpy as np
import torch


def feature_matrix(features: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(N, D) or (N, C, H, W) features -> (N, D) float64 tensor, rejecting empty or non-finite input."""
    features = torch.as_tensor(features)
    if features.ndim < 2:
        raise ValueError(f"features must be (N, D) or (N, C, H, W), got shape {tuple(features.shape)}")
    features = features.flatten(1).to(torch.float64)
    if features.shape[0] == 0 or features.shape[1] == 0:
        raise ValueError(f"features are empty: shape {tuple(features.shape)}")
    if not torch.isfinite(features).all():
        raise ValueError("features contain NaN or infinite values")
    return features


def label_matrix(labels: np.ndarray | torch.Tensor | None, n_samples: int) -> torch.Tensor:
    """(N, L) multi-hot labels -> (N, L) float64 tensor of 0/1; a supervised fitter needs them."""
    if labels is None:
        raise ValueError("this method is supervised: pass labels as an (N, L) multi-hot array")
    labels = torch.as_tensor(np.asarray(labels))
    if labels.ndim != 2:
        raise ValueError(f"labels must be (N, L) multi-hot, got shape {tuple(labels.shape)}")
    if labels.shape[0] != n_samples:
        raise ValueError(f"{n_samples} feature rows but {labels.shape[0]} label rows")
    return (labels > 0).to(torch.float64)


def check_bits(bits: int, at_most: int | None = None, why: str = "") -> None:
    """Reject a non-positive code length, or one above a method's limit (`why` says which limit)."""
    if not isinstance(bits, (int, np.integer)) or bits <= 0:
        raise ValueError(f"bits must be a positive integer, got {bits!r}")
    if at_most is not None and bits > at_most:
        raise ValueError(f"bits={bits} exceeds {at_most}: {why}")

