"""The hybrid most users want: a back-prop CNN trunk whose features feed a deep plain MLP trained by ProxProp.

Stage 1, the trunk: a CNN (small_cnn, resnet9, dwsep) trained by back-propagation exactly as
`cnn_training.train_cnn` trains it; by default as a plain classifier (PROTOCOL.md's classifier-baseline
network), so the trunk does not depend on the code length and every hashing decision is the head's.
Stage 2, the head: the trunk's penultimate features (`ImageEncoder.features`: globally pooled, ReLU'd)
of the training images, standardised per feature, train a plain `DeepMLP` with `ProxPropTrainer`,
used only through its public `fit`. The trunk is frozen in stage 2 (no gradient, BN in eval mode).

One model, one file: `cnn_mlp.CnnMlpEncoder` (kind "cnn_mlp") composes the trunk and the MLP, so
`vdsh eval --model`, `vdsh index build` and the server use it unchanged. The standardisation is folded
into the MLP's first layer (W' = W / σ, b' = b − W' μ): exact, and the file holds only the two networks.
Measured figures: BENCHMARKS.md, "CNN trainers".
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch

from vdsh.training.trainers.proxprop import ProxPropOptions, ProxPropTrainer
from vdsh.training.validation import Validation
from vdsh.training.augment import Augmentation
from vdsh.training.trainers.backprop import BackpropOptions
from vdsh.training.encoders.cnn import ImageEncoder
from vdsh.training.encoders.cnn_mlp import CnnMlpEncoder
from vdsh.training.trainers.cnn_backprop import CNN_OPTIONS, image_spec, train_cnn
from vdsh.training.encoders.mlp import DeepMLP
from vdsh.training.encoders.model import HashingModel, InputSpec


@dataclass
class HybridOptions:
    """Trunk (back-prop, `cnn_training`'s recipe) and head (ProxProp on a plain MLP) options."""

    trunk: BackpropOptions = field(default_factory=lambda: CNN_OPTIONS)
    head: ProxPropOptions = field(default_factory=lambda: ProxPropOptions(sweeps=10))
    # Head size: depths 3, 4 and 8 at width 256 scored alike in a screen on mnist-sample (small_cnn width 8, 4 trunk
    # epochs, 2,000 images, 10 sweeps, 48 bits), and a hashing-objective trunk did no better than the classifier one.
    mlp_depth: int = 4  # weight layers of the head
    mlp_width: int = 256  # hidden units of the head
    trunk_objective: str = "classifier"  # 'classifier' (cross-entropy on the classes) or 'hashing' (tanh code head)

    def __post_init__(self) -> None:
        if self.trunk_objective not in ("classifier", "hashing"):
            raise ValueError(f"trunk_objective must be 'classifier' or 'hashing', got {self.trunk_objective!r}")
        if self.mlp_depth < 2 or self.mlp_width < 1:
            raise ValueError(f"the head needs mlp_depth >= 2 and mlp_width >= 1, got {self.mlp_depth}, {self.mlp_width}")


@torch.no_grad()
def trunk_features(trunk: ImageEncoder, spec: InputSpec, images: np.ndarray | torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Penultimate features (N, feature_dim) on the CPU of uint8 images, prepared and encoded in batches on the
    trunk's device, eval mode (BN running statistics)."""
    trunk.eval()
    device = next(trunk.parameters()).device
    batches = (spec.prepare(torch.as_tensor(np.asarray(images[i : i + batch_size])).to(device)) for i in range(0, len(images), batch_size))
    return torch.cat([trunk.features(x).float().cpu() for x in batches])


@torch.no_grad()
def fold_standardisation(mlp: DeepMLP, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Make mlp(f) compute what it computed on (f − mean) / std: W' = W / std, b' = b − W' mean."""
    first = mlp.linears[0]
    first.weight.div_(std)
    first.bias.sub_(first.weight @ mean)


def feature_validation(trunk: ImageEncoder, spec: InputSpec, validation: Validation | None, mean: torch.Tensor,
                       std: torch.Tensor) -> Validation | None:
    """The validation images (uint8) as standardised trunk features: what the head is scored on."""
    if validation is None:
        return None
    feats = lambda images: (trunk_features(trunk, spec, images) - mean) / std  # noqa: E731
    labels = lambda y: torch.as_tensor(y).float()  # noqa: E731
    return Validation(feats(validation.query), labels(validation.query_labels), feats(validation.database),
                      labels(validation.database_labels))


def train_trunk(kind: str, images: np.ndarray, labels: np.ndarray, bits: int, width: int | None, options: HybridOptions,
                augmentation: Augmentation | None, progress: Callable[[dict], None] | None = None,
                ) -> tuple[ImageEncoder, list[dict]]:
    """Stage 1: `train_cnn` as a classifier (or hashing net); returns the bare CNN and its history."""
    as_classifier = options.trunk_objective == "classifier"
    model, history = train_cnn(kind, images, labels, bits, width, options.trunk, augmentation, classifier_baseline=as_classifier,
                               progress=progress)
    return (model.encoder.classifier if as_classifier else model.encoder), history


def train_hybrid(kind: str, images: np.ndarray, labels: np.ndarray, bits: int, width: int | None = None,
                 options: HybridOptions | None = None, augmentation: Augmentation | None = None,
                 validation: Validation | None = None, progress: Callable[[dict], None] | None = None,
                 ) -> tuple[HashingModel, list[dict]]:
    """uint8 images (N, C, H, H), multi-hot labels (N, L) -> (HashingModel of a CnnMlpEncoder, history).

    validation: held-out uint8 images and labels; the ProxProp head keeps the sweep with the best mAP on them.
    History: the trunk's epochs ("stage": "trunk") then the head's sweeps ("stage": "head"), one clock that
    also counts the extraction of the training features between them. progress: called after every trunk
    epoch and every head sweep.
    """
    options = options or HybridOptions()
    torch.manual_seed(options.trunk.seed)  # the trunk's initial weights
    trunk, trunk_history = train_trunk(kind, images, labels, bits, width, options, augmentation, progress)
    spec = image_spec(images)
    extraction_start = time.perf_counter()
    trunk.to(options.trunk.device)
    features = trunk_features(trunk, spec, images)
    extraction_s = time.perf_counter() - extraction_start
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    head_validation = feature_validation(trunk, spec, validation, mean, std)
    torch.manual_seed(options.head.seed)
    mlp = DeepMLP(trunk.feature_dim, options.mlp_depth, options.mlp_width, bits)
    mlp, head_history = ProxPropTrainer(options.head, progress).fit(mlp, (features - mean) / std,
                                                                torch.as_tensor(labels).float(), head_validation)
    mlp = mlp.cpu()
    fold_standardisation(mlp, mean, std)
    offset = (trunk_history[-1]["time"] if trunk_history else 0.0) + extraction_s  # the training features' extraction counts
    history = [{**r, "stage": "trunk"} for r in trunk_history]
    history += [{**r, "stage": "head", "time": offset + r["time"]} for r in head_history]
    return HashingModel(CnnMlpEncoder(trunk.cpu(), mlp).eval(), spec), history


def hybrid_options(trunk_epochs: int, mlp_depth: int, device: str, seed: int, extra: dict | None = None) -> HybridOptions:
    """HybridOptions from the CLI: --epochs (trunk), --depth (head), and JSON extras, whose 'trunk' and 'head'
    dictionaries override BackpropOptions and ProxPropOptions fields; other keys are HybridOptions fields."""
    extra = dict(extra or {})
    trunk = replace(CNN_OPTIONS, epochs=trunk_epochs, device=device, seed=seed,
                    dtype="bfloat16" if device.startswith("cuda") else "float32", **extra.pop("trunk", {}))
    head = ProxPropOptions(**{"sweeps": 10, "device": device, "seed": seed, **extra.pop("head", {})})
    return HybridOptions(trunk=trunk, head=head, mlp_depth=mlp_depth, **extra)
