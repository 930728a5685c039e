"""Back-propagation training of any encoder with the shared code head: the baseline the layer-local trainers are compared to.

Loss per mini-batch: the hashing layer relaxed by tanh, h = tanh(F(x)), a linear classifier on h with
cross-entropy (single-label), binary cross-entropy (multi-label) or the squared loss of the code head,
plus an optional quantisation term μ·||h − sgn(h)||². Codes are sgn(F(x)) as for every encoder.
Under a torch.distributed group (torchrun, or spawned workers) it runs data-parallel with PyTorch's
DistributedDataParallel: every rank is given the whole training set and takes its strided share of each
global mini-batch (the same mini-batches as one process), DDP averages the gradients (the time its
all-reduces are in flight is recorded as `comm_time`); 'cuda' means each rank's own GPU.
The input is whatever `InputSpec.prepare` produced, so CNN encoders reuse this trainer unchanged.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from vdsh.training.distributed import CommClock, data_parallel, rank_and_world, rank_device
from vdsh.training.trainers.base import Trainer
from vdsh.training.validation import Validation, evaluate_encoder
from vdsh.training.encoders.mlp import DeepMLP, identity_hidden_layers


@dataclass
class BackpropOptions:
    """Back-prop options; defaults follow the issue's reference runs (SGD, one-cycle, batch 512)."""

    epochs: int = 15
    batch_size: int = 512
    optimizer: str = "sgd"  # 'sgd' or 'adam'
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "onecycle"  # 'onecycle', 'cosine', 'step' or 'constant'
    step_every: int = 5  # epochs between ×0.1 decays of the 'step' schedule
    loss: str = "auto"  # 'auto' (cross-entropy, or BCE for multi-label), 'squared'
    quantisation: float = 0.0
    label_smoothing: float = 0.0  # single-label: softmax targets (1 - s) + s/L; multi-label: BCE targets pulled s/2 to 1/2
    init: str = "encoder"  # 'encoder' (its own init, MSRA for the MLP) or 'identity' (DeepMLP hidden layers W = I, b = 0)
    plain_classifier: bool = False  # no tanh head: the encoder's outputs are the class scores (classifier baseline)
    channels_last: bool = False  # NHWC memory format for image encoders (faster convs: tensor cores, oneDNN)
    device: str = "cpu"
    dtype: str = "float32"  # 'bfloat16' runs forward/backward under autocast (CUDA)
    eval_every: int = 1
    eval_size: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.schedule not in ("onecycle", "cosine", "step", "constant"):
            raise ValueError(f"schedule must be onecycle, cosine, step or constant, got {self.schedule!r}")
        if self.loss not in ("auto", "squared"):
            raise ValueError(f"loss must be 'auto' or 'squared', got {self.loss!r}")
        if self.init not in ("encoder", "identity"):
            raise ValueError(f"init must be 'encoder' or 'identity', got {self.init!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs, batch_size and lr must be positive")


def make_optimizer(params: list[nn.Parameter], opt: BackpropOptions) -> torch.optim.Optimizer:
    if opt.optimizer == "adam":
        return torch.optim.AdamW(params, lr=opt.lr, weight_decay=opt.weight_decay)
    return torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum, nesterov=opt.nesterov and opt.momentum > 0, weight_decay=opt.weight_decay)


def make_schedule(optimizer: torch.optim.Optimizer, opt: BackpropOptions, steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step LR schedule; 'step' decays ×0.1 every `step_every` epochs."""
    total = opt.epochs * steps_per_epoch
    if opt.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=opt.lr, total_steps=total)
    if opt.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    if opt.schedule == "step":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.1 ** (s // (opt.step_every * steps_per_epoch)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str, smoothing: float = 0.0) -> torch.Tensor:
    if kind == "squared":
        return (labels - logits).pow(2).sum(1).mean()
    if bool((labels.sum(1) == 1).all()):
        return nn.functional.cross_entropy(logits, labels.argmax(1), label_smoothing=smoothing)
    return nn.functional.binary_cross_entropy_with_logits(logits, labels * (1 - smoothing) + smoothing / 2)


class BackpropTrainer(Trainer):
    """SGD/Adam on tanh-relaxed codes + linear classifier; `fit` returns (encoder, history)."""

    options_class = BackpropOptions
    takes_augmentation = True  # applied to each mini-batch on the device

    def fit(self, encoder: nn.Module, features: torch.Tensor, labels: torch.Tensor, validation: Validation | None = None) -> tuple[nn.Module, list[dict]]:
        opt = self.options
        if len(features) != len(labels):
            raise ValueError(f"features and labels differ in length: {len(features)} vs {len(labels)}")
        torch.manual_seed(opt.seed)
        if opt.init == "identity":
            if not isinstance(encoder, DeepMLP):
                raise ValueError("init='identity' applies to a DeepMLP's square hidden layers only")
            identity_hidden_layers(encoder)
        device = rank_device(opt.device)
        memory_format = torch.channels_last if opt.channels_last else torch.preserve_format
        encoder.to(device, memory_format=memory_format).train()
        x, y = features.to(device).float(), labels.to(device).float()
        bits = int(encoder.config()["bits"])
        if opt.plain_classifier and bits != y.shape[1]:
            raise ValueError(f"a plain classifier needs one encoder output per class ({y.shape[1]}), has {bits}")
        classifier = nn.Identity() if opt.plain_classifier else nn.Linear(bits, y.shape[1]).to(device)
        params = list(encoder.parameters()) + list(classifier.parameters())
        rank, world = rank_and_world()
        clock = CommClock()
        model, head = (data_parallel(encoder, clock), data_parallel(classifier, clock)) if world > 1 else (encoder, classifier)
        optimizer = make_optimizer(params, opt)
        steps = math.ceil(len(x) / opt.batch_size)
        schedule = make_schedule(optimizer, opt, steps)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=opt.dtype == "bfloat16")
        history: list[dict] = []
        start = time.perf_counter()
        for epoch in range(1, opt.epochs + 1):
            total, seen = 0.0, 0
            for idx in torch.randperm(len(x), device=device).split(opt.batch_size):
                idx = idx[rank::world]  # this rank's share of the global mini-batch (all of it in one process)
                inputs = self.augment(x[idx]) if self.augment else x[idx]
                with autocast:
                    out = model(inputs.contiguous(memory_format=memory_format))
                    h = out if opt.plain_classifier else torch.tanh(out)
                    loss = classification_loss(head(h).float(), y[idx], opt.loss, opt.label_smoothing)
                    if opt.quantisation > 0 and not opt.plain_classifier:
                        loss = loss + opt.quantisation * (h.float() - torch.sign(h.float())).pow(2).sum(1).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total += float(loss.detach()) * len(idx)
                seen += len(idx)
            record = {"epoch": epoch, "sweep": epoch, "time": time.perf_counter() - start, "loss": total / seen,
                      "lr": optimizer.param_groups[0]["lr"]}
            if world > 1:
                record["comm_time"] = clock.seconds
            history.append(close_epoch(record, encoder, x, y, validation, opt, self.progress))
        return encoder.eval(), history


def close_epoch(record: dict, encoder: nn.Module, x: torch.Tensor, y: torch.Tensor, validation: Validation | None,
                opt: BackpropOptions, progress: Callable[[dict], None] | None) -> dict:
    """End of an epoch for every back-prop-style trainer: flag divergence, evaluate on schedule, report."""
    if not math.isfinite(record["loss"]):
        record["diverged"] = True
    if (opt.eval_every and record["epoch"] % opt.eval_every == 0) or record["epoch"] == opt.epochs:
        record.update(evaluate_encoder(encoder, x, y, validation, opt.eval_size, opt.seed))
        encoder.train()
    if progress:
        progress(record)
    return record
