"""The classifier baseline of PROTOCOL.md: a network trained as a plain classifier, its class scores made a code.

The network is the same encoder class as the hashing model, built with one output per class instead of
`bits` (so its head is the classifier) and trained with cross-entropy alone. Its codes are

    b = sgn(R^T (s - mean(s)))        s: the L class scores of an image, R: a fixed (L, bits) Gaussian

Why this choice: the scores are defined up to a constant per image (softmax ignores it), so they are
centred first; random hyperplanes (Charikar's SimHash) then give a code of any length whose Hamming
distance estimates the angle between two images' score vectors, so images the classifier puts in the
same class get near codes, and `bits` may exceed the number of classes (sgn(s - mean) alone would give
only L bits). R is drawn from `seed` and also stored in the model file, so the code is part of the model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn



def score_projection(classes: int, bits: int, seed: int) -> torch.Tensor:
    """The fixed (classes, bits) random hyperplanes, reproducible from the seed on any machine."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(classes, bits, generator=generator)


class ClassScoreCode(nn.Module):
    """Wraps a trained classifier (any registered encoder with `classes` outputs): its projected centred scores."""

    kind = "class_scores"

    def __init__(self, classifier: nn.Module, bits: int, seed: int = 0) -> None:
        super().__init__()
        classes = int(classifier.config()["bits"])
        if bits < 1:
            raise ValueError(f"bits must be positive, got {bits}")
        if classes < 2:
            raise ValueError(f"a classifier needs at least 2 class scores, got {classes}")
        self.classifier, self.bits, self.seed = classifier, bits, seed
        self.register_buffer("projection", score_projection(classes, bits, seed))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.classifier(x).float()
        return (scores - scores.mean(1, keepdim=True)) @ self.projection

    def config(self) -> dict:
        return {
            "classifier": {"kind": self.classifier.kind, "config": self.classifier.config()},
            "bits": self.bits, "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config: dict, build: Callable[[str, dict], nn.Module]) -> "ClassScoreCode":
        """build(kind, config): the registry's `encoder_from_config`, for the wrapped classifier."""
        inner = config["classifier"]
        return cls(build(inner["kind"], inner["config"]), config["bits"], config.get("seed", 0))
