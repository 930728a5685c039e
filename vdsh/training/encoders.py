"""Encoders: networks from prepared input to `bits` real outputs (codes are their signs).

Importing this module registers every encoder kind, so `load_model` can rebuild any checkpoint.
"""

from __future__ import annotations

from torch import nn

from vdsh.training.model import register_encoder


@register_encoder("linear")
class LinearEncoder(nn.Module):
    """One linear map to `bits` units: the shallowest hashing encoder, and a baseline."""

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


import vdsh.training.baselines  # noqa: E402,F401  (registers "lsh", "itq", "sdh", "spectral")
from vdsh.training.mlp import DeepMLP  # noqa: E402,F401  (registers "mlp")
from vdsh.training.cnn import DepthwiseSeparableCNN, ResNet9, SmallCNN  # noqa: E402,F401  (registers "small_cnn", "resnet9", "dwsep")
from vdsh.training.classifier_baseline import ClassScoreCode  # noqa: E402,F401  (registers "class_scores")
from vdsh.training.semantic_hashing import SigmoidEncoder  # noqa: E402,F401  (registers "sigmoid-mlp")
from vdsh.training.cnn_mlp import CnnMlpEncoder  # noqa: E402,F401  (registers "cnn_mlp")
