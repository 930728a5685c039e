"""`CnnMlpEncoder` (kind "cnn_mlp"): a CNN trunk's penultimate features into a plain DeepMLP, one model.

The encoder of the hybrid trainer (`vdsh.training.hybrid`), in its own module so that registering it
(`vdsh.training.encoders`) imports no trainer.
"""

from __future__ import annotations

import torch
from torch import nn

from vdsh.training.cnn import ImageEncoder
from vdsh.training.mlp import DeepMLP
from vdsh.training.model import ENCODERS, register_encoder


@register_encoder("cnn_mlp")
class CnnMlpEncoder(nn.Module):
    """Images -> CNN trunk features (N, feature_dim) -> plain DeepMLP -> (N, bits).

    The trunk's own output layer is replaced by the identity: it is no part of this model.
    """

    def __init__(self, trunk: ImageEncoder, mlp: DeepMLP) -> None:
        super().__init__()
        if not isinstance(trunk, ImageEncoder):
            raise ValueError(f"the trunk must be a CNN encoder (small_cnn, resnet9, dwsep), got {type(trunk).__name__}")
        if mlp.in_features != trunk.feature_dim:
            raise ValueError(f"the MLP takes {mlp.in_features} features, the {trunk.kind} trunk gives {trunk.feature_dim}")
        trunk.head = nn.Identity()
        self.trunk, self.mlp = trunk, mlp

    @property
    def bits(self) -> int:
        return self.mlp.bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.trunk.features(x))

    def config(self) -> dict:
        return {"trunk": {"kind": self.trunk.kind, "config": self.trunk.config()}, "mlp": self.mlp.config(), "bits": self.bits}

    @classmethod
    def from_config(cls, config: dict) -> "CnnMlpEncoder":
        trunk = config["trunk"]
        if trunk["kind"] not in ENCODERS:
            raise ValueError(f"unknown trunk encoder kind {trunk['kind']!r}; known: {sorted(ENCODERS)}")
        return cls(ENCODERS[trunk["kind"]].from_config(trunk["config"]), DeepMLP.from_config(config["mlp"]))
