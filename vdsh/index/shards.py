"""Several saved index directories (shards) searched as one index over their union, read-only.

A collection too big for one index, or built in parts, is split into shards; each shard answers on its
own and the answers are merged by distance. Ties go by shard order, then by each shard's own order
(insertion order): the order one index would answer in that held shard 0's items, then shard 1's, and
so on. So k-NN and radius answers equal that union index's exactly (the tests build both), provided
every shard's kind is exact (flat, distinct, auto).

Each shard keeps its own ids, labels, sources and thumbnails; ids must not repeat across shards. The
shards may live on other machines in the same way: search each with k and merge with `merge_knn`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vdsh.index.hamming_index import SearchResult
from vdsh.index.items import ItemIndex
from vdsh.index.store import IndexMismatchError, load_index


def merge_knn(parts: Sequence[SearchResult], k: int) -> SearchResult:
    """The k best of per-shard k-NN answers ((q, k_s) ids and distances, -1 past the last item), by
    (distance, shard order, rank in the shard); -1 padded like a single index's answer."""
    if not parts:
        raise ValueError("merge_knn needs the answer of at least one shard")
    ids = np.concatenate([part[0] for part in parts], axis=1)
    dists = np.concatenate([part[1] for part in parts], axis=1)
    assert ids.shape == dists.shape, (ids.shape, dists.shape)
    key = np.where(ids >= 0, dists.astype(np.int64), np.iinfo(np.int64).max)  # missing results go last
    order = np.argsort(key, axis=1, kind="stable")[:, :k]
    ids, dists = np.take_along_axis(ids, order, axis=1), np.take_along_axis(dists, order, axis=1)
    if ids.shape[1] < k:  # fewer than k columns in all: pad like HammingIndex.search
        pad = ((0, 0), (0, k - ids.shape[1]))
        ids, dists = np.pad(ids, pad, constant_values=-1), np.pad(dists, pad, constant_values=-1)
    return ids, dists


def merge_ranges(parts: Sequence[list[SearchResult]]) -> list[SearchResult]:
    """Per query, every shard's radius answer merged by (distance, shard order, rank in the shard)."""
    merged = []
    for per_shard in zip(*parts):
        ids = np.concatenate([found for found, _ in per_shard])
        dists = np.concatenate([d for _, d in per_shard])
        order = np.argsort(dists, kind="stable")
        merged.append((ids[order], dists[order]))
    return merged


class ShardedItems:
    """Shards with the read surface of an `ItemIndex` (search, range_search, labels_of, sources_of,
    codes_of, thumbnail_of): what `vdsh query` and `vdsh serve` use when given several directories."""

    def __init__(self, shards: Sequence[ItemIndex], names: Sequence[str] | None = None):
        if not shards:
            raise ValueError("ShardedItems needs at least one shard")
        self.shards = list(shards)
        self.names = list(names) if names is not None else [f"shard {i}" for i in range(len(self.shards))]
        _check_compatible(self.shards, self.names)
        self._sorted_ids, self._shard_of = _id_directory(self.shards, self.names)

    @classmethod
    def load(cls, directories: Sequence[str | Path], model_id: str | None = None, bits: int | None = None) -> "ShardedItems":
        """Load every directory (with the checks of `load_index`) as one collection."""
        return cls([load_index(d, model_id=model_id, bits=bits) for d in directories], [str(d) for d in directories])

    def __len__(self) -> int:
        return sum(len(shard) for shard in self.shards)

    @property
    def bits(self) -> int:
        return self.shards[0].bits

    @property
    def kind(self) -> str:
        """The shards' index kind, or their kinds joined by '+' when they differ."""
        return "+".join(dict.fromkeys(shard.kind for shard in self.shards))

    @property
    def model_id(self) -> str:
        return self.shards[0].model_id

    @property
    def class_names(self) -> list[str]:
        return self.shards[0].class_names

    def search(self, queries: np.ndarray, k: int, device: str = "auto") -> SearchResult:
        return merge_knn([shard.search(queries, k, device=device) for shard in self.shards], k)

    def range_search(self, queries: np.ndarray, radius: int) -> list[SearchResult]:
        return merge_ranges([shard.range_search(queries, radius) for shard in self.shards])

    def labels_of(self, ids) -> np.ndarray:
        return self._gather(ids, lambda shard, part: shard.labels_of(part), np.zeros((0, len(self.class_names)), np.uint8))

    def sources_of(self, ids) -> list[str]:
        return list(self._gather(ids, lambda shard, part: np.array(shard.sources_of(part), dtype=object),
                                 np.empty(0, dtype=object)))

    def codes_of(self, ids) -> np.ndarray:
        return self._gather(ids, lambda shard, part: shard.codes_of(part), np.zeros((0, self.shards[0].index.nbytes), np.uint8))

    def thumbnail_of(self, item_id: int) -> np.ndarray | None:
        return self.shards[int(self._locate(np.array([item_id]))[0])].thumbnail_of(item_id)

    def _locate(self, ids) -> np.ndarray:
        """The shard of each id; KeyError naming unknown ids."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        pos = np.minimum(np.searchsorted(self._sorted_ids, ids), max(len(self._sorted_ids) - 1, 0))
        found = self._sorted_ids[pos] == ids if len(self._sorted_ids) else np.zeros(len(ids), bool)
        if not found.all():
            raise KeyError(f"unknown ids: {ids[~found][:5].tolist()}")
        return self._shard_of[pos]

    def _gather(self, ids, read, empty: np.ndarray) -> np.ndarray:
        """`read(shard, its ids)` for the ids of each shard, put back in the order of `ids`."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        shard_of = self._locate(ids)
        out = np.empty((len(ids),) + empty.shape[1:], dtype=empty.dtype)
        for s in np.unique(shard_of):
            where = np.flatnonzero(shard_of == s)
            out[where] = read(self.shards[s], ids[where])
        return out


def _check_compatible(shards: list[ItemIndex], names: list[str]) -> None:
    """Same code length, model and classes everywhere, or the merged answers would mean nothing."""
    first = shards[0]
    for shard, name in zip(shards[1:], names[1:]):
        for what, mine, theirs in (("code length", shard.bits, first.bits), ("model", shard.model_id, first.model_id),
                                   ("class names", shard.class_names, first.class_names)):
            if mine != theirs:
                raise IndexMismatchError(f"shards disagree on {what}: {names[0]} has {theirs!r}, {name} has {mine!r}")


def _id_directory(shards: list[ItemIndex], names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """All ids sorted, with the shard of each; IndexMismatchError for an id in two shards."""
    ids = np.concatenate([shard.index.ids for shard in shards])
    shard_of = np.repeat(np.arange(len(shards)), [len(shard) for shard in shards])
    order = np.argsort(ids, kind="stable")
    ids, shard_of = ids[order], shard_of[order]
    repeated = np.flatnonzero(ids[1:] == ids[:-1])
    if len(repeated):
        i = repeated[0]
        raise IndexMismatchError(f"id {ids[i]} is in both {names[shard_of[i]]} and {names[shard_of[i + 1]]}; "
                                 "shards must hold disjoint ids")
    return ids, shard_of
