"""Batched input augmentation on the training device: random crop (pad + crop) and horizontal flip of images,
Gaussian noise on feature vectors.

Done on whole (N, C, H, W) tensors where they already live (the GPU in a real run), so augmentation
costs a few kernel launches per batch instead of a CPU data-loader pipeline, as in the fast CIFAR-10
trainers. It applies to the prepared (normalised) input, so padding by reflection never invents a
colour the images do not have. Labels are untouched: both transforms keep the class.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pad each side by `padding` (reflect) and cut a random (H, W) window per image: shifts of +-padding px."""
    if images.ndim != 4:
        raise ValueError(f"random_crop expects (N, C, H, W) images, got {tuple(images.shape)}")
    if padding <= 0:
        return images
    n, c, h, w = images.shape
    if padding >= min(h, w):
        raise ValueError(f"crop padding {padding} must be smaller than the image side ({h}x{w}) for reflect padding")
    padded = F.pad(images, (padding,) * 4, mode="reflect")
    offsets = torch.randint(0, 2 * padding + 1, (2, n), device=images.device, generator=generator)
    rows = (offsets[0, :, None] + torch.arange(h, device=images.device))[:, None, :, None]  # (N, 1, H, 1)
    cols = (offsets[1, :, None] + torch.arange(w, device=images.device))[:, None, None, :]  # (N, 1, 1, W)
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channel = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def random_flip(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror a random half of the images left-right."""
    if images.ndim != 4:
        raise ValueError(f"random_flip expects (N, C, H, W) images, got {tuple(images.shape)}")
    flip = torch.rand(images.shape[0], device=images.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


@dataclass
class Augmentation:
    """Crop then flip, the standard CIFAR-10 pair. Turn flip off for digits and text (mirroring changes them)."""

    crop_padding: int = 4
    flip: bool = True

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        images = random_crop(images, self.crop_padding, generator)
        return random_flip(images, generator) if self.flip else images

    def config(self) -> dict:
        return asdict(self)


@dataclass
class FlatImageAugmentation:
    """An image augmentation for an MLP reading flattened pixels: rows viewed as (N, C, H, W), augmented, flattened."""

    augmentation: Augmentation
    channels: int
    size: int

    def __call__(self, rows: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        images = rows.reshape(len(rows), self.channels, self.size, self.size)
        return self.augmentation(images, generator).reshape(len(rows), -1)

    def config(self) -> dict:
        return self.augmentation.config()


@dataclass
class FeatureNoise:
    """Gaussian noise on standardised feature vectors (GIST): what a crop is to pixels, for inputs with no pixels.

    A deep MLP memorises 5,000 GIST vectors within a few sweeps; noise of 0.5 standard deviations on every feature
    makes each sweep see new points near each one (its effect on cifar10-5k: BENCHMARKS.md, "Training").
    """

    std: float = 0.5

    def __call__(self, rows: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(rows.shape, device=rows.device, dtype=rows.dtype, generator=generator)
        return rows + self.std * noise

    def config(self) -> dict:
        return {"feature_noise": self.std}


# The recipes that vdsh.data.info.AUGMENTATIONS names.
RECIPES = {"digits": Augmentation(crop_padding=2, flip=False), "photos": Augmentation(crop_padding=4, flip=True)}
NO_AUGMENTATION = Augmentation(crop_padding=0, flip=False)


def default_augmentation(dataset: str) -> Augmentation | None:
    """The recipe a dataset's facts name (a protocol name stands for its dataset): crop only (2 px) for digits,
    whose mirror images are other shapes; crop + flip for photos; None for data vdsh knows nothing about."""
    from vdsh.data.datasets import dataset_info
    from vdsh.data.protocols import PROTOCOLS

    name = PROTOCOLS[dataset].dataset if dataset in PROTOCOLS else dataset
    recipe = dataset_info(name).augmentation
    return RECIPES[recipe] if recipe else None


def chosen_augmentation(dataset: str, augment: bool | None) -> Augmentation | None:
    """The `--augment/--no-augment` choice: False none; None the dataset's own recipe (maybe none); True the dataset's
    recipe, or crop + flip (the photos recipe) for data that names none."""
    if augment is False:
        return None
    return default_augmentation(dataset) or (RECIPES["photos"] if augment else None)

