"""The one shape every dataset takes: uint8 images plus multi-hot labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ImageSet:
    """Images (N, C, H, W) uint8 and labels (N, L) uint8 multi-hot.

    Single-label datasets are one-hot, so single- and multi-label data take the same path through
    protocols, training and metrics (relevance = sharing at least one label).
    """

    name: str
    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    sources: list[str] | None = None  # file path (or dataset + position) of each image, for index metadata

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise ValueError(f"{self.name}: images must be uint8 (N, C, H, W), got {self.images.dtype} {self.images.shape}")
        if self.labels.ndim != 2 or len(self.labels) != len(self.images):
            raise ValueError(f"{self.name}: labels must be (N, L) with N = {len(self.images)}, got {self.labels.shape}")
        if self.labels.shape[1] != len(self.class_names):
            raise ValueError(f"{self.name}: {self.labels.shape[1]} label columns but {len(self.class_names)} class names")
        if self.sources is not None and len(self.sources) != len(self.images):
            raise ValueError(f"{self.name}: {len(self.sources)} sources for {len(self.images)} images")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def is_single_label(self) -> bool:
        return bool((self.labels.sum(axis=1) == 1).all())

    @property
    def targets(self) -> np.ndarray:
        """Class index per image; only defined for single-label data."""
        if not self.is_single_label:
            raise ValueError(f"{self.name} is multi-label: use `labels` (multi-hot)")
        return self.labels.argmax(axis=1)

    def source(self, i: int) -> str:
        return self.sources[i] if self.sources is not None else f"{self.name}:{i}"

    def subset(self, indices: np.ndarray) -> "ImageSet":
        indices = np.asarray(indices, dtype=np.int64)
        sources = [self.sources[i] for i in indices] if self.sources is not None else [f"{self.name}:{i}" for i in indices]
        return ImageSet(self.name, self.images[indices], self.labels[indices], self.class_names, sources)

    @staticmethod
    def concat(name: str, parts: list["ImageSet"]) -> "ImageSet":
        sources = None
        if any(p.sources is not None for p in parts):
            sources = [p.source(i) for p in parts for i in range(len(p))]
        return ImageSet(
            name,
            np.concatenate([p.images for p in parts]),
            np.concatenate([p.labels for p in parts]),
            parts[0].class_names,
            sources,
        )
