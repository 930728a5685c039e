"""A plain DeepMLP's weights as stacked [W | b] tensors, so that layer-local trainers update every layer at once.

The hidden width→width layers share one shape, so they stack into one (M−2, w, w+1) tensor and a
batched GEMM or Cholesky solve treats them all in one call; the first and the top layer stand apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vdsh.training.distributed import broadcast_
from vdsh.training.encoders.mlp import DeepMLP, check_plain_mlp_problem, identity_hidden_layers


@dataclass
class LayerWeights:
    """first: (w, D+1); hidden: (M−2, w, w+1); top: (bits, w+1); the bias is the last column."""

    first: torch.Tensor
    hidden: torch.Tensor
    top: torch.Tensor

    @classmethod
    def from_mlp(cls, mlp: DeepMLP, device: torch.device) -> "LayerWeights":
        def aug(linear: torch.nn.Linear) -> torch.Tensor:
            return torch.cat([linear.weight, linear.bias[:, None]], 1).detach().float().to(device)

        hidden = [aug(l) for l in mlp.linears[1:-1]]
        width = mlp.width
        stacked = torch.stack(hidden) if hidden else torch.empty(0, width, width + 1, device=device)
        return cls(aug(mlp.linears[0]), stacked, aug(mlp.linears[-1]))

    def tensors(self) -> list[torch.Tensor]:
        return [self.first, self.hidden, self.top]

    def clone(self) -> "LayerWeights":
        return LayerWeights(*(t.clone() for t in self.tensors()))

    def write_to(self, mlp: DeepMLP) -> None:
        mats = [self.first, *self.hidden.unbind(0), self.top]
        with torch.no_grad():
            for linear, w in zip(mlp.linears, mats):
                linear.weight.copy_(w[:, :-1])
                linear.bias.copy_(w[:, -1])


def affine(x: torch.Tensor, w_aug: torch.Tensor) -> torch.Tensor:
    """x Wᵀ + b for [W | b]; batched over a leading layer axis when both are 3-D."""
    w = w_aug.to(x.dtype)
    if x.ndim == 3:
        return torch.baddbmm(w[:, None, :, -1], x, w[:, :, :-1].transpose(1, 2))
    return torch.addmm(w[:, -1], x, w[:, :-1].T)


def with_ones(z: torch.Tensor) -> torch.Tensor:
    """[z 1] in z's dtype: the bias column of a ridge regression (callers pass float32 for the normal equations)."""
    return torch.cat([z, torch.ones(*z.shape[:-1], 1, dtype=z.dtype, device=z.device)], -1)


def start_plain_mlp(encoder: DeepMLP, features: torch.Tensor, labels: torch.Tensor, trainer: str, device: torch.device,
                    seed: int, init: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, LayerWeights]:
    """The layer-local trainers' prologue: check the problem, seed, start the hidden layers at the identity (or keep the
    encoder's init), move the data, and stack the weights, rank 0's on every rank. Returns (x, y, weights)."""
    check_plain_mlp_problem(encoder, features, labels, trainer)
    torch.manual_seed(seed)
    encoder.to(device)
    if init == "identity":
        identity_hidden_layers(encoder)
    weights = LayerWeights.from_mlp(encoder, device)
    broadcast_(weights.tensors())
    return features.to(device, dtype), labels.to(device).float(), weights
