"""`SigmoidEncoder` (kind "sigmoid-mlp"): the encoder half of semantic hashing's unrolled RBM stack."""

from __future__ import annotations

import torch
from torch import nn


class SigmoidEncoder(nn.Module):
    """x (N, sizes[0]) -> real (N, sizes[-1]): sigmoid hidden layers, a linear top; codes = sign."""

    kind = "sigmoid-mlp"

    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"sizes must list at least input and bits, all positive, got {sizes}")
        self.sizes = [int(s) for s in sizes]
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(self.sizes[:-1], self.sizes[1:]))

    @property
    def bits(self) -> int:
        return self.sizes[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.sizes[0]:
            raise ValueError(f"SigmoidEncoder expects (N, {self.sizes[0]}) input, got {tuple(x.shape)}")
        for linear in self.linears[:-1]:
            x = torch.sigmoid(linear(x))
        return self.linears[-1](x)

    def config(self) -> dict:
        return {"sizes": self.sizes, "bits": self.bits}

    @classmethod
    def from_config(cls, config: dict) -> "SigmoidEncoder":
        return cls(config["sizes"])
