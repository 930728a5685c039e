"""The served collection: one model, one `ItemIndex`, and the locks that keep them consistent.

Reads (search, item look-ups) run concurrently; writes are serialised by one lock held through the
in-memory change *and* its atomic commit to disk (one small delta file, `vdsh.index.store.save_changes`),
so the directory always holds a state the server has served. The in-memory change itself (a few numpy
concatenations) is guarded by a readers-writer lock, so a search never sees index rows and metadata
rows out of step; the commit runs under the writer lock only, so searches go on while it is written.

A `milvus://HOST:PORT/COLLECTION` index is a Milvus collection (`vdsh.index.milvus_items`): every read and
write goes to Milvus, which commits each write itself, so several server processes share one collection.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from vdsh.app.server.decoding import ImageLimits, decode_for_model, default_max_pixels
from vdsh.data import transforms
from vdsh.index.codes import code_bytes, pack_codes
from vdsh.index.milvus_items import MilvusItems, is_milvus_uri
from vdsh.index.shards import ShardedItems
from vdsh.index.items import ItemIndex
from vdsh.index.store import load_index, save_changes
from vdsh.training.encoders.model import HashingModel, load_model, model_id


FAR_SAMPLE = 512
FAR_PERCENTILE = 99


class ModelIndexMismatch(RuntimeError):
    """The model cannot serve this index (different model or code length)."""


class ReadOnlyCatalog(RuntimeError):
    """A write to a catalog that cannot take one (several shards)."""


class ReadWriteLock:
    """Many readers or one writer; writers do not starve (new readers wait while one is queued)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def reading(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def writing(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


@dataclass
class ItemRecord:
    id: int
    labels: list[str]
    source: str
    code: np.ndarray  # packed uint8 (nbytes,)
    has_thumbnail: bool


class Catalog:
    """A model and the index of its codes, loaded together and checked to agree.

    The index is one `ItemIndex` (writable; saved to `directory` when one is given), `MilvusItems`
    (writable; Milvus keeps it) or, for several directories, `ShardedItems` (read-only): reads and
    writes go through the methods they share.
    """

    def __init__(self, model: HashingModel, items: ItemIndex | MilvusItems | ShardedItems, model_name: str,
                 directory: Path | None, max_pixels: int | None = None) -> None:
        if items.model_id and items.model_id != model_name:
            raise ModelIndexMismatch(
                f"the index was built with model {items.model_id!r} but the server was given model {model_name!r}; "
                "rebuild the index with this model (vdsh index build) or pass the model it was built with"
            )
        if items.bits != model.bits:
            raise ModelIndexMismatch(f"the index holds {items.bits}-bit codes but the model makes {model.bits}-bit codes")
        self.model, self.items, self.model_id, self.directory = model, items, model_name, directory
        spec = model.input_spec
        self.limits = ImageLimits(max_pixels or default_max_pixels(spec.size), spec.channels, spec.size)
        self.far_distance = self._far_distance()
        self._rw = ReadWriteLock()
        self._write = threading.Lock()
        self.saved_at: float | None = None

    @classmethod
    def open(cls, index_dirs: str | Path | Sequence[str | Path], model_path: str | Path,
             max_pixels: int | None = None, int8: bool = False) -> "Catalog":
        """One index directory or milvus:// collection (writable), or several shards searched as one (read-only);
        int8: quantise the model's pretrained backbone for CPU serving."""
        dirs = [index_dirs] if isinstance(index_dirs, (str, Path)) else list(index_dirs)
        model = load_model(model_path, int8=int8, fold=True)
        name = model_id(model_path)
        # the model check is ours, to give a message that names both files
        if any(is_milvus_uri(d) for d in dirs):
            if len(dirs) > 1:
                raise ValueError("a milvus:// collection is served alone, not as one of several shards")
            items, directory = MilvusItems.open(str(dirs[0])), None
        else:
            dirs = [Path(d) for d in dirs]
            items = load_index(dirs[0]) if len(dirs) == 1 else ShardedItems.load(dirs)
            directory = dirs[0] if len(dirs) == 1 else None
        try:
            catalog = cls(model, items, name, directory, max_pixels)
        except ModelIndexMismatch as error:
            raise ModelIndexMismatch(f"{', '.join(map(str, dirs))} vs {model_path}: {error}") from None
        catalog.warm_up()
        return catalog

    def warm_up(self) -> None:
        """One search at start-up, so that the first request does not pay the compiled scan's set-up
        (numba compiles it once, seconds, then loads it from its cache)."""
        if len(self.items):
            self.items.search(np.zeros((1, code_bytes(self.bits)), np.uint8), 1, device="cpu")

    # ------------------------------------------------------------- facts

    @property
    def bits(self) -> int:
        return self.items.bits

    @property
    def kind(self) -> str:
        return self.items.kind

    @property
    def class_names(self) -> list[str]:
        return self.items.class_names

    def __len__(self) -> int:
        return len(self.items)

    def _far_distance(self) -> int:
        """The distance beyond which a query has "no close match": the 99th percentile of the indexed
        items' own nearest-neighbour distances (leave-one-out, on up to FAR_SAMPLE items spread over
        the index), so that 99 % of the items are at least that close to another one."""
        shards = getattr(self.items, "shards", [self.items])
        if not all(isinstance(shard, ItemIndex) for shard in shards):  # Milvus: no local codes to sample
            return self.bits
        codes = np.concatenate([shard.index.codes for shard in shards])
        if len(codes) < 2:
            return self.bits
        rows = np.unique(np.linspace(0, len(codes) - 1, min(FAR_SAMPLE, len(codes))).astype(np.int64))
        _, dists = self.items.search(codes[rows], 2, device="cpu")
        nearest_other = dists[:, 1]  # the item itself (or a duplicate code) is at distance 0 first
        return int(np.ceil(np.percentile(nearest_other, FAR_PERCENTILE)))

    # ------------------------------------------------------------ encoding

    def decode(self, data: bytes) -> np.ndarray:
        """Upload bytes -> uint8 (C, size, size) as the model expects, within `self.limits`;
        ImageDecodeError on bad images and images over the pixel limit."""
        return decode_for_model(data, self.limits)

    def encode(self, image: np.ndarray) -> np.ndarray:
        """uint8 (C, H, W) -> packed code (1, nbytes)."""
        return pack_codes(self.model.encode(image[None].copy()))  # decoded arrays are read-only

    def example_code(self) -> np.ndarray:
        """A code of an indexed item (zeros for an empty index): the example in the API docs."""
        shards = getattr(self.items, "shards", [self.items])
        codes = next((shard.index.codes for shard in shards if isinstance(shard, ItemIndex) and len(shard)), None)
        return codes[:1].copy() if codes is not None else np.zeros((1, code_bytes(self.bits)), np.uint8)

    # ------------------------------------------------------------- reading

    def knn(self, packed: np.ndarray, k: int) -> list[dict]:
        """The k nearest items, nearest first: the fields of `schemas.Neighbour` but its URL."""
        with self._rw.reading():
            ids, dists = self.items.search(packed, k, device="cpu")
            keep = ids[0] >= 0
            return self._neighbours(ids[0][keep], dists[0][keep])

    def within(self, packed: np.ndarray, radius: int, limit: int) -> tuple[list[dict], int]:
        """Items within `radius` as `knn` gives them, at most `limit` of them; also the total count."""
        with self._rw.reading():
            ids, dists = self.items.range_search(packed, radius)[0]
            return self._neighbours(ids[:limit], dists[:limit]), len(ids)

    def item(self, item_id: int) -> ItemRecord:
        """KeyError for unknown ids."""
        with self._rw.reading():
            ids = np.array([item_id], dtype=np.int64)
            return ItemRecord(
                id=item_id,
                labels=self._label_names(self.items.labels_of(ids)[0]),
                source=self.items.sources_of(ids)[0],
                code=self.items.codes_of(ids)[0],
                has_thumbnail=self.items.thumbnail_of(item_id) is not None,
            )

    def thumbnail(self, item_id: int) -> np.ndarray | None:
        with self._rw.reading():
            return self.items.thumbnail_of(item_id)

    def _neighbours(self, ids: np.ndarray, dists: np.ndarray) -> list[dict]:
        labels, sources = self.items.labels_of(ids), self.items.sources_of(ids)
        return [
            {"id": int(i), "distance": int(d), "labels": self._label_names(row), "source": source}
            for i, d, row, source in zip(ids, dists, labels, sources)
        ]

    def _label_names(self, multi_hot: np.ndarray) -> list[str]:
        names = self.class_names
        return [names[j] if j < len(names) else str(j) for j in np.flatnonzero(multi_hot)]

    # ------------------------------------------------------------- writing

    def add(self, image: np.ndarray, label_names: list[str], source: str, item_id: int | None = None) -> ItemRecord:
        """Encode, add and persist one item; on a failed save the index is reloaded from disk. New ids
        come from the index's counter (`ItemIndex.next_id`): an id is never given to two items."""
        self._check_writable()
        labels = self.labels_from_names(label_names)
        code = self.encode(image)
        with self._write:
            if item_id is None:
                item_id = self.items.next_id()
            elif self.items.contains(item_id):
                raise FileExistsError(f"item {item_id} already exists")
            elif item_id < (next_id := self.items.next_id()):
                raise FileExistsError(f"id {item_id} may have belonged to a deleted item and ids are never reused: "
                                      f"omit the id, or give one from {next_id} up")
            with self._rw.writing():
                self.items.add(code, np.array([item_id]), labels=labels[None], sources=[source], thumbnails=[transforms.thumbnail(image)])
            self._persist(added=[item_id])
        return self.item(item_id)

    def remove(self, item_id: int) -> None:
        """KeyError for unknown ids; persists before returning."""
        self._check_writable()
        with self._write:
            with self._rw.writing():
                self.items.remove(np.array([item_id], dtype=np.int64))
            self._persist(removed=[item_id])

    def labels_from_names(self, names: list[str]) -> np.ndarray:
        """Class names -> multi-hot row; ValueError naming unknown classes."""
        row = np.zeros(len(self.class_names), dtype=np.uint8)
        unknown = [n for n in names if n not in self.class_names]
        if unknown:
            raise ValueError(f"unknown labels {unknown}; this index knows {self.class_names}")
        for name in names:
            row[self.class_names.index(name)] = 1
        return row

    def _check_writable(self) -> None:
        if isinstance(self.items, ShardedItems):
            raise ReadOnlyCatalog("several index shards are served read-only: change each shard's own directory")

    def _persist(self, added: Sequence[int] = (), removed: Sequence[int] = ()) -> None:
        """Commit the change to disk (one small delta file, a full save now and then) before answering;
        Milvus has committed it already."""
        if self.directory is None:
            return
        try:
            save_changes(self.directory, self.items, added=added, removed=removed)
            self.saved_at = time.time()
        except BaseException:
            # the file still holds the last committed state: serve exactly that again
            with self._rw.writing():
                self.items = load_index(self.directory)
            raise
