"""`CnnMlpEncoder` (kind "cnn_mlp"): a CNN trunk's penultimate features into a plain DeepMLP, one model.

The encoder of the hybrid trainer (`vdsh.training.trainers.hybrid`), in its own module so that registering it
(`vdsh.training.encoders.linear`) imports no trainer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from vdsh.training.encoders.cnn import ImageEncoder
from vdsh.training.encoders.mlp import DeepMLP


class CnnMlpEncoder(nn.Module):
    """Images -> CNN trunk features (N, feature_dim) -> plain DeepMLP -> (N, bits).

    The trunk's own output layer is replaced by the identity: it is no part of this model.
    """

    kind = "cnn_mlp"

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
    def from_config(cls, config: dict, build: Callable[[str, dict], nn.Module]) -> "CnnMlpEncoder":
        """build(kind, config): the registry's `encoder_from_config`, for the trunk."""
        trunk = config["trunk"]
        return cls(build(trunk["kind"], trunk["config"]), DeepMLP.from_config(config["mlp"]))
