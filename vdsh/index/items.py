"""The item index in memory: a `HammingIndex` plus each item's labels, source and thumbnail.

Saving and loading it (versions, deltas, fsync, locking) is `vdsh.index.store`.
"""

from __future__ import annotations

import threading

import numpy as np

from vdsh.index.codes import as_multi_hot
from vdsh.index.hamming_index import HammingIndex

THUMBNAIL_MAX_SIDE = 64


class ItemIndex:
    """A `HammingIndex` and, per item, multi-hot labels, a source string and an optional thumbnail.

    `model_id` names the model whose codes the index holds; loading checks it against the caller's model.
    Metadata rows follow the index's insertion order and are removed with their items. `lock` keeps
    them aligned with the index when threads add, remove and read at once; hold it to read index rows
    and metadata rows in step (as a save's snapshot does).
    """

    def __init__(self, index: HammingIndex, model_id: str = "", class_names: list[str] | None = None):
        if len(index):
            raise ValueError("ItemIndex starts from an empty HammingIndex; add items through ItemIndex.add")
        self.index = index
        self.model_id = model_id
        self.class_names = list(class_names or [])
        self.labels = np.zeros((0, len(self.class_names)), dtype=np.uint8)
        self.sources: list[str] = []
        self.thumbnails: list[np.ndarray | None] = []
        self._id_counter = 0  # above every id this index has ever held, deleted ones included (`next_id`)
        self.lock = threading.RLock()

    @classmethod
    def restore(cls, index: HammingIndex, model_id: str, class_names: list[str], labels: np.ndarray,
                sources: list[str], thumbnails: list[np.ndarray | None], next_id: int) -> "ItemIndex":
        """An item index over a filled `index` with its metadata rows, as saved (no checks of the
        thumbnails or labels beyond their counts: they were checked when added)."""
        for name, rows in (("label rows", len(labels)), ("sources", len(sources)), ("thumbnails", len(thumbnails))):
            if rows != len(index):
                raise ValueError(f"{len(index)} items but {rows} {name}")
        item_index = cls(HammingIndex(index.bits, index.kind), model_id, class_names)
        item_index.index = index
        item_index.labels = np.asarray(labels, dtype=np.uint8)
        item_index.sources = list(sources)
        item_index.thumbnails = list(thumbnails)
        item_index._id_counter = int(next_id)
        return item_index

    def __len__(self) -> int:
        return len(self.index)

    @property
    def bits(self) -> int:
        return self.index.bits

    @property
    def kind(self) -> str:
        return self.index.kind

    def add(self, codes, ids, labels=None, sources=None, thumbnails=None) -> None:
        """Add items: packed codes, unique ids, labels (class indices or multi-hot), sources, thumbnails."""
        n = len(codes)
        labels = self._check_labels(labels, n)
        sources = [""] * n if sources is None else [str(s) for s in sources]
        thumbnails = [None] * n if thumbnails is None else [_check_thumbnail(t) for t in thumbnails]
        for name, values in (("sources", sources), ("thumbnails", thumbnails)):
            if len(values) != n:
                raise ValueError(f"{n} codes but {len(values)} {name}")
        with self.lock:
            self.index.add(codes, ids)
            if n:
                self._id_counter = max(self._id_counter, int(np.max(ids)) + 1)
            self.labels = labels if len(self.labels) == 0 else np.concatenate([self.labels, labels])
            self.sources.extend(sources)  # in place: a copy of every source per add is what a server cannot afford
            self.thumbnails.extend(thumbnails)

    def remove(self, ids) -> int:
        """Delete items and their metadata; KeyError naming unknown ids."""
        with self.lock:
            rows = self.index.rows_of(np.unique(np.asarray(ids, dtype=np.int64)))
            keep = np.ones(len(self), dtype=bool)
            keep[rows] = False
            removed = self.index.remove(ids)
            self.labels = self.labels[keep]
            self.sources = [s for s, k in zip(self.sources, keep) if k]
            self.thumbnails = [t for t, k in zip(self.thumbnails, keep) if k]
            return removed

    def search(self, queries: np.ndarray, k: int, device: str = "auto"):
        return self.index.search(queries, k, device=device)

    def range_search(self, queries: np.ndarray, radius: int):
        return self.index.range_search(queries, radius)

    def codes_of(self, ids) -> np.ndarray:
        return self.index.get_codes(ids)

    def contains(self, item_id: int) -> bool:
        return self.index.contains(item_id)

    def next_id(self) -> int:
        """The id of an item added without one: above every id this index has ever held, deleted ones
        included, so an id is never given to two items (saved with the index; for an index saved before
        the counter existed, one more than its largest id)."""
        ids = self.index.ids
        return max(self._id_counter, int(ids.max()) + 1 if len(ids) else 0)

    def labels_of(self, ids) -> np.ndarray:
        with self.lock:
            return self.labels[self.index.rows_of(ids)]

    def sources_of(self, ids) -> list[str]:
        with self.lock:
            return [self.sources[r] for r in self.index.rows_of(ids)]

    def thumbnail_of(self, item_id: int) -> np.ndarray | None:
        with self.lock:
            return self.thumbnails[int(self.index.rows_of(np.array([item_id]))[0])]

    def _check_labels(self, labels, n: int) -> np.ndarray:
        # the label width is fixed by class_names, else by the first labelled add
        width = len(self.class_names) or (self.labels.shape[1] if len(self) else None)
        if labels is None:
            return np.zeros((n, width or 0), dtype=np.uint8)
        labels = np.asarray(labels)
        if labels.ndim == 1 and width is not None and labels.size and not 0 <= labels.min() <= labels.max() < width:
            raise ValueError(f"class indices must be in [0, {width}), got {labels.min()}..{labels.max()}")
        labels = as_multi_hot(labels, n_classes=width) if labels.ndim == 1 else as_multi_hot(labels)
        if len(labels) != n:
            raise ValueError(f"{n} codes but {len(labels)} label rows")
        if width is not None and labels.shape[1] != width:
            raise ValueError(f"labels have {labels.shape[1]} classes, the index has {width}")
        return labels


def _check_thumbnail(thumbnail) -> np.ndarray | None:
    if thumbnail is None:
        return None
    thumbnail = np.asarray(thumbnail)
    if thumbnail.ndim == 2:
        thumbnail = thumbnail[..., None]
    if thumbnail.dtype != np.uint8 or thumbnail.ndim != 3 or thumbnail.shape[2] not in (1, 3):
        raise ValueError(f"a thumbnail must be uint8 (H, W), (H, W, 1) or (H, W, 3), got {thumbnail.dtype} {thumbnail.shape}")
    if max(thumbnail.shape[:2]) > THUMBNAIL_MAX_SIDE or min(thumbnail.shape[:2]) < 1:
        raise ValueError(f"a thumbnail must be 1 to {THUMBNAIL_MAX_SIDE} pixels a side (vdsh.data.transforms.thumbnail), "
                         f"got {thumbnail.shape}")
    return np.ascontiguousarray(thumbnail)
