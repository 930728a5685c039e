"""The retrieval protocols of PROTOCOL.md, and user protocols on any dataset: deterministic query /
training / database splits.

A protocol is named (`mnist-5k`, ...), made on any dataset by options (`folder:PATH`, `mnist`, ... with
queries and training images per class), or read back from a run's saved `protocol.json` / `split.npz`.
Every split is a function of (spec, seed) and the labels alone, is identical for every trainer, and is
saved beside results so anyone can reload exactly the same one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from vdsh.data.datasets import DATASETS, INFOS, load
from vdsh.data.imageset import ImageSet
from vdsh.files import atomic_path, atomic_write_text

PROTOCOL_FILE, SPLIT_FILE = "protocol.json", "split.npz"
MAX_AUTO_QUERIES = 100  # queries per class of a user protocol when not given (fewer for small classes)


@dataclass(frozen=True)
class ProtocolSpec:
    """A pool of images split into queries, a training set and a database.

    queries_per_class / train_per_class: drawn per class (per concept for multi-label data); a
    training set of None means the whole database; queries None means min(100, a tenth of the smallest
    class), at least 1. official_train: the pool's first n images are the training set and database and
    the rest the queries (the official split).
    """

    name: str
    dataset: str
    queries_per_class: int | None = None
    train_per_class: int | None = None
    official_train: int | None = None

    def describe(self) -> str:
        if self.official_train is not None:
            return f"{self.name}: the first {self.official_train} images train and form the database, the rest query"
        queries = self.queries_per_class or "auto"
        train = "all of the database" if self.train_per_class is None else f"{self.train_per_class} per class"
        return f"{self.name}: {queries} queries per class, training on {train}, the database is every non-query"

    @classmethod
    def from_dict(cls, fields: dict) -> "ProtocolSpec":
        return cls(**{k: fields.get(k) for k in ("name", "dataset", "queries_per_class", "train_per_class", "official_train")})


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
    """Index arrays into the protocol's pool (sorted, int64), with the spec that drew them and the pool's size."""

    protocol: str
    seed: int
    train: np.ndarray
    query: np.ndarray
    database: np.ndarray
    spec: ProtocolSpec | None = None
    pool_size: int | None = None

    def save(self, path: str | Path) -> None:
        """Write the split as .npz atomically (the spec travels inside, as JSON)."""
        spec = json.dumps(asdict(self.spec) if self.spec else None)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, protocol=self.protocol, seed=self.seed, train=self.train, query=self.query,
                     database=self.database, spec=spec, pool_size=-1 if self.pool_size is None else self.pool_size)

    @classmethod
    def load(cls, path: str | Path) -> "ProtocolSplit":
        with np.load(path) as f:
            name = str(f["protocol"])
            spec = json.loads(str(f["spec"])) if "spec" in f.files else None
            pool_size = int(f["pool_size"]) if "pool_size" in f.files and int(f["pool_size"]) >= 0 else None
            return cls(name, int(f["seed"]), f["train"], f["query"], f["database"],
                       ProtocolSpec.from_dict(spec) if spec else PROTOCOLS.get(name), pool_size)

    def part(self, name: str) -> np.ndarray:
        """The pool positions of one part: 'train', 'query' or 'database'."""
        if name not in ("train", "query", "database"):
            raise ValueError(f"a protocol's parts are train, query and database, got {name!r}")
        return getattr(self, name)

    def counts(self) -> dict[str, int]:
        return {part: len(self.part(part)) for part in ("query", "train", "database")}


def draw_per_class(labels: np.ndarray, per_class: int, candidates: np.ndarray, rng: np.random.Generator,
                   what: str = "items", class_names: list[str] | None = None) -> np.ndarray:
    """`per_class` distinct items of each class (concept) in turn, among `candidates`, without repeats."""
    available = np.zeros(len(labels), dtype=bool)
    available[candidates] = True
    chosen = []
    for c in range(labels.shape[1]):
        pool = np.flatnonzero(available & (labels[:, c] > 0))
        if len(pool) < per_class:
            name = class_names[c] if class_names else str(c)
            option = "--queries-per-class" if what == "queries" else "--train-per-class (or --train all)"
            raise ValueError(f"class {name!r} has {len(pool)} available images, {per_class} {what} per class needed: "
                             f"pass a smaller {option}")
        picked = rng.choice(pool, size=per_class, replace=False)
        available[picked] = False
        chosen.append(picked)
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def auto_queries_per_class(labels: np.ndarray) -> int:
    """min(100, a tenth of the smallest class), at least 1: leaves nine tenths of every class to the database."""
    return int(max(1, min(MAX_AUTO_QUERIES, labels.sum(0).min() // 10)))


def split_protocol(protocol: str | ProtocolSpec, labels: np.ndarray, seed: int = 0,
                   class_names: list[str] | None = None) -> ProtocolSplit:
    """Split a pool with these multi-hot labels by a protocol (name or spec); deterministic for a seed."""
    spec = protocol if isinstance(protocol, ProtocolSpec) else get_protocol(protocol)
    n = len(labels)
    everything = np.arange(n, dtype=np.int64)
    if spec.official_train is not None:
        train = everything[: spec.official_train]
        return ProtocolSplit(spec.name, seed, train, everything[spec.official_train :], train.copy(), spec, n)
    rng = np.random.default_rng(seed)
    per_class = spec.queries_per_class or auto_queries_per_class(labels)
    query = draw_per_class(labels, per_class, everything, rng, "queries", class_names)
    database = np.setdiff1d(everything, query)
    if spec.train_per_class is None:
        train = database.copy()
    else:
        train = draw_per_class(labels, spec.train_per_class, database, rng, "training images", class_names)
    if spec.queries_per_class is None:  # record the number drawn, so the saved spec says it
        spec = ProtocolSpec(spec.name, spec.dataset, per_class, spec.train_per_class)
    return ProtocolSplit(spec.name, seed, train, query, database, spec, n)


def is_dataset(name: str) -> bool:
    return name.startswith("folder:") or name in INFOS


def get_protocol(name: str) -> ProtocolSpec:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}, a dataset "
                         f"({', '.join(DATASETS)}) with --queries-per-class/--train-per-class, or a saved "
                         f"{PROTOCOL_FILE} / {SPLIT_FILE} (or the run folder holding it)")
    return PROTOCOLS[name]


def protocol_spec(protocol: str, queries_per_class: int | None = None, train_per_class: int | str | None = None) -> ProtocolSpec:
    """A named protocol, or one on a dataset shaped by the options (train_per_class 'all' or None: the whole database)."""
    if protocol in PROTOCOLS:
        if queries_per_class is not None or train_per_class is not None:
            raise ValueError(f"protocol {protocol} fixes its split; --queries-per-class and --train-per-class make a "
                             f"protocol on a dataset, e.g. --protocol {PROTOCOLS[protocol].dataset}")
        return PROTOCOLS[protocol]
    if not is_dataset(protocol):
        get_protocol(protocol)  # raises, listing what is known
    if protocol.startswith("folder:"):  # absolute, so the saved protocol works from any directory
        protocol = "folder:" + str(Path(protocol.removeprefix("folder:")).expanduser().resolve())
    if queries_per_class is not None and queries_per_class < 1:
        raise ValueError(f"--queries-per-class must be at least 1, got {queries_per_class}")
    train = None if train_per_class in (None, "all") else int(train_per_class)
    if train is not None and train < 1:
        raise ValueError(f"--train-per-class must be at least 1 or 'all', got {train_per_class}")
    return ProtocolSpec(protocol, protocol, queries_per_class, train)


def saved_split_path(protocol: str) -> Path | None:
    """The split.npz a protocol argument points at (a protocol.json, a split.npz, or a folder holding them), if any."""
    path = Path(protocol).expanduser()
    if protocol.startswith("folder:") or protocol in PROTOCOLS or not (path.suffix in (".json", ".npz") or path.is_dir()):
        return None
    if path.is_dir():
        path = path / SPLIT_FILE
    elif path.suffix == ".json":
        path = path.parent / json.loads(path.read_text()).get("split", SPLIT_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"no saved split at {path}: a run folder holds {PROTOCOL_FILE} and {SPLIT_FILE}")
    return path


def saved_shape(split_path: Path) -> tuple[int | None, int | None]:
    """The (channels, size) the run beside this split decoded its images at, when its protocol.json says."""
    meta = split_path.parent / PROTOCOL_FILE
    shape = json.loads(meta.read_text()).get("image_shape") if meta.is_file() else None
    return (shape[0], shape[1]) if shape else (None, None)


def save_protocol(folder: str | Path, split: ProtocolSplit, image_shape: tuple[int, int, int] | None = None) -> None:
    """Write split.npz and protocol.json (the spec, seed, pool size, part sizes, decoded image shape) into `folder`."""
    folder = Path(folder)
    split.save(folder / SPLIT_FILE)
    meta = {"protocol": asdict(split.spec) if split.spec else {"name": split.protocol}, "seed": split.seed,
            "pool_size": split.pool_size, "counts": split.counts(), "split": SPLIT_FILE,
            "image_shape": list(image_shape[1:]) if image_shape else None}
    atomic_write_text(folder / PROTOCOL_FILE, json.dumps(meta, indent=1))


def load_protocol(protocol: str | ProtocolSpec, root: str | Path | None = None, seed: int = 0,
                  channels: int | None = None, size: int | None = None, queries_per_class: int | None = None,
                  train_per_class: int | str | None = None) -> tuple[ImageSet, ProtocolSplit]:
    """The protocol's pool (train followed by test for built-in datasets) and its split for `seed`.

    protocol: a name of PROTOCOLS, a dataset (with the per-class options), a ProtocolSpec, or a saved
    protocol.json / split.npz / run folder, whose split is reloaded exactly (its seed wins). channels and
    size: the decoded shape (see `vdsh.data.load`); a saved protocol's shape by default.
    """
    split_path = saved_split_path(protocol) if isinstance(protocol, str) else None
    if split_path is not None:
        split = ProtocolSplit.load(split_path)
        if split.spec is None:
            raise ValueError(f"{split_path} names protocol {split.protocol!r}, which is not a known one: it cannot be reloaded")
        own_channels, own_size = saved_shape(split_path)
        pool = load(split.spec.dataset, root, split="all", channels=channels or own_channels, size=size or own_size)
        if split.pool_size is not None and split.pool_size != len(pool):
            raise ValueError(f"{split_path} split {split.pool_size} images but {split.spec.dataset} now has {len(pool)}: "
                             "the dataset changed since; train again, or restore the images")
        return pool, split
    spec = protocol if isinstance(protocol, ProtocolSpec) else protocol_spec(protocol, queries_per_class, train_per_class)
    pool = load(spec.dataset, root, split="all", channels=channels, size=size)
    return pool, split_protocol(spec, pool.labels, seed, pool.class_names)


def split_part(reference: str, pool_size: int | None = None) -> np.ndarray:
    """Pool positions named by 'PATH:PART', e.g. 'runs/x/split.npz:query' (PATH: a split.npz, protocol.json or run folder).

    pool_size: the size of the dataset the positions will index; a split drawn from a pool of another size
    is refused, since its positions would name other images."""
    path, sep, part = reference.rpartition(":")
    if not sep or not path:
        raise ValueError(f"expected SPLIT:PART such as runs/x/split.npz:query, got {reference!r}")
    split_path = saved_split_path(path)
    if split_path is None:
        raise ValueError(f"{path!r} is not a saved split (split.npz, protocol.json, or a run folder holding them)")
    split = ProtocolSplit.load(split_path)
    if pool_size is not None and split.pool_size is not None and split.pool_size != pool_size:
        raise ValueError(f"{split_path} was drawn from {split.pool_size} images but this dataset has {pool_size}: its "
                         "positions would name other images. Index the run's own split (--protocol RUN_FOLDER --part "
                         "database), or restore the images")
    return split.part(part)
