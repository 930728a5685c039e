"""Every encoder kind a model file can name, in one explicit dict; `encoder_from_config` rebuilds one.

An encoder maps prepared input to `bits` real outputs (codes are their signs). Each class has a `kind`,
`config() -> dict` (JSON-able) and `from_config(config)`; the wrappers (class_scores, cnn_mlp) take the
builder for the encoder they wrap. Adding an encoder: write its module here, add it to ENCODERS.
"""

from __future__ import annotations

from torch import nn

from vdsh.training.encoders.class_scores import ClassScoreCode
from vdsh.training.encoders.cnn import DepthwiseSeparableCNN, ResNet9, SmallCNN
from vdsh.training.encoders.cnn_mlp import CnnMlpEncoder
from vdsh.training.encoders.linear import LinearEncoder
from vdsh.training.encoders.mlp import DeepMLP
from vdsh.training.encoders.shallow import ItqEncoder, LshEncoder, SdhEncoder, SpectralEncoder
from vdsh.training.encoders.sigmoid_mlp import SigmoidEncoder

ENCODERS: dict[str, type[nn.Module]] = {cls.kind: cls for cls in (
    LinearEncoder, DeepMLP, SigmoidEncoder,  # MLPs on vectors (pixels, GIST, backbone features)
    SmallCNN, ResNet9, DepthwiseSeparableCNN, CnnMlpEncoder,  # networks on images
    ClassScoreCode,  # a classifier's class scores made a code (the classifier baseline)
    LshEncoder, ItqEncoder, SdhEncoder, SpectralEncoder,  # the shallow hashers
)}
WRAPPERS = (ClassScoreCode, CnnMlpEncoder)


def encoder_from_config(kind: str, config: dict) -> nn.Module:
    """A fresh encoder of `kind` with the shapes `config` records (weights are loaded separately)."""
    if kind not in ENCODERS:
        raise ValueError(f"unknown encoder kind {kind!r}; known: {sorted(ENCODERS)}")
    cls = ENCODERS[kind]
    return cls.from_config(config, encoder_from_config) if cls in WRAPPERS else cls.from_config(config)
