"""Back-prop training of a CNN hashing encoder with the fast-CIFAR recipe, and of its classifier baseline.

Hashing mode: h = tanh(encoder(x)) (`bits` units), a linear classifier W on h trained jointly, loss =
label-smoothed cross-entropy of W h + `quantisation` * mean((|h| - 1)^2). The tanh keeps the relaxed
codes in [-1, 1]; the quantisation term pushes them to the corners, so sgn(h), the code, loses little of
what the classifier saw (the VDSH/SDH "codes against a linear classifier" loss, relaxed for back-prop).
Classifier mode (the PROTOCOL.md baseline): the same trunk with one output per class, cross-entropy
alone, codes from `ClassScoreCode`.

Speed: the whole training set is prepared once and stays on the device; each batch is augmented there
(`augment.py`); SGD with Nesterov momentum under a one-cycle schedule (torch's OneCycleLR, linear warm-up
then linear decay); channels-last memory format; on CUDA, bf16 autocast; and `torch.compile` on request.

This is a stop-gap trainer written before the general `BackpropTrainer` (branch admm) existed; when
that lands, the pieces here that it lacks (augmentation hook, label smoothing, channels-last, bf16) are
meant to move into it and this module to shrink to the CNN defaults.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from vdsh.training.augment import Augmentation, classification_loss
from vdsh.training.classifier_baseline import ClassScoreCode
from vdsh.training.model import HashingModel, InputSpec


@dataclass
class CnnTrainConfig:
    epochs: int = 10
    batch_size: int = 256
    lr: float = 0.05  # peak of the one-cycle schedule (Nesterov SGD)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup: float = 0.2  # fraction of the steps spent ramping the learning rate up
    label_smoothing: float = 0.1
    quantisation: float = 0.1  # weight of mean((|h| - 1)^2), the pull of tanh outputs to +-1
    crop_padding: int = 4
    flip: bool = True
    classifier_baseline: bool = False  # train a plain classifier, code its class scores
    seed: int = 0
    device: str = "auto"  # auto: cuda when available
    compile: bool = False


@dataclass
class EpochRecord:
    epoch: int
    loss: float
    seconds: float  # training time so far, excluding evaluation


def training_device(name: str) -> torch.device:
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


def prepare_on_device(images: np.ndarray, spec: InputSpec, device: torch.device, chunk: int = 8192) -> torch.Tensor:
    """uint8 images -> normalised float input resident on `device` (bf16 on CUDA: half the memory, what autocast uses)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    parts = [spec.prepare(torch.as_tensor(images[i : i + chunk]).to(device)).to(dtype) for i in range(0, len(images), chunk)]
    return torch.cat(parts)


def autocast(device: torch.device):
    """bf16 autocast on CUDA (no loss scaling needed, unlike fp16); plain float32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


class HashingObjective(nn.Module):
    """tanh of the encoder's outputs, a linear classifier on them, and the loss of both."""

    def __init__(self, encoder: nn.Module, classes: int, cfg: CnnTrainConfig) -> None:
        super().__init__()
        self.encoder, self.cfg = encoder, cfg
        self.classifier = None if cfg.classifier_baseline else nn.Linear(encoder.bits, classes)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out = self.encoder(x)
        if self.classifier is None:
            return classification_loss(out, labels, self.cfg.label_smoothing)
        h = torch.tanh(out.float())
        loss = classification_loss(self.classifier(h), labels, self.cfg.label_smoothing)
        return loss + self.cfg.quantisation * (h.abs() - 1).pow(2).mean()


class CnnTrainer:
    """Trains a CNN encoder (any registered image encoder) on uint8 images and multi-hot labels."""

    def __init__(self, cfg: CnnTrainConfig | None = None) -> None:
        self.cfg = cfg or CnnTrainConfig()
        self.history: list[EpochRecord] = []

    def fit(self, encoder: nn.Module, spec: InputSpec, images: np.ndarray, labels: np.ndarray, bits: int | None = None) -> HashingModel:
        """Train in place and return the hashing model (wrapped in `ClassScoreCode(bits)` in classifier mode)."""
        cfg = self.cfg
        if spec.features != "image":
            raise ValueError(f"CNN training needs InputSpec(features='image'), got {spec.features!r}")
        if len(images) != len(labels) or len(images) == 0:
            raise ValueError(f"need as many label rows as images (and at least one), got {len(images)} and {len(labels)}")
        classes = labels.shape[1]
        if cfg.classifier_baseline and encoder.bits != classes:
            raise ValueError(f"the classifier baseline's encoder needs one output per class ({classes}), has {encoder.bits}")
        torch.manual_seed(cfg.seed)
        device = training_device(cfg.device)
        x = prepare_on_device(images, spec, device)
        y = torch.as_tensor(labels).to(device)
        # Channels-last: the layout tensor cores and oneDNN's fast conv kernels want (faster on CPU too).
        objective = HashingObjective(encoder, classes, cfg).to(device, memory_format=torch.channels_last)
        step_loss = torch.compile(objective) if cfg.compile else objective
        optimiser, schedule = self.optimiser(objective, steps=cfg.epochs * (len(x) // min(cfg.batch_size, len(x))))
        augment = Augmentation(min(cfg.crop_padding, spec.size - 1), cfg.flip)
        self.history, elapsed = [], 0.0
        for epoch in range(cfg.epochs):
            start = time.perf_counter()
            loss = self.train_epoch(step_loss, x, y, augment, optimiser, schedule, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed += time.perf_counter() - start
            self.history.append(EpochRecord(epoch + 1, loss, elapsed))
        encoder.eval()
        final = ClassScoreCode(encoder, bits or classes, cfg.seed) if cfg.classifier_baseline else encoder
        return HashingModel(final, spec)

    def optimiser(self, objective: nn.Module, steps: int):
        """Nesterov SGD, no weight decay on BN and biases (decaying them only fights the normalisation)."""
        cfg = self.cfg
        decay = [p for p in objective.parameters() if p.ndim > 1]
        no_decay = [p for p in objective.parameters() if p.ndim <= 1]
        optimiser = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                                    lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=cfg.lr, total_steps=max(steps, 1), pct_start=cfg.warmup,
                                                       anneal_strategy="linear", cycle_momentum=False)
        return optimiser, schedule

    def train_epoch(self, step_loss, x, y, augment, optimiser, schedule, device) -> float:
        """One pass in shuffled full batches (the ragged tail is dropped: BN on a tiny batch is noise)."""
        batch = min(self.cfg.batch_size, len(x))
        order = torch.randperm(len(x), device=device)
        total, count = torch.zeros((), device=device), 0
        step_loss.train()
        for i in range(0, len(x) - batch + 1, batch):
            idx = order[i : i + batch]
            inputs = augment(x[idx]).contiguous(memory_format=torch.channels_last)
            with autocast(device):
                loss = step_loss(inputs, y[idx])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.detach()
            count += 1
        return float(total) / max(count, 1)

    def config(self) -> dict:
        return asdict(self.cfg)


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images on the [0, 1] scale: the InputSpec of a CNN."""
    x = torch.as_tensor(images).float().div_(255)
    return x.mean((0, 2, 3)).tolist(), x.std((0, 2, 3)).clamp_min(1e-6).tolist()
