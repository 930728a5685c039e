"""Inference-only rewrites of a backbone for one input resolution: plain layers, batch norm folded away.

timm's TF-ported EfficientNet computes its 'same' padding from each input's size (`Conv2dSame`) and keeps
batch norm as separate layers (`BatchNormAct2d`); both cost time at inference and block FX. `plain_layers`
rewrites them into fixed padding + `Conv2d` and `BatchNorm2d` + activation for one resolution (vdsh always
resizes to the model's), which int8 quantisation builds on; `folded` then folds each batch norm into the
convolution before it, one pass over memory fewer per layer, same outputs up to float rounding. `scripted`
runs a folded or int8 network as frozen TorchScript, without Python's overhead for each of its ~250 modules,
a large share of a single image's time on a CPU (BENCHMARKS.md, "int8 backbone"). All are for inference: a
folded network has no batch-norm layers left to fine-tune.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from vdsh.training.features.efficientnet import EfficientNetLite0Features


def plain_layers(net: nn.Module, resolution: int) -> nn.Module:
    """Replace timm's `Conv2dSame` and `BatchNormAct2d` in `net` by equivalent plain layers (in place) for inputs
    of `resolution` pixels a side; the outputs are unchanged."""
    from timm.layers import BatchNormAct2d
    from timm.layers.conv2d_same import Conv2dSame
    from timm.layers.padding import get_same_padding

    input_sizes: dict[str, tuple[int, int]] = {}

    def record(name: str):
        def hook(_: nn.Module, args: tuple) -> None:
            input_sizes[name] = tuple(args[0].shape[-2:])
        return hook

    hooks = [module.register_forward_pre_hook(record(name)) for name, module in net.named_modules()
             if isinstance(module, Conv2dSame)]
    with torch.no_grad():
        net(torch.zeros(1, 3, resolution, resolution))
    for hook in hooks:
        hook.remove()
    for name, module in list(net.named_modules()):
        if isinstance(module, Conv2dSame):
            (ih, iw), (kh, kw) = input_sizes[name], module.kernel_size
            pad_h = get_same_padding(ih, kh, module.stride[0], module.dilation[0])
            pad_w = get_same_padding(iw, kw, module.stride[1], module.dilation[1])
            conv = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride, 0,
                             module.dilation, module.groups, module.bias is not None)
            conv.load_state_dict(module.state_dict())
            plain = nn.Sequential(nn.ZeroPad2d((pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)), conv)
        elif isinstance(module, BatchNormAct2d):
            norm = nn.BatchNorm2d(module.num_features, module.eps, module.momentum)
            norm.load_state_dict(module.state_dict())
            plain = nn.Sequential(norm, module.drop, module.act)
        else:
            continue
        parent, _, attribute = name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, attribute, plain)
    return net.eval()


def folded(backbone: EfficientNetLite0Features, resolution: int) -> EfficientNetLite0Features:
    """An inference-only copy of `backbone` for inputs of `resolution` pixels, batch norm folded into the convolutions."""
    from torch.fx.experimental.optimization import fuse

    copied = copy.deepcopy(backbone).eval()
    copied.net = fuse(plain_layers(copied.net, resolution))
    return copied


def scripted(net: nn.Module, resolution: int) -> nn.Module:
    """`net` traced on one image of `resolution` pixels and frozen (its weights become constants): the same outputs
    at any batch size, without the Python dispatch of every module. TorchScript is deprecated in favour of
    torch.compile, which needs a C++ toolchain at run time that a serving machine may lack; where tracing is
    gone or fails, `net` is returned as it is."""
    example = torch.zeros(1, 3, resolution, resolution).contiguous(memory_format=torch.channels_last)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", FutureWarning)  # the deprecation notice
            # int8 graphs read their quantisation scales as Python floats: constants, which they are once calibrated
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return torch.jit.freeze(torch.jit.trace(net.eval(), example))
    except (AttributeError, RuntimeError):
        return net
