"""The retrieval protocols of PROTOCOL.md: deterministic query / training / database splits.

Every split is a function of (protocol, seed) and the labels alone, is identical for every trainer,
and is saved beside results so anyone can reload it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vdsh.data.datasets import load
from vdsh.files import atomic_path
from vdsh.data.imageset import ImageSet


@dataclass(frozen=True)
class ProtocolSpec:
    """A pool of images split into queries, a training set and a database.

    queries_per_class / train_per_class: drawn per class (per concept for multi-label data); a
    training set of None means the whole database. official_train: the pool's first n images are the
    training set and database and the rest the queries (the official split).
    """

    name: str
    dataset: str
    queries_per_class: int | None = None
    train_per_class: int | None = None
    official_train: int | None = None


PROTOCOLS: dict[str, ProtocolSpec] = {
    spec.name: spec
    for spec in [
        ProtocolSpec("cifar10-5k", "cifar10", queries_per_class=100, train_per_class=500),
        ProtocolSpec("cifar10-59k", "cifar10", queries_per_class=100),
        ProtocolSpec("cifar10-50k", "cifar10", official_train=50_000),
        ProtocolSpec("mnist-5k", "mnist", queries_per_class=100, train_per_class=500),
        ProtocolSpec("mnist-69k", "mnist", queries_per_class=100),
        ProtocolSpec("nuswide-21", "nuswide", queries_per_class=100, train_per_class=500),
        # The embedded 10,000-image sample, split like mnist-5k: for quick starts and tests.
        ProtocolSpec("mnist-sample", "mnist-sample", queries_per_class=100, train_per_class=500),
    ]
}


@dataclass
class ProtocolSplit:
    """Index arrays into the protocol's pool (sorted, int64)."""

    protocol: str
    seed: int
    train: np.ndarray
    query: np.ndarray
    database: np.ndarray

    def save(self, path: str | Path) -> None:
        """Write the split as .npz atomically."""
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, protocol=self.protocol, seed=self.seed, train=self.train, query=self.query, database=self.database)

    @classmethod
    def load(cls, path: str | Path) -> "ProtocolSplit":
        with np.load(path) as f:
            return cls(str(f["protocol"]), int(f["seed"]), f["train"], f["query"], f["database"])


def draw_per_class(labels: np.ndarray, per_class: int, candidates: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`per_class` distinct items of each class (concept) in turn, among `candidates`, without repeats."""
    available = np.zeros(len(labels), dtype=bool)
    available[candidates] = True
    chosen = []
    for c in range(labels.shape[1]):
        pool = np.flatnonzero(available & (labels[:, c] > 0))
        if len(pool) < per_class:
            raise ValueError(f"class {c} has {len(pool)} available items, {per_class} needed")
        picked = rng.choice(pool, size=per_class, replace=False)
        available[picked] = False
        chosen.append(picked)
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def split_protocol(name: str, labels: np.ndarray, seed: int = 0) -> ProtocolSplit:
    """Split a pool with these multi-hot labels by protocol `name`; deterministic for a seed."""
    spec = get_protocol(name)
    n = len(labels)
    everything = np.arange(n, dtype=np.int64)
    if spec.official_train is not None:
        train = everything[: spec.official_train]
        return ProtocolSplit(name, seed, train, everything[spec.official_train :], train.copy())
    rng = np.random.default_rng(seed)
    query = draw_per_class(labels, spec.queries_per_class, everything, rng)
    database = np.setdiff1d(everything, query)
    if spec.train_per_class is None:
        train = database.copy()
    else:
        train = draw_per_class(labels, spec.train_per_class, database, rng)
    return ProtocolSplit(name, seed, train, query, database)


def get_protocol(name: str) -> ProtocolSpec:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def load_protocol(name: str, root: str | Path | None = None, seed: int = 0) -> tuple[ImageSet, ProtocolSplit]:
    """The protocol's pool (train followed by test) and its split for `seed`."""
    pool = load(get_protocol(name).dataset, root, split="all")
    return pool, split_protocol(name, pool.labels, seed)
