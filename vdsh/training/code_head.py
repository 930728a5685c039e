"""The code step every trainer shares: codes b = sgn(z_M) and a linear classifier W on the codes.

As in Supervised Discrete Hashing (Shen et al. 2015): W solves the ridge regression of the multi-hot
labels Y on the codes in closed form, W = (BᵀB + λI)⁻¹ BᵀY, and the loss is the squared error
||Y − BW||². Multi-label targets need nothing special: every label column is its own regression.
"""

from __future__ import annotations

from typing import Callable

import torch


def binary_codes(z: torch.Tensor) -> torch.Tensor:
    """±1 codes in z's float dtype; 0 maps to +1, as `vdsh.index.codes.sign_codes` does."""
    return torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


def ridge_classifier(codes: torch.Tensor, labels: torch.Tensor, ridge: float = 1.0,
                     reduce: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None) -> torch.Tensor:
    """W (bits, L) minimising ||Y − BW||² + ridge·||W||², solved in float32 on the codes' device.

    `reduce` sums BᵀB and BᵀY over the samples other processes hold (data-parallel training), so every
    process solves the regression of the whole training set.
    """
    if codes.ndim != 2 or labels.ndim != 2 or codes.shape[0] != labels.shape[0]:
        raise ValueError(f"codes (N, bits) and labels (N, L) must share N, got {tuple(codes.shape)} and {tuple(labels.shape)}")
    b = codes.float()
    y = labels.to(b.device).float()
    gram, rhs = b.T @ b, b.T @ y
    if reduce is not None:
        gram, rhs = reduce([gram, rhs])
    return torch.linalg.solve(gram + ridge * torch.eye(b.shape[1], device=b.device), rhs)


def squared_loss(outputs: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """Mean over samples of ||y_i − Wᵀ o_i||² (o: codes or their relaxation)."""
    residual = labels.to(outputs.device).float() - outputs.float() @ classifier
    return residual.pow(2).sum(1).mean()


class LinearCodeHead:
    """Codes from the top layer and the closed-form classifier on them, refitted on demand."""

    def __init__(self, ridge: float = 1.0) -> None:
        if ridge <= 0:
            raise ValueError(f"ridge must be > 0 (it keeps BᵀB + λI invertible), got {ridge}")
        self.ridge = ridge
        self.classifier: torch.Tensor | None = None

    def fit(self, top: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Codes b = sgn(top), W by ridge regression; returns (codes, loss of the codes)."""
        codes = binary_codes(top)
        self.classifier = ridge_classifier(codes, labels, self.ridge)
        return codes, float(squared_loss(codes, labels, self.classifier))
