"""Fine-tuning a backbone's last stages on the training labels, where its frozen ImageNet features fall short.

Only the tail learns: the last `stages` stages of inverted-residual blocks, the 1x1 head convolution and its
batch norm, under a linear classifier on the pooled features (softmax cross-entropy for single-label data,
per-class logistic loss for multi-label data). The trunk below stays frozen, so its output maps are computed
once per dataset (`cached_trunk_maps`) and each epoch runs the tail alone: a small share of the backbone's
cost. The classifier is then dropped: the tuned backbone's pooled features feed any hashing trainer exactly as
frozen features do, and the model file keeps the tail's weights beside the hashing head.

This is the usual two-step recipe (fine-tune a classifier, then hash its features), not end-to-end hashing:
the hashing loss never reaches the backbone. Optimiser: AdamW with cosine decay, the new classifier at ten
times the tail's rate (it starts from nothing, the tail from ImageNet); batch norm in training mode; no input
augmentation, since the cached maps are those of the original images.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from vdsh.training.features.efficientnet import FEATURE_DIM, STAGES, EfficientNetLite0Features


@dataclass(frozen=True)
class FinetuneOptions:
    """How many of the last stages learn, and for how long. `lr` is the tail's rate; the classifier's is 10 x."""

    stages: int = 1
    epochs: int = 4  # defaults picked on held-out CIFAR-10 training images (10,000 to train, 5,000 to validate)
    lr: float = 1e-3
    weight_decay: float = 0.05
    batch_size: int = 128
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not 1 <= self.stages <= STAGES:
            raise ValueError(f"the stages to fine-tune must be between 1 and {STAGES}, got {self.stages}")
        if self.epochs < 1 or self.lr <= 0 or self.batch_size < 1:
            raise ValueError(f"fine-tuning needs epochs >= 1, lr > 0 and batch_size >= 1, got {self}")


def is_single_label(labels: torch.Tensor) -> bool:
    return bool((labels.sum(1) == 1).all())


def finetune_tail(backbone: EfficientNetLite0Features, maps: np.ndarray, labels: torch.Tensor, options: FinetuneOptions,
                  progress=None) -> tuple[EfficientNetLite0Features, list[dict]]:
    """A copy of `backbone` whose last `options.stages` stages are trained on the trunk `maps` (float16, N x C x h x w)
    of the training images and their multi-hot `labels` (N, classes); and one record per epoch (loss, accuracy, seconds)."""
    if len(maps) != len(labels):
        raise ValueError(f"{len(maps)} trunk maps but {len(labels)} labels")
    torch.manual_seed(options.seed)
    tuned = copy.deepcopy(backbone).to(options.device)
    tail = tuned.tail(options.stages)
    classifier = nn.Linear(FEATURE_DIM, labels.shape[1]).to(options.device)
    single = is_single_label(labels)
    loss_fn = nn.CrossEntropyLoss() if single else nn.BCEWithLogitsLoss()
    targets = labels.argmax(1) if single else labels.float()
    optimizer = torch.optim.AdamW([{"params": tail.parameters(), "lr": options.lr},
                                   {"params": classifier.parameters(), "lr": 10 * options.lr}],
                                  weight_decay=options.weight_decay)
    steps = options.epochs * math.ceil(len(maps) / options.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    generator = torch.Generator().manual_seed(options.seed)
    history = []
    started = time.perf_counter()
    tail.train()
    for epoch in range(1, options.epochs + 1):
        order = torch.randperm(len(maps), generator=generator)
        total, correct = 0.0, 0
        for start in range(0, len(order), options.batch_size):
            batch = order[start : start + options.batch_size]
            x = torch.from_numpy(maps[batch.numpy()]).to(options.device).float()
            logits = classifier(tail(x))
            loss = loss_fn(logits, targets[batch].to(options.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(batch)
            if single:
                correct += int((logits.argmax(1).cpu() == targets[batch]).sum())
        record = {"epoch": epoch, "loss": total / len(maps), "train_accuracy": correct / len(maps) if single else None,
                  "time": time.perf_counter() - started}
        history.append(record)
        if progress:
            progress(record)
    tuned.eval()
    return tuned.cpu(), history


@torch.inference_mode()
def tail_features(backbone: EfficientNetLite0Features, maps: np.ndarray, stages: int, batch_size: int = 512) -> torch.Tensor:
    """float32 (N, 1280) pooled features of trunk `maps` through the backbone's last `stages` stages, in eval mode."""
    backbone.eval()
    tail = backbone.tail(stages)
    device = next(backbone.parameters()).device
    chunks = [tail(torch.from_numpy(maps[i : i + batch_size]).to(device).float()).cpu()
              for i in range(0, len(maps), batch_size)]
    return torch.cat(chunks) if chunks else torch.empty(0, FEATURE_DIM)
