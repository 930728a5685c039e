"""`LinearEncoder` (kind "linear"): one linear map to `bits` units, the shallowest hashing encoder."""

from __future__ import annotations

from torch import nn


class LinearEncoder(nn.Module):
    """One linear map to `bits` units: the shallowest hashing encoder, and a baseline."""

    kind = "linear"

    def __init__(self, in_features: int, bits: int) -> None:
        super().__init__()
        self.in_features, self.bits = in_features, bits
        self.projection = nn.Linear(in_features, bits)

    def forward(self, x):
        return self.projection(x)

    def config(self) -> dict:
        return {"in_features": self.in_features, "bits": self.bits}

    @classmethod
    def from_config(cls, config: dict) -> "LinearEncoder":
        return cls(**config)
