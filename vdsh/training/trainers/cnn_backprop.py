"""Train a CNN hashing encoder, or its classifier baseline, with the shared `BackpropTrainer`.

What this adds to the trainer is only the CNN recipe: per-channel normalisation of the training images
(InputSpec(features="image")), crop/flip augmentation on the device, label smoothing, channels-last,
bf16 autocast on CUDA, optional `torch.compile`. Hashing mode: tanh head + linear classifier +
quantisation term (the trainer's loss). Classifier mode (PROTOCOL.md's baseline): the same network with
one output per class, plain cross-entropy, codes from `ClassScoreCode`.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from vdsh.training.augment import Augmentation, default_augmentation
from vdsh.training.validation import Validation
from vdsh.training.trainers.backprop import BackpropOptions, BackpropTrainer
from vdsh.training.encoders.class_scores import ClassScoreCode
from vdsh.training.encoders.cnn import CNN_KINDS, ImageEncoder
from vdsh.training.encoders.registry import ENCODERS
from vdsh.training.encoders.model import HashingModel, InputSpec

# The fast-CIFAR settings: one-cycle Nesterov SGD, label smoothing 0.1 as in the ResNet-9 trainers. Peak
# lr 0.2 and no quantisation term won a small screen on mnist-sample (small_cnn w=8, 4 epochs, batch 128,
# 48 bits; lr 0.05, 0.1, 0.2; quantisation 0, 0.002, 0.01). Measured figures: BENCHMARKS.md, "CNN trainers".
CNN_OPTIONS = BackpropOptions(epochs=10, batch_size=256, lr=0.2, label_smoothing=0.1, quantisation=0.0,
                              channels_last=True, eval_every=0)


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images on the [0, 1] scale: a CNN's InputSpec."""
    x = torch.as_tensor(images).float().div_(255)
    return x.mean((0, 2, 3)).tolist(), x.std((0, 2, 3)).clamp_min(1e-6).tolist()


def image_spec(images: np.ndarray) -> InputSpec:
    if images.ndim != 4 or images.shape[2] != images.shape[3]:
        raise ValueError(f"CNN training needs square uint8 images (N, C, H, H), got {images.shape}")
    mean, std = channel_stats(images)
    return InputSpec(images.shape[1], images.shape[2], "image", mean, std)


def cnn_problem(kind: str, images: np.ndarray, labels: np.ndarray, outputs: int, width: int | None,
                device: str) -> tuple[ImageEncoder, InputSpec, torch.Tensor]:
    """A fresh CNN encoder with `outputs` units, the images' InputSpec and the prepared images on `device`."""
    if kind not in CNN_KINDS:
        raise ValueError(f"{kind!r} is not a CNN encoder; known: {', '.join(CNN_KINDS)}")
    if len(images) != len(labels):
        raise ValueError(f"need one label row per image, got {len(images)} images and {len(labels)} label rows")
    spec = image_spec(images)
    kwargs = {} if width is None else {"width": width}
    encoder = ENCODERS[kind](spec.channels, spec.size, outputs, **kwargs)
    x = torch.cat([spec.prepare(torch.as_tensor(images[i : i + 8192]).to(device)) for i in range(0, len(images), 8192)])
    return encoder, spec, x


def prepared_validation(spec: InputSpec, validation: Validation | None) -> Validation | None:
    """A validation slice of uint8 images (N, C, H, W) made encoder input, as the training images are."""
    if validation is None:
        return None
    return Validation(spec.prepare(validation.query), torch.as_tensor(validation.query_labels).float(),
                      spec.prepare(validation.database), torch.as_tensor(validation.database_labels).float())


def train_cnn(
    kind: str, images: np.ndarray, labels: np.ndarray, bits: int, width: int | None = None,
    options: BackpropOptions | None = None, augmentation: Augmentation | None = None,
    classifier_baseline: bool = False, compile: bool = False, progress=None,
) -> tuple[HashingModel, list[dict]]:
    """uint8 images (N, C, H, H) and multi-hot labels (N, L) -> trained HashingModel and the trainer's history."""
    options = replace(options or CNN_OPTIONS, plain_classifier=classifier_baseline)
    classes = labels.shape[1]
    encoder, spec, x = cnn_problem(kind, images, labels, classes if classifier_baseline else bits, width, options.device)
    trainer = BackpropTrainer(options, progress, augmentation or Augmentation())
    fitted = torch.compile(encoder) if compile else encoder
    _, history = trainer.fit(fitted, x, torch.as_tensor(labels).float(), validation=None)
    encoder = encoder.cpu().eval()
    final = ClassScoreCode(encoder, bits, options.seed) if classifier_baseline else encoder
    return HashingModel(final, spec), history


__all__ = ["CNN_OPTIONS", "train_cnn", "cnn_problem", "prepared_validation", "image_spec", "channel_stats", "default_augmentation"]
