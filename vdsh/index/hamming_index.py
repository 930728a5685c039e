"""Hamming-ranked search over packed binary codes with int64 ids, backed by FAISS binary indexes.

Every answer is ordered by (Hamming distance, insertion order): items at the same distance come back
in the order they were added, so results are reproducible and identical to an exact brute-force
scan wherever the index kind is exact. Each kind is one backend class (`vdsh.index.backends`):

- ``flat``: a full scan. Exact.
- ``distinct``: items grouped by identical code, each distinct code scored once. Exact; cost follows
  the number of distinct codes, which is small for learned supervised codes.
- ``auto``: ``flat`` storage that answers through ``distinct`` when codes repeat enough to pay. Exact.
- ``hash``, ``multihash``, ``ivf``: FAISS ``IndexBinaryHash`` / ``IndexBinaryMultiHash`` /
  ``IndexBinaryIVF``. k-NN is approximate and exact once exhaustive enough (`HammingIndex.knn_is_exact`);
  `range_search` is always exact.

BENCHMARKS.md, "Search latency", has every kind's latency and recall. Internally FAISS labels are row
numbers (insertion order, compacted on removal) and the ids live in a numpy array next to the codes;
`to_faiss` wraps a copy in ``IndexBinaryIDMap2`` with the real ids, the file that plain FAISS reads.
"""

from __future__ import annotations

import threading
from typing import Literal

import faiss
import numpy as np

from vdsh.index.backends import BACKENDS
from vdsh.index.backends.base import SearchResult, single_faiss_thread
from vdsh.index.codes import code_bytes

Kind = str  # one of KINDS: the keys of `BACKENDS`
KINDS: tuple[str, ...] = tuple(BACKENDS)
EXACT_KINDS: tuple[str, ...] = tuple(kind for kind, backend in BACKENDS.items() if backend.exact)
# GPU search pays off from batches this large (a transfer per call dominates smaller ones)
GPU_MIN_BATCH = 32

__all__ = ["EXACT_KINDS", "GPU_MIN_BATCH", "KINDS", "HammingIndex", "Kind", "SearchResult"]


class HammingIndex:
    """Packed binary codes with unique int64 ids; k-NN and radius search by Hamming distance.

    Holds the codes, the ids and the lock; the kind's backend (`vdsh.index.backends.BACKENDS`) holds its
    search structures and answers in rows. Safe to share between threads: every call holds one lock (a big
    batch is itself split across cores).
    """

    def __init__(
        self,
        bits: int,
        kind: Kind = "flat",
        *,
        hash_bits: int | None = None,
        nflip: int | None = None,
        nhash: int | None = None,
        nlist: int | None = None,
        nprobe: int | None = None,
    ):
        if kind not in KINDS:
            raise ValueError(f"unknown index kind {kind!r}: choose one of {', '.join(KINDS)}")
        self.bits = int(bits)
        self.nbytes = code_bytes(self.bits)
        self.kind = kind
        backend = BACKENDS[kind]
        given = {"hash_bits": hash_bits, "nflip": nflip, "nhash": nhash, "nlist": nlist, "nprobe": nprobe}
        extra = sorted(name for name, value in given.items() if value is not None and name not in backend.faiss_params)
        if extra:
            raise ValueError(f"{kind} index takes no parameter {extra}")
        d = 8 * self.nbytes
        self._backend = backend(d, backend.default_params(d, {n: v for n, v in given.items() if v is not None}))
        self._codes = np.empty((0, self.nbytes), dtype=np.uint8)
        self._ids = np.empty(0, dtype=np.int64)
        self._lock = threading.RLock()
        self._sorted_ids: tuple[np.ndarray, np.ndarray] | None = None  # id look-up, built at first use
        self._gpu = None  # a GPU searcher over the codes, built at first use

    # ---------------------------------------------------------------- contents

    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        return f"HammingIndex(bits={self.bits}, kind={self.kind!r}, items={len(self)}, params={self.params})"

    @property
    def params(self) -> dict[str, int]:
        """The kind's search parameters (hash_bits, nflip, nhash, nlist, nprobe where they apply)."""
        return dict(self._backend.params)

    @property
    def ids(self) -> np.ndarray:
        """All ids in insertion order (a copy)."""
        return self._ids.copy()

    @property
    def codes(self) -> np.ndarray:
        """All packed codes in insertion order (a copy)."""
        return self._codes.copy()

    def contains(self, item_id: int) -> bool:
        with self._lock:
            return bool(self._find_rows(np.array([item_id], dtype=np.int64))[1][0])

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Insertion-order rows of `ids`; KeyError naming unknown ids."""
        ids = _as_ids(ids)
        with self._lock:
            rows, found = self._find_rows(ids)
        if not found.all():
            raise KeyError(f"unknown ids: {_preview(ids[~found])}")
        return rows

    def get_codes(self, ids: np.ndarray) -> np.ndarray:
        """(len(ids), nbytes) packed codes of `ids`."""
        with self._lock:
            return self._codes[self.rows_of(ids)]

    # --------------------------------------------------------------- mutation

    def add(self, codes: np.ndarray, ids: np.ndarray) -> None:
        """Append packed codes under new unique ids; they rank after every earlier item on ties."""
        codes = self._check_codes(codes, "codes")
        ids = _as_ids(ids)
        if len(ids) != len(codes):
            raise ValueError(f"{len(codes)} codes but {len(ids)} ids")
        unique_ids, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"duplicate ids in this batch: {_preview(unique_ids[counts > 1])}")
        with self._lock:
            present = self._find_rows(ids)[1]
            if present.any():
                raise ValueError(f"ids already in the index: {_preview(ids[present])}")
            if len(codes) == 0:
                return
            first_row = len(self._ids)
            all_codes = np.concatenate([self._codes, codes])
            self._backend.add(all_codes, codes)
            self._codes = all_codes
            self._ids = np.concatenate([self._ids, ids])
            self._extend_id_lookup(ids, first_row)
            self._gpu = None

    def remove(self, ids: np.ndarray) -> int:
        """Delete `ids` (KeyError naming any unknown one); later items keep their relative order."""
        ids = np.unique(_as_ids(ids))
        with self._lock:
            rows = self.rows_of(ids)
            keep = np.ones(len(self), dtype=bool)
            keep[rows] = False
            self._codes, self._ids = self._codes[keep], self._ids[keep]
            self._backend.rebuild(self._codes)
            self._sorted_ids, self._gpu = None, None
            return len(rows)

    # ----------------------------------------------------------------- search

    def search(self, queries: np.ndarray, k: int, device: Literal["auto", "cpu", "gpu"] = "auto") -> SearchResult:
        """k nearest items per query: ids (q, k) int64 and distances (q, k) int32, -1 past the last item.

        `device="auto"` uses a GPU for exact kinds when one is available and the batch is large enough;
        "gpu" requires one; "cpu" never uses one. Results are the same on every device.
        """
        queries = self._check_codes(queries, "queries")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        k = int(k)
        with self._lock:
            if len(self) == 0 or len(queries) == 0:
                return _padded(np.empty((len(queries), 0), np.int64), np.empty((len(queries), 0), np.int32), k)
            gpu = self._gpu_searcher(device, len(queries))
            found = min(k, len(self))
            rows, dists = gpu.knn(queries, found) if gpu is not None else self._backend.knn(self._codes, queries, found)
            if self._backend.exact:  # every row is found: k <= len(self)
                return _padded(self._ids[rows], dists, k)
            return _padded(np.where(rows >= 0, self._ids[np.maximum(rows, 0)], -1), dists, k)

    def range_search(self, queries: np.ndarray, radius: int) -> list[SearchResult]:
        """Per query, (ids, distances) of every item within Hamming distance `radius` (inclusive). Exact."""
        queries = self._check_codes(queries, "queries")
        if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or not 0 <= radius <= self.bits:
            raise ValueError(f"radius must be an integer in [0, {self.bits}], got {radius!r}")
        with self._lock:
            if len(self) == 0:
                return [(np.empty(0, np.int64), np.empty(0, np.int32)) for _ in range(len(queries))]
            return [(self._ids[rows], dists) for rows, dists in self._backend.range(self._codes, queries, int(radius))]

    def knn_is_exact(self, kth_distance: int | None = None) -> bool:
        """Whether k-NN is exact: always for flat/distinct/auto; for the others once exhaustive enough.

        hash: every item within `nflip` bits of the query's `hash_bits` prefix is visited, so a k-NN
        answer whose k-th distance is <= nflip is exact; multihash: same with floor(d / nhash) <= nflip
        (pigeonhole over the `nhash` disjoint substrings); ivf: nprobe == nlist.
        """
        return self._backend.knn_is_exact(kth_distance)

    def set_params(self, **params: int) -> None:
        """Change search parameters (nflip, nprobe) of an approximate kind."""
        with self._lock:
            self._backend.set_params(**params)

    # ------------------------------------------------------------ persistence

    def to_faiss(self) -> faiss.IndexBinary:
        """A copy as ``IndexBinaryIDMap2`` over this kind's FAISS index, labelled with the real ids.

        `faiss.write_index_binary` of it is a file plain FAISS reads and searches (distinct/auto store flat).
        """
        with self._lock:
            base = self._backend.empty_copy()
            wrapped = faiss.IndexBinaryIDMap2(base)
            wrapped.own_fields = True
            base.this.disown()
            if len(self):
                with single_faiss_thread():
                    wrapped.add_with_ids(self._codes, self._ids)
            return wrapped

    @classmethod
    def from_faiss(cls, wrapped: faiss.IndexBinary, bits: int, kind: Kind, codes: np.ndarray) -> "HammingIndex":
        """Rebuild from `to_faiss`'s output and the codes it holds; ValueError naming any disagreement."""
        if not isinstance(wrapped, faiss.IndexBinaryIDMap2):
            raise ValueError(f"expected a FAISS IndexBinaryIDMap2, got {type(wrapped).__name__}")
        if kind not in KINDS:
            raise ValueError(f"unknown index kind {kind!r}: choose one of {', '.join(KINDS)}")
        backend = BACKENDS[kind]
        base = faiss.downcast_IndexBinary(wrapped.index)
        if type(base) is not backend.faiss_type:
            raise ValueError(f"index kind {kind!r} needs a FAISS {backend.faiss_type.__name__}, the file holds {type(base).__name__}")
        if wrapped.d != 8 * code_bytes(bits):
            raise ValueError(f"{bits}-bit codes need a FAISS index of d={8 * code_bytes(bits)}, the file has d={wrapped.d}")
        ids = faiss.vector_to_array(wrapped.id_map).astype(np.int64)
        if wrapped.ntotal != len(codes) or len(ids) != len(codes):
            raise ValueError(f"the FAISS index holds {wrapped.ntotal} items but {len(codes)} codes were given")
        if backend.exact:
            stored = faiss.vector_to_array(base.xb).reshape(-1, code_bytes(bits))
            if not np.array_equal(stored, codes):
                raise ValueError("the codes in the FAISS index differ from the given codes")
        index = cls(bits, kind)
        index._backend = backend.from_faiss(wrapped.d, base)
        index.add(codes, ids)
        return index

    # -------------------------------------------------------------- internals

    def _extend_id_lookup(self, ids: np.ndarray, first_row: int) -> None:
        """Bring the id look-up up to date with rows appended from `first_row` instead of dropping it: one
        add then costs array copies (O(n)), not a sort (O(n log n))."""
        if self._sorted_ids is not None:
            sorted_ids, order = self._sorted_ids
            by_id = np.argsort(ids, kind="stable")
            at = np.searchsorted(sorted_ids, ids[by_id])
            self._sorted_ids = (np.insert(sorted_ids, at, ids[by_id]), np.insert(order, at, first_row + by_id))

    def _check_codes(self, codes: np.ndarray, what: str) -> np.ndarray:
        codes = np.asarray(codes)
        if codes.dtype != np.uint8 or codes.ndim != 2 or codes.shape[1] != self.nbytes:
            raise ValueError(
                f"{what} must be packed uint8 codes of shape (n, {self.nbytes}) for {self.bits} bits "
                f"(vdsh.index.codes.pack_codes), got {codes.dtype} array of shape {codes.shape}"
            )
        padding = 8 * self.nbytes - self.bits
        if padding and (codes[:, -1] & ((1 << padding) - 1)).any():
            raise ValueError(f"{what}: the {padding} padding bits after bit {self.bits} must be zero")
        return np.ascontiguousarray(codes)

    def _find_rows(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._sorted_ids is None:
            order = np.argsort(self._ids, kind="stable")
            self._sorted_ids = (self._ids[order], order)
        sorted_ids, order = self._sorted_ids
        pos = np.minimum(np.searchsorted(sorted_ids, ids), max(len(sorted_ids) - 1, 0))
        found = (sorted_ids[pos] == ids) if len(sorted_ids) else np.zeros(len(ids), dtype=bool)
        return (order[pos] if len(order) else np.zeros(len(ids), np.int64)), found

    def _gpu_searcher(self, device: str, batch: int):
        if device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'gpu', got {device!r}")
        if device == "cpu" or (device == "auto" and (batch < GPU_MIN_BATCH or not self._backend.exact)):
            return None
        from vdsh.index.gpu_search import gpu_backend, make_gpu_searcher

        if gpu_backend() is None:
            if device == "gpu":
                raise RuntimeError("device='gpu' but neither faiss-gpu nor torch sees a CUDA device")
            return None
        if not self._backend.exact:
            raise ValueError(f"GPU search is exact flat search; a {self.kind} index searches on the CPU")
        if self._gpu is None:
            self._gpu = make_gpu_searcher(self._codes, self.bits)
        return self._gpu


def _as_ids(ids) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim == 0:
        ids = ids.reshape(1)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(f"ids must be a 1-d integer array, got {ids.dtype} array of shape {ids.shape}")
    ids = ids.astype(np.int64)
    if (ids < 0).any():
        raise ValueError(f"ids must be >= 0 (-1 marks a missing result), got {_preview(ids[ids < 0])}")
    return ids


def _preview(values: np.ndarray, limit: int = 5) -> str:
    shown = ", ".join(str(int(v)) for v in values[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def _padded(ids: np.ndarray, dists: np.ndarray, k: int) -> SearchResult:
    q, found = ids.shape
    if found == k:
        return ids.astype(np.int64, copy=False), dists.astype(np.int32, copy=False)
    out_ids = np.full((q, k), -1, dtype=np.int64)
    out_d = np.full((q, k), -1, dtype=np.int32)
    out_ids[:, :found], out_d[:, :found] = ids, dists
    return out_ids, out_d
