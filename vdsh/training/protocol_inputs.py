"""A protocol's images made trainer input: the input spec, `prepare(indices)`, and the validation slice.

Two kinds of input: vectors for MLPs and shallow hashers (pixels, GIST or a pretrained backbone's
features, the dataset's default from its `DatasetInfo`), and normalised images for CNNs. Either way the
spec that turns uint8 images into that input is saved with the model, so serving prepares a photo the
same way training did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from vdsh.data.datasets import dataset_info
from vdsh.data.imageset import ImageSet
from vdsh.data.protocols import ProtocolSplit, load_protocol
from vdsh.training.encoders.model import InputSpec
from vdsh.training.features import FEATURES, cached_feature_vectors, cached_trunk_maps, load_backbone, resolution_for
from vdsh.training.features.finetune import FinetuneOptions, finetune_tail, tail_features
from vdsh.training.validation import Validation

CALIBRATION_IMAGES = 128  # training images kept in a backbone model's file for int8 calibration
PREPARE_CHUNK = 8192  # images prepared at a time (bounds the float copy of uint8 images)


@dataclass
class ProtocolInputs:
    """A protocol's pool and split, and how any of its images become encoder input (`prepare(indices)`)."""

    images: ImageSet
    split: ProtocolSplit
    spec: InputSpec
    prepare: Callable[[np.ndarray], torch.Tensor]
    backbone: nn.Module | None = None  # a fine-tuned backbone, which the model keeps (frozen ones are shared)
    finetune_history: list[dict] | None = None

    @property
    def labels(self) -> torch.Tensor:
        return torch.as_tensor(np.asarray(self.images.labels)).float()


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images on the [0, 1] scale."""
    x = torch.as_tensor(images).float().div_(255)
    return x.mean((0, 2, 3)).tolist(), x.std((0, 2, 3)).clamp_min(1e-6).tolist()


def image_spec(train_images: np.ndarray) -> InputSpec:
    """A CNN's input: images normalised per channel with the training images' own statistics."""
    if train_images.ndim != 4 or train_images.shape[2] != train_images.shape[3]:
        raise ValueError(f"CNN training needs square uint8 images (N, C, H, H), got {train_images.shape}")
    return InputSpec(train_images.shape[1], train_images.shape[2], "image", *channel_stats(train_images))


def pixel_spec(dataset: str, train_images: np.ndarray) -> InputSpec:
    """An MLP's pixel input: flattened, normalised per channel with the dataset's fixed statistics where it names
    them (MNIST's usual mean and std), else with the training images' own."""
    stats = dataset_info(dataset).pixel_stats
    mean, std = (list(stats[0]), list(stats[1])) if stats else channel_stats(train_images)
    return InputSpec(train_images.shape[1], train_images.shape[2], "pixels", mean, std)


def prepare_images(spec: InputSpec, images: np.ndarray, device: str = "cpu") -> torch.Tensor:
    """uint8 images -> encoder input on `device`, a chunk at a time."""
    return torch.cat([spec.prepare(torch.as_tensor(np.asarray(images[i : i + PREPARE_CHUNK])).to(device))
                      for i in range(0, len(images), PREPARE_CHUNK)])


def protocol_inputs(protocol: str, data_root: str | None = None, seed: int = 0, protocol_options: dict | None = None,
                    features: str | None = None, resolution: int | None = None, images: bool = False,
                    finetune: FinetuneOptions | None = None, progress=None) -> ProtocolInputs:
    """Load a protocol and say how its images become input.

    images True: normalised images for a CNN (features must be None). Otherwise vectors: `features` is a kind of
    `vdsh.training.features` (default: the dataset's); GIST and backbone features are computed once for the whole
    pool, cached, and standardised with training-set statistics, which the spec keeps. finetune: first fine-tune
    the backbone's last stages on the training labels (`vdsh.training.features.finetune`; progress: called with
    each epoch's record) and take the tuned backbone's features. protocol_options: keyword arguments of `load_protocol`.
    """
    pool, split = load_protocol(protocol, data_root, seed, **(protocol_options or {}))
    dataset = split.spec.dataset
    train_images = np.asarray(pool.images[split.train])
    if images:
        if features is not None or resolution is not None or finetune is not None:
            raise ValueError("features, resolution and fine-tuning apply to MLPs and shallow hashers, not to CNNs")
        spec = image_spec(train_images)
        return ProtocolInputs(pool, split, spec, lambda idx: prepare_images(spec, pool.images[idx]))
    features = features or dataset_info(dataset).features
    if features not in FEATURES:
        raise ValueError(f"features must be one of {', '.join(FEATURES)}, got {features!r}")
    resolution = resolution_for(features, resolution)
    if finetune is not None and not FEATURES[features].backbone:
        raise ValueError(f"fine-tuning needs a pretrained backbone's features, not {features!r}")
    if features == "pixels":
        spec = pixel_spec(dataset, train_images)
        return ProtocolInputs(pool, split, spec, lambda idx: prepare_images(spec, pool.images[idx]))
    backbone, history = None, None
    if finetune is None:
        vectors = cached_feature_vectors(features, np.asarray(pool.images), pool.name, resolution)
    else:
        maps = cached_trunk_maps(features, np.asarray(pool.images), pool.name, resolution, finetune.stages)
        labels = torch.as_tensor(np.asarray(pool.labels)[split.train]).float()
        backbone, history = finetune_tail(load_backbone(features), maps[split.train], labels, finetune, progress)
        vectors = tail_features(backbone, maps, finetune.stages)
    train = vectors[split.train]  # standardised with training statistics only, kept in the model's spec
    spec = InputSpec(pool.images.shape[1], pool.images.shape[2], features, train.mean(0).tolist(),
                     train.std(0).clamp_min(1e-6).tolist(), resolution, FEATURES[features].weights_sha256,
                     finetune.stages if finetune else 0)
    return ProtocolInputs(pool, split, spec, lambda idx: spec.standardise(vectors[idx]), backbone, history)


def calibration_images(inputs: ProtocolInputs) -> torch.Tensor | None:
    """uint8 training images kept with a backbone model for int8 calibration (evenly spaced); None otherwise."""
    if not inputs.spec.backbone:
        return None
    train = inputs.split.train
    pick = train[np.linspace(0, len(train) - 1, min(CALIBRATION_IMAGES, len(train))).astype(int)]
    return torch.as_tensor(np.asarray(inputs.images.images[pick]))


def validation_pool(split: ProtocolSplit) -> np.ndarray:
    """Database items outside the training set; the whole database where the protocol trains on all of it (mnist-69k)."""
    rest = np.setdiff1d(split.database, split.train)
    return rest if len(rest) >= 2 else split.database


def validation_source(split: ProtocolSplit) -> str:
    """Where validation slices of this split come from, in words for summaries and benchmark notes."""
    if np.isin(validation_pool(split), split.train).any():
        return "training images (the protocol trains on its whole database)"
    return "database images outside the training set"


def validation_slice(inputs: ProtocolInputs, seed: int, queries: int = 500, database: int = 2000) -> Validation:
    """Queries and database drawn from `validation_pool`: never a query, and never trained on where the protocol allows."""
    rng = np.random.default_rng(seed)
    pool = validation_pool(inputs.split)
    queries = min(queries, max(1, len(pool) // 5))  # small pools: a fifth query, the rest the database
    pick = rng.permutation(pool)[: queries + database]
    vq, vdb = np.sort(pick[:queries]), np.sort(pick[queries:])
    labels = inputs.labels
    return Validation(inputs.prepare(vq), labels[vq], inputs.prepare(vdb), labels[vdb])
