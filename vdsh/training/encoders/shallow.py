"""The encoders of the shallow hashers (LSH, ITQ, SDH, spectral hashing): fitted parameters as buffers.

Each `forward(features)` gives real (N, bits) outputs whose signs are the codes; the fitters live in
`vdsh.training.trainers.shallow`. Float64 throughout: the fitters solve in float64 and the signs of small
outputs depend on it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

ROWS_PER_CHUNK = 8192  # bounds the (rows x anchors) kernel matrix while encoding a large database


def as_output(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Return real outputs in the caller's float dtype (float32 for integer input such as raw pixels)."""
    return values.to(like.dtype if like.is_floating_point() else torch.float32)


def squared_distances(x: torch.Tensor, anchors: torch.Tensor, anchor_norms: torch.Tensor | None = None) -> torch.Tensor:
    """(N, D) x (m, D) -> (N, m) squared Euclidean distances, clamped at 0 against round-off.

    anchor_norms: ||a_j||² if known; for a few rows against many anchors, computing them is most of the work."""
    if anchor_norms is None:
        anchor_norms = (anchors * anchors).sum(1)
    d2 = (x * x).sum(1, keepdim=True) - 2 * x @ anchors.T + anchor_norms
    return d2.clamp_(min=0)


class LshEncoder(nn.Module):
    """x -> (x - mean) @ projection; the sign of each output is one bit."""

    kind = "lsh"

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


class ItqEncoder(nn.Module):
    """x -> ((x - mean) @ pca) @ rotation; the sign of each output is one bit."""

    kind = "itq"

    def __init__(self, in_features: int, bits: int) -> None:
        super().__init__()
        self.in_features, self.bits = in_features, bits
        self.register_buffer("mean", torch.zeros(in_features, dtype=torch.float64))
        self.register_buffer("pca", torch.zeros(in_features, bits, dtype=torch.float64))
        self.register_buffer("rotation", torch.eye(bits, dtype=torch.float64))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features.flatten(1).to(self.mean.dtype)
        if x.shape[1] != self.in_features:
            raise ValueError(f"ITQ encoder expects {self.in_features} features, got {x.shape[1]}")
        return as_output((x - self.mean) @ self.pca @ self.rotation, features)

    def config(self) -> dict:
        return {"in_features": self.in_features, "bits": self.bits}

    @classmethod
    def from_config(cls, cfg: dict) -> "ItqEncoder":
        return cls(int(cfg["in_features"]), int(cfg["bits"]))


class SdhEncoder(nn.Module):
    """x -> rbf(x, anchors, sigma) @ projection + bias; the sign of each output is one bit."""

    kind = "sdh"

    def __init__(self, in_features: int, bits: int, anchors: int) -> None:
        super().__init__()
        self.in_features, self.bits, self.n_anchors = in_features, bits, anchors
        self.register_buffer("anchors", torch.zeros(anchors, in_features, dtype=torch.float64))
        self.register_buffer("sigma", torch.ones((), dtype=torch.float64))
        self.register_buffer("projection", torch.zeros(anchors, bits, dtype=torch.float64))
        self.register_buffer("bias", torch.zeros(bits, dtype=torch.float64))
        # ||a_j||², derived from the anchors (not saved): recomputed whenever they are set or loaded.
        self.register_buffer("anchor_norms", torch.zeros(anchors, dtype=torch.float64), persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _: module.refresh_anchor_norms())

    def set_anchors(self, rows: torch.Tensor) -> None:
        self.anchors.copy_(rows)
        self.refresh_anchor_norms()

    def refresh_anchor_norms(self) -> None:
        self.anchor_norms.copy_((self.anchors * self.anchors).sum(1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features.flatten(1).to(self.anchors.dtype)
        if x.shape[1] != self.in_features:
            raise ValueError(f"SDH encoder expects {self.in_features} features, got {x.shape[1]}")
        outputs = [
            torch.exp(-squared_distances(chunk, self.anchors, self.anchor_norms) / (2 * self.sigma**2)) @ self.projection
            + self.bias
            for chunk in x.split(ROWS_PER_CHUNK)
        ]
        return as_output(torch.cat(outputs), features)

    def config(self) -> dict:
        return {"in_features": self.in_features, "bits": self.bits, "anchors": self.n_anchors}

    @classmethod
    def from_config(cls, cfg: dict) -> "SdhEncoder":
        return cls(int(cfg["in_features"]), int(cfg["bits"]), int(cfg["anchors"]))


class SpectralEncoder(nn.Module):
    """x -> cos(pi * multiple_j * (y[dim_j] - lower) / width), y the PCA projection of x."""

    kind = "spectral"

    def __init__(self, in_features: int, bits: int, components: int) -> None:
        super().__init__()
        self.in_features, self.bits, self.components = in_features, bits, components
        self.register_buffer("mean", torch.zeros(in_features, dtype=torch.float64))
        self.register_buffer("pca", torch.zeros(in_features, components, dtype=torch.float64))
        self.register_buffer("lower", torch.zeros(components, dtype=torch.float64))
        self.register_buffer("width", torch.ones(components, dtype=torch.float64))
        self.register_buffer("mode_dims", torch.zeros(bits, dtype=torch.int64))
        self.register_buffer("mode_multiples", torch.ones(bits, dtype=torch.float64))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features.flatten(1).to(self.mean.dtype)
        if x.shape[1] != self.in_features:
            raise ValueError(f"spectral hashing encoder expects {self.in_features} features, got {x.shape[1]}")
        box = ((x - self.mean) @ self.pca - self.lower) / self.width  # 0..1 inside the training box
        return as_output(torch.cos(math.pi * self.mode_multiples * box[:, self.mode_dims]), features)

    def config(self) -> dict:
        return {"in_features": self.in_features, "bits": self.bits, "components": self.components}

    @classmethod
    def from_config(cls, cfg: dict) -> "SpectralEncoder":
        return cls(int(cfg["in_features"]), int(cfg["bits"]), int(cfg["components"]))
