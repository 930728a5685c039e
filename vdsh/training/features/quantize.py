"""int8 post-training quantisation of a backbone for CPU serving (torch.ao FX graph mode, static).

Weights per channel and activations per tensor in int8 (the default qconfig of the quantised engine that `engine()`
picks), observers calibrated on the training images a model keeps; the stem and first stages stay in float
(`FLOAT_MODULES`). oneDNN comes first: fbgemm's int8 convolutions (the `x86` engine) ran this backbone slower than
float32 on the project's CPUs, oneDNN's faster; BENCHMARKS.md ("int8 backbone") holds the oneDNN figures.
Before tracing, timm's layers that FX cannot
quantise are rewritten into plain ones for the one resolution the model serves (`inference.plain_layers`), so
that batch norm folds into the convolutions. Accuracy and speed against float: BENCHMARKS.md ("int8 backbone").
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn
from torch.ao.quantization import QConfigMapping, get_default_qconfig
from torch.ao.quantization.backend_config import get_onednn_backend_config

from vdsh.training.features.efficientnet import EfficientNetLite0Features
from vdsh.training.features.inference import plain_layers


# Left in float: the stem (its convolution and its batch norm + ReLU6, `bn1`) and the first two stages. Quantised
# alone, each of these lost much of the feature similarity in a probe on CIFAR-10 images (cosine to the float
# features far below every later stage's): per-tensor activation ranges of these narrow, wide-range early layers
# are what PTQ without cross-layer equalisation handles worst. They hold a small share of the weights. Min-max
# observers (ReLU6 outputs clamped to [0, 6]) lost most of the features even so; the default qconfigs' histogram
# observers keep them (tests/test_features.py checks the cosine on real images).
FLOAT_MODULES = ("conv_stem", "bn1", "blocks.0", "blocks.1")


# Quantised engines in order of preference; the first that this torch build supports is used.
ENGINES = ("onednn", "x86", "fbgemm")


def engine(supported: list[str] | None = None) -> str:
    """The quantised engine int8 backbones are built for and run on (one per process: torch's setting is global),
    the first of ENGINES among `supported` (default: this torch build's)."""
    supported = torch.backends.quantized.supported_engines if supported is None else supported
    chosen = next((name for name in ENGINES if name in supported), None)
    if chosen is None:
        raise RuntimeError(f"this torch build has no int8 CPU engine (it supports {supported}); serve in float")
    return chosen


def qconfig_mapping(name: str) -> QConfigMapping:
    """Engine `name`'s default static qconfig (weights int8 per channel, symmetric; activations quint8 per
    tensor, histogram observers that pick the range minimising quantisation error) everywhere but FLOAT_MODULES."""
    mapping = QConfigMapping().set_global(get_default_qconfig(name))
    for module in FLOAT_MODULES:
        mapping.set_module_name(module, None)
    return mapping


@torch.inference_mode(False)
@torch.no_grad()
def quantize_int8(backbone: EfficientNetLite0Features, calibration: torch.Tensor, resolution: int,
                  batch_size: int = 32) -> EfficientNetLite0Features:
    """An int8 copy of `backbone` (CPU only), its activation ranges observed on uint8 `calibration` images."""
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    if len(calibration) == 0:
        raise ValueError("int8 calibration needs at least one image")
    quantized = copy.deepcopy(backbone).cpu().eval()
    net = plain_layers(quantized.net, resolution)
    pixels = [EfficientNetLite0Features.preprocess(torch.as_tensor(calibration[i : i + batch_size]), resolution)
              for i in range(0, len(calibration), batch_size)]
    name = engine()
    torch.backends.quantized.engine = name
    backend = {"backend_config": get_onednn_backend_config()} if name == "onednn" else {}
    with warnings.catch_warnings():  # torch.ao's notice that FX quantisation is moving to torchao
        warnings.simplefilter("ignore")
        prepared = prepare_fx(net, qconfig_mapping(name), example_inputs=(pixels[0],), **backend)
        for batch in pixels:
            prepared(batch)
        quantized.net = convert_fx(prepared, **backend)
    return quantized


def serialized_bytes(module: nn.Module) -> int:
    """Size of a module as saved, the model size the int8 table reports: its state dict as `torch.save` writes
    it, or a TorchScript module (frozen: its weights are constants, not state) as `torch.jit.save` writes it."""
    import io

    buffer = io.BytesIO()
    if isinstance(module, torch.jit.ScriptModule):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice (see inference.scripted)
            torch.jit.save(module, buffer)
    else:
        torch.save(module.state_dict(), buffer)
    return buffer.getbuffer().nbytes
