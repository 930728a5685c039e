"""Feature extractors behind one registry: what turns uint8 images into the vectors an encoder hashes.

- `pixels`: the image itself, flattened (trainers normalise it per channel; shallow hashers take /255).
- `gist`: GIST-512 descriptors (`vdsh.data.gist`), the literature's input on CIFAR-10.
- `efficientnet-lite0`: ImageNet-pretrained EfficientNet-Lite0, frozen, at a chosen input resolution
  (`vdsh.training.features.efficientnet`; needs the `pretrained` extra).

Vector features (everything but pixels) of a whole dataset are computed once per extractor and
resolution (on the GPU where there is one) and cached under `cache_dir()/features/`. Importing this module does not import timm.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from vdsh.training.features.efficientnet import FEATURE_DIM, WEIGHTS_SHA256  # constants only: timm loads lazily


@dataclass(frozen=True)
class FeatureKind:
    """A registered feature extractor: whether it takes an input resolution, its default one, its output size."""

    name: str
    backbone: bool  # a pretrained network, run at `resolution` pixels
    default_resolution: int | None = None
    dim: int | None = None  # None: depends on the image (pixels)
    weights_sha256: str | None = None  # a backbone's weights file, checked before loading


FEATURES = {
    "pixels": FeatureKind("pixels", backbone=False),
    "gist": FeatureKind("gist", backbone=False, dim=512),
    "efficientnet-lite0": FeatureKind("efficientnet-lite0", backbone=True, default_resolution=160, dim=FEATURE_DIM,
                                      weights_sha256=WEIGHTS_SHA256),
}


def feature_kind(name: str) -> FeatureKind:
    if name not in FEATURES:
        raise ValueError(f"unknown features {name!r}; known: {', '.join(FEATURES)}")
    return FEATURES[name]


def resolution_for(name: str, resolution: int | None) -> int | None:
    """The input resolution an extractor runs at: the given one, its default, or None (no backbone)."""
    kind = feature_kind(name)
    if not kind.backbone:
        if resolution is not None:
            raise ValueError(f"--resolution applies to pretrained backbones, not to {name!r} features")
        return None
    resolution = resolution or kind.default_resolution
    if not 32 <= resolution <= 1024:
        raise ValueError(f"resolution must be between 32 and 1024 pixels, got {resolution}")
    return resolution


def load_backbone(name: str, pretrained: bool = True) -> nn.Module:
    """The frozen network of a backbone feature kind (a shared CPU instance; see `efficientnet`)."""
    if not feature_kind(name).backbone:
        raise ValueError(f"{name!r} features have no backbone network")
    from vdsh.training.features.efficientnet import pretrained_backbone

    return pretrained_backbone(pretrained)


def feature_vectors(name: str, images: torch.Tensor | np.ndarray, resolution: int | None = None,
                    backbone: nn.Module | None = None, progress: bool = False) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> float32 (N, D) features of kind `name` (on the CPU for backbones).

    backbone: the network to run (e.g. an int8 one); default the shared pretrained instance.
    """
    kind = feature_kind(name)
    if name == "pixels":
        return torch.as_tensor(np.asarray(images)).flatten(1).float() / 255
    if name == "gist":
        from vdsh.data.gist import gist_features

        return gist_features(images)
    from vdsh.training.features.efficientnet import backbone_features

    return backbone_features(backbone or load_backbone(kind.name), images, resolution_for(name, resolution),
                             progress=progress)


def cached_feature_vectors(name: str, images: np.ndarray, dataset: str, resolution: int | None = None) -> torch.Tensor:
    """`feature_vectors` of a whole image array, computed once (with a progress bar) and then read from the cache.

    Key: the extractor, its resolution and a content hash of the images; GIST keeps its own cache folder.
    """
    if name == "gist":
        from vdsh.data.gist import cached_gist_features

        return cached_gist_features(images, name=dataset)
    if name == "pixels":
        return feature_vectors(name, images)
    from vdsh.data.cache import cached_array, images_fingerprint
    from vdsh.data.paths import cache_dir

    resolution = resolution_for(name, resolution)
    folder = cache_dir() / "features" / f"{name}-{resolution}"
    path = folder / f"{dataset}-{images_fingerprint(images, f'{name}-{resolution}-v1')}.npy"
    return torch.from_numpy(cached_array(path, lambda: feature_vectors(name, images, resolution, extraction_backbone(name, resolution),
                                                                       progress=True).numpy()))


def cached_trunk_maps(name: str, images: np.ndarray, dataset: str, resolution: int | None, tail_stages: int) -> np.ndarray:
    """float16 maps of a whole image array entering a backbone's last `tail_stages` stages, computed once and cached:
    what fine-tuning those stages (`vdsh.training.features.finetune`) and a fine-tuned model's features start from."""
    from vdsh.data.cache import cached_array, images_fingerprint
    from vdsh.data.paths import cache_dir
    from vdsh.training.features.efficientnet import trunk_maps

    resolution = resolution_for(name, resolution)
    folder = cache_dir() / "features" / f"{name}-{resolution}-trunk-{tail_stages}"
    path = folder / f"{dataset}-{images_fingerprint(images, f'{name}-{resolution}-trunk-{tail_stages}-v1')}.npy"
    return cached_array(path, lambda: trunk_maps(extraction_backbone(name), images, resolution, tail_stages,
                                                 progress=True))


def extraction_backbone(name: str, resolution: int | None = None) -> nn.Module:
    """The network that extracts a whole dataset's features, on the GPU where there is one: with a resolution, an
    inference-only copy with batch norm folded (`inference.folded`); without, the trainable network (for trunk maps)."""
    backbone = load_backbone(name)
    if resolution is not None:
        from vdsh.training.features.inference import folded

        backbone = folded(backbone, resolution)
    elif torch.cuda.is_available():
        backbone = copy.deepcopy(backbone)
    return backbone.cuda() if torch.cuda.is_available() else backbone
