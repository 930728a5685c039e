"""The hybrid most users want: a back-prop CNN trunk whose features feed a deep plain MLP trained by ProxProp.

Stage 1, the trunk: a CNN (small_cnn, resnet9, dwsep) trained by back-propagation exactly as
`vdsh train --encoder ...` trains it (`BackpropTrainer`, `cnn_backprop.CNN_OPTIONS`); by default as a plain classifier (PROTOCOL.md's classifier-baseline
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

import torch

from vdsh.training.encoders.cnn import ImageEncoder
from vdsh.training.encoders.cnn_mlp import CnnMlpEncoder
from vdsh.training.encoders.mlp import DeepMLP
from vdsh.training.trainers.backprop import BackpropOptions, BackpropTrainer
from vdsh.training.trainers.base import Trainer
from vdsh.training.trainers.cnn_backprop import CNN_OPTIONS
from vdsh.training.trainers.proxprop import ProxPropOptions, ProxPropTrainer
from vdsh.training.validation import Validation


@dataclass
class HybridOptions:
    """Trunk (back-prop, `cnn_backprop.CNN_OPTIONS`) and head (ProxProp on a plain MLP) options."""

    trunk: BackpropOptions = field(default_factory=lambda: CNN_OPTIONS)
    head: ProxPropOptions = field(default_factory=lambda: ProxPropOptions(sweeps=10))
    # Head size: depths 3, 4 and 8 at width 256 scored alike in a screen on mnist-sample (small_cnn width 8, 4 trunk
    # epochs, 2,000 images, 10 sweeps, 48 bits), and a hashing-objective trunk did no better than the classifier one.
    mlp_depth: int = 4  # weight layers of the head
    mlp_width: int = 256  # hidden units of the head
    trunk_objective: str = "classifier"  # 'classifier' (cross-entropy on the classes) or 'hashing' (tanh code head)
    bits: int = 48  # the code length: the head's outputs (the trunk's are the classes, or these bits)

    @property
    def steps(self) -> int:
        """Progress steps: trunk epochs, then head sweeps."""
        return self.trunk.epochs + self.head.sweeps

    def __post_init__(self) -> None:
        if self.trunk_objective not in ("classifier", "hashing"):
            raise ValueError(f"trunk_objective must be 'classifier' or 'hashing', got {self.trunk_objective!r}")
        if self.mlp_depth < 2 or self.mlp_width < 1:
            raise ValueError(f"the head needs mlp_depth >= 2 and mlp_width >= 1, got {self.mlp_depth}, {self.mlp_width}")


@torch.no_grad()
def trunk_features(trunk: ImageEncoder, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Penultimate features (N, feature_dim) on the CPU of prepared images, in batches on the trunk's device, eval
    mode (BN running statistics)."""
    trunk.eval()
    device = next(trunk.parameters()).device
    return torch.cat([trunk.features(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)])


@torch.no_grad()
def fold_standardisation(mlp: DeepMLP, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Make mlp(f) compute what it computed on (f − mean) / std: W' = W / std, b' = b − W' mean."""
    first = mlp.linears[0]
    first.weight.div_(std)
    first.bias.sub_(first.weight @ mean)


class HybridTrainer(Trainer):
    """Stage 1 trains the CNN it is given (built with one output per class for the classifier trunk objective, else
    `bits`); stage 2 a ProxProp MLP head on its features. `fit` returns the `CnnMlpEncoder` of both.

    History: the trunk's epochs ("stage": "trunk") then the head's sweeps ("stage": "head"), one clock that also
    counts the extraction of the training features between them.
    """

    options_class = HybridOptions
    takes_augmentation = True  # the trunk's mini-batches

    def fit(self, encoder: ImageEncoder, x: torch.Tensor, y: torch.Tensor,
            validation: Validation | None = None) -> tuple[CnnMlpEncoder, list[dict]]:
        if not isinstance(encoder, ImageEncoder):
            raise ValueError(f"the hybrid's trunk is a CNN encoder (small_cnn, resnet9, dwsep), got {type(encoder).__name__}")
        opt = self.options
        as_classifier = opt.trunk_objective == "classifier"
        trunk_options = replace(opt.trunk, plain_classifier=as_classifier)
        trunk, trunk_history = BackpropTrainer(trunk_options, self.progress, self.augment).fit(encoder, x, y)
        extraction_start = time.perf_counter()
        features = trunk_features(trunk, x)
        extraction_s = time.perf_counter() - extraction_start
        mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
        head_validation = None if validation is None else Validation(
            (trunk_features(trunk, validation.query) - mean) / std, validation.query_labels,
            (trunk_features(trunk, validation.database) - mean) / std, validation.database_labels)
        torch.manual_seed(opt.head.seed)
        mlp = DeepMLP(trunk.feature_dim, opt.mlp_depth, opt.mlp_width, opt.bits)
        mlp, head_history = ProxPropTrainer(opt.head, self.progress).fit(mlp, (features - mean) / std, y.cpu(), head_validation)
        mlp = mlp.cpu()
        fold_standardisation(mlp, mean, std)
        offset = (trunk_history[-1]["time"] if trunk_history else 0.0) + extraction_s  # the training features' extraction counts
        history = [{**r, "stage": "trunk"} for r in trunk_history]
        history += [{**r, "stage": "head", "time": offset + r["time"]} for r in head_history]
        return CnnMlpEncoder(trunk.cpu(), mlp).eval(), history


def hybrid_options(settings: dict) -> HybridOptions:
    """HybridOptions from the pipeline's settings: epochs (the trunk's), depth (the head's), device, seed, bits, and
    extras whose 'trunk' and 'head' dictionaries override BackpropOptions and ProxPropOptions fields; other keys
    are HybridOptions fields."""
    extra = dict(settings)
    device, seed = extra.pop("device", "cpu"), extra.pop("seed", 0)
    trunk = replace(CNN_OPTIONS, epochs=extra.pop("epochs", CNN_OPTIONS.epochs), device=device, seed=seed,
                    dtype="bfloat16" if device.startswith("cuda") else "float32", **extra.pop("trunk", {}))
    head = ProxPropOptions(**{"sweeps": 10, "device": device, "seed": seed, **extra.pop("head", {})})
    return HybridOptions(trunk=trunk, head=head, **extra)
