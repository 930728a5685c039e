"""Fit baselines on a protocol's training set and score their codes: mAP@all and wall-clock times.

`vdsh bench baselines` runs this and writes the table into BENCHMARKS.md. Features come from the registry
of `vdsh.training.features`: pixels scaled to [0, 1] and flattened (the usual input of these methods on
MNIST), GIST-512 descriptors (the literature's input on CIFAR-10, where SDH reports mAP 0.479 at 48 bits on
`cifar10-5k`) or an ImageNet-pretrained backbone's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from vdsh.data.protocols import load_protocol
from vdsh.index.codes import sign_codes
from vdsh.index.metrics import mean_average_precision
from vdsh.training.trainers.shallow import BASELINES


@dataclass
class BaselineResult:
    method: str
    bits: int
    seed: int
    map_all: float
    fit_s: float  # fitting on the training set
    encode_s: float  # computing the query and database codes


def protocol_features(images: np.ndarray, dataset: str, features: str, resolution: int | None = None) -> torch.Tensor:
    """The (N, D) float features of a protocol's pool, from the registry of `vdsh.training.features`: 'pixels'
    (/255), 'gist' or a pretrained backbone at `resolution` (computed once, then cached)."""
    from vdsh.training.features import cached_feature_vectors

    return cached_feature_vectors(features, images, dataset, resolution).float()


def evaluate_baselines(
    protocol: str,
    bits_list: list[int],
    methods: list[str],
    seed: int = 0,
    features: str = "pixels",
    resolution: int | None = None,
    on_result: Callable[[BaselineResult], None] | None = None,
) -> list[BaselineResult]:
    """One result per (bits, method), fitted with `seed` on the protocol's split for `seed`."""
    unknown = sorted(set(methods) - set(BASELINES))
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; known: {sorted(BASELINES)}")
    images, split = load_protocol(protocol, seed=seed)
    pixels, labels = protocol_features(np.asarray(images.images), images.name, features, resolution), images.labels
    results = []
    for bits in bits_list:
        for name in methods:
            start = time.perf_counter()
            encoder = BASELINES[name](pixels[split.train], labels[split.train], bits=bits, seed=seed)
            fitted = time.perf_counter()
            with torch.no_grad():
                query = sign_codes(encoder(pixels[split.query]))
                database = sign_codes(encoder(pixels[split.database]))
            encoded = time.perf_counter()
            score = mean_average_precision(query, labels[split.query], database, labels[split.database])
            results.append(BaselineResult(name, bits, seed, score, fitted - start, encoded - fitted))
            if on_result is not None:
                on_result(results[-1])
    return results
