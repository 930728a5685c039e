"""DeepMLP: the VDSH encoder, `depth` weight layers of `width` ReLU units, the last one linear to `bits`.

Plain by default (the network ADMM and ProxProp train); BatchNorm and residual connections are options for the
back-propagation baselines. Every weight layer is an `nn.Linear` in `self.linears`, in order, so a
trainer can address (and overwrite) layer m directly.
"""

from __future__ import annotations

import torch
from torch import nn



class DeepMLP(nn.Module):
    """x (N, in_features) -> real (N, bits); hidden layer m: z_m = relu(W_m z_{m-1} + b_m), top: linear."""

    kind = "mlp"

    def __init__(self, in_features: int, depth: int, width: int, bits: int, batchnorm: bool = False, residual: bool = False) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"depth must be >= 2 (at least one hidden ReLU layer and the linear top), got {depth}")
        if min(in_features, width, bits) < 1:
            raise ValueError(f"in_features, width and bits must be positive, got {in_features}, {width}, {bits}")
        self.in_features, self.depth, self.width, self.bits = in_features, depth, width, bits
        self.batchnorm, self.residual = batchnorm, residual
        sizes = [in_features] + [width] * (depth - 1) + [bits]
        self.linears = nn.ModuleList(nn.Linear(sizes[m], sizes[m + 1]) for m in range(depth))
        self.norms = nn.ModuleList(nn.BatchNorm1d(width) for _ in range(depth - 1)) if batchnorm else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MSRA (Kaiming, fan-in) init: keeps activation scale constant through ReLU layers of any depth."""
        for m, linear in enumerate(self.linears):
            is_top = m == self.depth - 1
            nn.init.kaiming_normal_(linear.weight, mode="fan_in", nonlinearity="linear" if is_top else "relu")
            nn.init.zeros_(linear.bias)

    @property
    def is_plain(self) -> bool:
        return not (self.batchnorm or self.residual)

    def hidden(self, z: torch.Tensor, m: int) -> torch.Tensor:
        """Hidden layer m (0-based, m < depth-1) applied to its input."""
        a = self.linears[m](z)
        if self.norms is not None:
            a = self.norms[m](a)
        out = torch.relu(a)
        # Residual only where shapes match (not the first layer, which changes the width).
        return z + out if self.residual and m > 0 else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"DeepMLP expects (N, {self.in_features}) input, got {tuple(x.shape)}")
        z = x
        for m in range(self.depth - 1):
            z = self.hidden(z, m)
        return self.linears[-1](z)

    def config(self) -> dict:
        return {
            "in_features": self.in_features, "depth": self.depth, "width": self.width, "bits": self.bits,
            "batchnorm": self.batchnorm, "residual": self.residual,
        }

    @classmethod
    def from_config(cls, config: dict) -> "DeepMLP":
        return cls(**config)


def identity_hidden_layers(mlp: DeepMLP) -> None:
    """Set every width→width layer to W = I, b = 0.

    Its input is already a ReLU output (≥ 0), so relu(I·z) = z: at the start the deep plain network computes
    exactly what its first and last layers compute, however deep it is, and every layer's Jacobian is a 0/1 mask
    instead of a product of random matrices. The network stays plain; only the starting point differs.
    """
    with torch.no_grad():
        for linear in mlp.linears[1:-1]:
            linear.weight.copy_(torch.eye(mlp.width, dtype=linear.weight.dtype))
            linear.bias.zero_()


def check_plain_mlp_problem(encoder: nn.Module, features: torch.Tensor, labels: torch.Tensor, trainer: str) -> None:
    """The layer-wise trainers' precondition: a plain DeepMLP and (N, in_features) features with N labels."""
    if not isinstance(encoder, DeepMLP) or not encoder.is_plain:
        raise ValueError(f"{trainer} trains a plain DeepMLP (no BatchNorm, no residual connections)")
    if features.ndim != 2 or features.shape[1] != encoder.in_features or labels.shape[0] != features.shape[0]:
        raise ValueError(f"features must be (N, {encoder.in_features}) with N labels, got {tuple(features.shape)}, {tuple(labels.shape)}")
