"""A trained model applied to a dataset, as the commands need it: the items to index or score, their codes, an
index of them. Shared by `vdsh index build`, `vdsh eval`, `vdsh query` and `vdsh demo`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vdsh.data import load
from vdsh.data.imageset import ImageSet
from vdsh.data.protocols import load_protocol, split_part
from vdsh.data.transforms import thumbnail
from vdsh.index.codes import CodeSet
from vdsh.index.hamming_index import HammingIndex
from vdsh.index.items import ItemIndex
from vdsh.index.store import save_index
from vdsh.training.encoders.model import load_model, model_id
from vdsh.training.encoding import model_codes

PARTS = ("train", "query", "database")


def load_items(dataset: str | None, split: str, protocol: str | None, part: str, data_root: str | None,
               seed: int = 0, data: dict | None = None, exclude: list[str] = ()) -> tuple[ImageSet, np.ndarray]:
    """(pool, ids): the images to index are pool.images[ids], a dataset split or one part (train/query/database)
    of a protocol. The pool is returned whole, so that a model on cached features reads the pool's cache.

    An item's id is its position in the dataset (in the protocol's pool: train followed by test for the
    built-in datasets), the number its source `mnist:N` also shows. data: `load_protocol`'s shape and
    per-class options; exclude: 'SPLIT:PART' references whose items are left out (e.g. the queries)."""
    data = data or {}
    if protocol:
        if part not in PARTS:
            raise ValueError(f"--part must be one of {', '.join(PARTS)}, got {part!r}")
        pool, split_ = load_protocol(protocol, data_root, seed, **data)
        ids = split_.part(part)
    elif dataset:
        pool = load(dataset, data_root, split, channels=data.get("channels"), size=data.get("size"))
        ids = np.arange(len(pool), dtype=np.int64)
    else:
        raise ValueError("give --dataset NAME (with --split) or --protocol NAME (with --part)")
    ids = ids[~np.isin(ids, excluded(exclude, len(pool)))]
    return pool, ids


def excluded(references: list[str], pool_size: int) -> np.ndarray:
    """Positions in a dataset of `pool_size` images named by 'SPLIT:PART' references (e.g. runs/x/split.npz:query)."""
    return np.concatenate([split_part(r, pool_size) for r in references]) if references else np.empty(0, np.int64)


@dataclass
class ScoredPart:
    """Codes of one side of an evaluation (queries or database) with the pool positions they came from."""

    codes: CodeSet
    ids: np.ndarray


def codes_from_model(model_path: Path, protocol: str, data_root: Path | None, seed: int, data: dict | None = None,
                     exclude: list[str] = ()) -> tuple[ScoredPart, ScoredPart, list[str]]:
    """Encode the protocol's queries and database with a trained model, images decoded at the model's input.

    exclude: 'SPLIT:PART' references (e.g. runs/x/split.npz:train) whose items leave the database."""
    model = load_model(model_path)
    pool, split = load_protocol(protocol, data_root, seed, **(data or {}))
    database = split.database[~np.isin(split.database, excluded(exclude, len(pool)))]
    if not len(database):
        raise ValueError("--exclude leaves an empty database")

    # one pass over both parts: a model on cached features reads the cache (the whole pool's features) once
    packed = model_codes(model, pool, np.concatenate([split.query, database]),
                         label=f"encoding {len(split.query)} queries and {len(database)} database items")
    parts = [(split.query, packed[: len(split.query)]), (database, packed[len(split.query):])]
    query, db = (ScoredPart(CodeSet(codes, model.bits, pool.labels[ids]), ids) for ids, codes in parts)
    return query, db, list(pool.class_names)


def build_index(model_path: Path, pool: ImageSet, kind: str, out: Path | None, batch_size: int = 1024,
                device: str | None = None, ids: np.ndarray | None = None) -> ItemIndex:
    """Encode pool.images[ids] (default: all), add codes + labels + sources + thumbnails (at most 64 px a side) with the positions
    as item ids, save atomically to `out` (when given)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(model_path, device=device)
    spec = model.input_spec
    if pool.images.shape[1:] != (spec.channels, spec.size, spec.size):
        raise ValueError(f"{pool.name} images are {pool.images.shape[1:]}, the model takes "
                         f"({spec.channels}, {spec.size}, {spec.size})")
    ids = np.arange(len(pool), dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    codes = model_codes(model, pool, ids, batch_size, label=f"encoding {len(ids)} images on {device}")
    index = ItemIndex(HammingIndex(model.bits, kind), model_id(model_path), pool.class_names)
    index.add(codes, ids, labels=pool.labels[ids], sources=[pool.source(i) for i in ids],
              thumbnails=[thumbnail(pool.images[i]) for i in ids])
    if out is not None:
        save_index(out, index)
    return index
