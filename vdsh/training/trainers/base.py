"""The contract every training method follows, and the prologue they share.

A trainer is built from its options (a dataclass), an optional `progress(record)` callback and, where the
method allows one, an input augmentation; `fit(encoder, x, y, validation)` trains the encoder on prepared
input x (vectors, or normalised images for CNNs) and multi-hot labels y, and returns the encoder (possibly
another module that wraps it) and its history: one dict per sweep or epoch, with at least "time".
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
from torch import nn

from vdsh.training.validation import Validation


class Trainer:
    """Base of every trainer class: options, progress, augmentation, dtype; `fit` is the method itself."""

    options_class: ClassVar[type]
    takes_augmentation: ClassVar[bool] = False  # whether `fit` applies an input augmentation when given one

    def __init__(self, options: Any | None = None, progress: Callable[[dict], None] | None = None,
                 augment: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        if augment is not None and not self.takes_augmentation:
            raise ValueError(f"{type(self).__name__} does not take an input augmentation")
        self.options = options if options is not None else self.options_class()
        self.progress = progress
        self.augment = augment

    @property
    def dtype(self) -> torch.dtype:
        """The storage type the options ask for (bfloat16 halves memory; float32 otherwise)."""
        return torch.bfloat16 if getattr(self.options, "dtype", "float32") == "bfloat16" else torch.float32

    def report(self, history: list[dict], record: dict) -> dict:
        """Append a sweep's or epoch's record to the history and show it."""
        history.append(record)
        if self.progress:
            self.progress(record)
        return record

    def fit(self, encoder: nn.Module, x: torch.Tensor, y: torch.Tensor,
            validation: Validation | None = None) -> tuple[nn.Module, list[dict]]:
        raise NotImplementedError
