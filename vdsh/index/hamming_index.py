"""Hamming-ranked search over packed binary codes with int64 ids, backed by FAISS binary indexes.

Every answer is ordered by (Hamming distance, insertion order): items at the same distance come back
in the order they were added, so results are reproducible and identical to an exact brute-force
scan wherever the index kind is exact. Kinds:

- ``flat``: a full scan. Exact. k-NN on the CPU runs `vdsh.index.flat_scan` (a compiled scan: 0.05 ms
  for one query over 59k 64-bit codes, k=100, where FAISS's took 0.10-0.12 ms); range search and
  storage use FAISS ``IndexBinaryFlat``.
- ``distinct``: items grouped by identical code, each distinct code scored once (`DistinctCodes`).
  Exact; cost follows the number of distinct codes, which is small for learned supervised codes.
- ``auto``: ``flat`` storage that answers through ``distinct`` when codes repeat enough to pay. Exact.
- ``hash``, ``multihash``, ``ivf``: FAISS ``IndexBinaryHash`` / ``IndexBinaryMultiHash`` /
  ``IndexBinaryIVF``. k-NN is approximate (only buckets within ``nflip`` bits, or ``nprobe`` lists,
  are visited) and exact once exhaustive enough (see `HammingIndex.knn_is_exact`); `range_search`
  is always exact (the search parameters are raised for the call as the radius requires).

Internally FAISS labels are row numbers (insertion order, compacted on removal) and the ids live in a
numpy array next to the codes; `to_faiss` wraps a copy in ``IndexBinaryIDMap2`` with the real ids,
the file that plain FAISS reads.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import faiss
import numpy as np

from vdsh.index.codes import code_bytes, code_words, extended_code_words
from vdsh.index.distinct_codes import DistinctCodes, sort_by_distance_then_row

Kind = Literal["flat", "distinct", "auto", "hash", "multihash", "ivf"]
KINDS: tuple[str, ...] = ("flat", "distinct", "auto", "hash", "multihash", "ivf")
EXACT_KINDS: tuple[str, ...] = ("flat", "distinct", "auto")
# `auto` answers through the distinct codes when there are at most this many per item. Measured with
# `vdsh bench query` on 64-bit clustered codes, k=100, since the compiled flat scan (2-core machine
# under load): at u/n = 0.31 (59k items) flat took 0.046 ms a query, distinct 0.095; at u/n = 0.15
# (1M items) both ~0.17 ms for one query and distinct 2x faster in batches of 64 (0.27 vs 0.57 ms)
AUTO_DISTINCT_RATIO = 0.2
# FAISS runs on one OpenMP thread here; batches that scan more than this many codes (queries x codes)
# are split across Python threads instead (FAISS releases the GIL). Measured on the shared 2-core
# machine under load: one query over 1M codes took 1.6-2.2 ms on one OpenMP thread and 300-540 ms on
# two (OpenMP threads spin-wait for a descheduled partner; fine with OMP_WAIT_POLICY=PASSIVE, which a
# library cannot set once OpenMP has started). Python threads just sleep when descheduled.
PARALLEL_MIN_WORK = 1 << 22
# os.cpu_count() reads /sys on every call (8 us): once is enough
CORES = os.cpu_count() or 1
# GPU search pays off from batches this large (a transfer per call dominates smaller ones)
GPU_MIN_BATCH = 32

SearchResult = tuple[np.ndarray, np.ndarray]


class HammingIndex:
    """Packed binary codes with unique int64 ids; k-NN and radius search by Hamming distance.

    Safe to share between threads: every call holds one lock (a big batch is itself split across cores).
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
        self._params = _default_params(kind, 8 * self.nbytes, hash_bits, nflip, nhash, nlist, nprobe)
        self._codes = np.empty((0, self.nbytes), dtype=np.uint8)
        self._ids = np.empty(0, dtype=np.int64)
        self._faiss = None if kind == "distinct" else _new_faiss_index(kind, 8 * self.nbytes, self._params)
        self._lock = threading.RLock()
        self._invalidate()

    # ---------------------------------------------------------------- contents

    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        return f"HammingIndex(bits={self.bits}, kind={self.kind!r}, items={len(self)}, params={self.params})"

    @property
    def params(self) -> dict[str, int]:
        """The kind's search parameters (hash_bits, nflip, nhash, nlist, nprobe where they apply)."""
        return dict(self._params)

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
            with single_faiss_thread():
                if self.kind == "ivf" and not self._faiss.is_trained:
                    self._train_ivf(codes)
                if self._faiss is not None:
                    self._faiss.add(codes)
            first_row = len(self._ids)
            self._codes = np.concatenate([self._codes, codes])
            self._ids = np.concatenate([self._ids, ids])
            self._extend_caches(codes, ids, first_row)

    def remove(self, ids: np.ndarray) -> int:
        """Delete `ids` (KeyError naming any unknown one); later items keep their relative order."""
        ids = np.unique(_as_ids(ids))
        with self._lock:
            rows = self.rows_of(ids)
            keep = np.ones(len(self), dtype=bool)
            keep[rows] = False
            self._codes, self._ids = self._codes[keep], self._ids[keep]
            if self._faiss is not None:
                # FAISS labels are rows, which shift on removal: re-add (IVF keeps its trained quantizer)
                self._faiss.reset()
                with single_faiss_thread():
                    self._faiss.add(self._codes)
            self._invalidate()
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
            rows, dists = self._knn_rows(queries, min(k, len(self)), device)
            if self.kind in EXACT_KINDS:  # every row is found: k <= len(self)
                return _padded(self._ids[rows], dists, k)
            return _padded(np.where(rows >= 0, self._ids[np.maximum(rows, 0)], -1), dists, k)

    def range_search(self, queries: np.ndarray, radius: int) -> list[SearchResult]:
        """Per query, (ids, distances) of every item within Hamming distance `radius` (inclusive). Exact."""
        queries = self._check_codes(queries, "queries")
        if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or not 0 <= radius <= self.bits:
            raise ValueError(f"radius must be an integer in [0, {self.bits}], got {radius!r}")
        radius = int(radius)
        with self._lock:
            if len(self) == 0:
                return [(np.empty(0, np.int64), np.empty(0, np.int32)) for _ in range(len(queries))]
            if self.kind == "distinct" or (self.kind == "auto" and self._distinct_pays()):
                distinct = self._distinct_codes()
                parts = in_parallel(lambda q: distinct.range(q, radius), queries, len(distinct))
            else:
                with self._exhaustive_for(radius):
                    parts = in_parallel(lambda q: self._faiss_range(q, np.full(len(q), radius)), queries, len(self))
            results = [result for part in parts for result in part]
            return [(self._ids[rows], dists) for rows, dists in results]

    def knn_is_exact(self, kth_distance: int | None = None) -> bool:
        """Whether k-NN is exact: always for flat/distinct/auto; for the others once exhaustive enough.

        hash: every item within `nflip` bits of the query's `hash_bits` prefix is visited, so a k-NN
        answer whose k-th distance is <= nflip is exact; multihash: same with floor(d / nhash) <= nflip
        (pigeonhole over the `nhash` disjoint substrings); ivf: nprobe == nlist.
        """
        p = self._params
        if self.kind in EXACT_KINDS:
            return True
        if self.kind == "ivf":
            return p["nprobe"] >= p["nlist"]
        if self.kind == "hash":
            return p["nflip"] >= p["hash_bits"] or (kth_distance is not None and kth_distance <= p["nflip"])
        return p["nflip"] >= p["hash_bits"] or (kth_distance is not None and kth_distance // p["nhash"] <= p["nflip"])

    def set_params(self, **params: int) -> None:
        """Change search parameters (nflip, nprobe) of an approximate kind."""
        allowed = {"hash": {"nflip"}, "multihash": {"nflip"}, "ivf": {"nprobe"}}.get(self.kind, set())
        unknown = set(params) - allowed
        if unknown:
            raise ValueError(f"{self.kind} index has no settable parameter {sorted(unknown)}; settable: {sorted(allowed)}")
        with self._lock:
            for name, value in params.items():
                self._params[name] = int(value)
                setattr(self._faiss, name, int(value))

    # ------------------------------------------------------------ persistence

    def to_faiss(self) -> faiss.IndexBinary:
        """A copy as ``IndexBinaryIDMap2`` over this kind's FAISS index, labelled with the real ids.

        `faiss.write_index_binary` of it is a file plain FAISS reads and searches (distinct/auto store flat).
        """
        with self._lock:
            if self.kind == "ivf" and self._faiss.is_trained:
                base = faiss.clone_binary_index(self._faiss)
                base.reset()
            else:
                base = _new_faiss_index(self.kind, 8 * self.nbytes, self._params)
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
        base = faiss.downcast_IndexBinary(wrapped.index)
        expected_type = _faiss_type(kind)
        if type(base) is not expected_type:
            raise ValueError(f"index kind {kind!r} needs a FAISS {expected_type.__name__}, the file holds {type(base).__name__}")
        if wrapped.d != 8 * code_bytes(bits):
            raise ValueError(f"{bits}-bit codes need a FAISS index of d={8 * code_bytes(bits)}, the file has d={wrapped.d}")
        ids = faiss.vector_to_array(wrapped.id_map).astype(np.int64)
        if wrapped.ntotal != len(codes) or len(ids) != len(codes):
            raise ValueError(f"the FAISS index holds {wrapped.ntotal} items but {len(codes)} codes were given")
        if kind in ("flat", "distinct", "auto"):
            stored = faiss.vector_to_array(base.xb).reshape(-1, code_bytes(bits))
            if not np.array_equal(stored, codes):
                raise ValueError("the codes in the FAISS index differ from the given codes")
        params = {name: int(getattr(base, attr)) for name, attr in _PARAM_ATTRS[kind].items()}
        if kind == "ivf" and not base.is_trained:
            params = {}  # an empty IVF saved before training: lists are chosen at the first add
        index = cls(bits, kind, **params)
        if kind == "ivf":
            trained = faiss.clone_binary_index(base)  # keeps the trained quantizer; an owned copy
            trained.reset()
            index._faiss = trained
        index.add(codes, ids)
        return index

    # -------------------------------------------------------------- internals

    def _invalidate(self) -> None:
        self._sorted_ids: tuple[np.ndarray, np.ndarray] | None = None
        self._distinct: DistinctCodes | None = None
        self._words: np.ndarray | None = None
        self._gpu = None

    def _extend_caches(self, codes: np.ndarray, ids: np.ndarray, first_row: int) -> None:
        """Bring the look-up structures up to date with rows appended from `first_row` instead of dropping
        them: one add then costs array copies (O(n)), not the sorts and grouping of a rebuild (O(n log n))."""
        if self._sorted_ids is not None:
            sorted_ids, order = self._sorted_ids
            by_id = np.argsort(ids, kind="stable")
            at = np.searchsorted(sorted_ids, ids[by_id])
            self._sorted_ids = (np.insert(sorted_ids, at, ids[by_id]), np.insert(order, at, first_row + by_id))
        if self._distinct is not None:
            self._distinct.append(codes)
        if self._words is not None:
            self._words = extended_code_words(self._words, self._codes, codes)
        self._gpu = None

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

    def _distinct_codes(self) -> DistinctCodes:
        if self._distinct is None:
            self._distinct = DistinctCodes(self._codes)
        return self._distinct

    def _distinct_pays(self) -> bool:
        return len(self._distinct_codes()) <= AUTO_DISTINCT_RATIO * len(self)

    def _knn_rows(self, queries: np.ndarray, k: int, device: str) -> SearchResult:
        gpu = self._gpu_searcher(device, len(queries))
        if gpu is not None:
            return gpu.knn(queries, k)
        if self.kind == "distinct" or (self.kind == "auto" and self._distinct_pays()):
            distinct = self._distinct_codes()
            parts = in_parallel(lambda q: distinct.knn(q, k), queries, len(distinct))
        elif self.kind in ("flat", "auto"):
            search, calls_faiss = self._flat_knn(k)
            parts = in_parallel(search, queries, len(self), calls_faiss)
        else:
            parts = in_parallel(lambda q: self._approximate_knn(q, k), queries, len(self))
        if len(parts) == 1:
            return parts[0]
        return np.concatenate([rows for rows, _ in parts]), np.concatenate([dists for _, dists in parts])

    def _flat_knn(self, k: int):
        """Exact k-NN over every row for this k, and whether it calls FAISS: the compiled scan where it
        applies, else FAISS's flat search.

        Both keep the earliest rows on ties (checked by the tests). The scan's words are built here,
        under the lock, so that the worker threads only read them.
        """
        from vdsh.index import flat_scan  # here, not at the top: numba takes 0.3 s to import

        if flat_scan.supports(self.bits, k):
            if self._words is None:
                self._words = code_words(self._codes)
            words = self._words
            return (lambda queries: flat_scan.knn(words, queries, k)), False

        def faiss_knn(queries: np.ndarray) -> SearchResult:
            dists, rows = self._faiss.search(queries, k)
            return rows, dists

        return faiss_knn, True

    def _approximate_knn(self, queries: np.ndarray, k: int) -> SearchResult:
        """Hash/IVF k-NN with ties settled by row: every visited item up to the k-th distance competes."""
        dists, rows = self._faiss.search(queries, k)
        kth = np.where(rows >= 0, dists, -1).max(axis=1)
        results = self._faiss_range(queries, kth)
        rows = np.full((len(queries), k), -1, dtype=np.int64)
        out = np.full((len(queries), k), -1, dtype=np.int32)
        for i, (r, d) in enumerate(results):
            rows[i, : min(k, len(r))], out[i, : min(k, len(r))] = r[:k], d[:k]
        return rows, out

    def _faiss_range(self, queries: np.ndarray, max_distances: np.ndarray) -> list[SearchResult]:
        """Per query, visited rows within its own max distance (inclusive), by (distance, row)."""
        results: list[SearchResult] = [None] * len(queries)  # type: ignore[list-item]
        for radius in np.unique(max_distances):
            which = np.flatnonzero(max_distances == radius)
            if radius < 0:
                for i in which:
                    results[i] = (np.empty(0, np.int64), np.empty(0, np.int32))
                continue
            lims, dists, rows = self._faiss.range_search(queries[which], int(radius) + 1)
            for j, i in enumerate(which):
                sel = slice(lims[j], lims[j + 1])
                results[i] = sort_by_distance_then_row(rows[sel], dists[sel].astype(np.int32), len(self))
        return results

    def _exhaustive_for(self, radius: int) -> "_TemporaryParams":
        p = self._params
        if self.kind == "hash":
            return _TemporaryParams(self._faiss, nflip=max(p["nflip"], min(p["hash_bits"], radius)))
        if self.kind == "multihash":
            return _TemporaryParams(self._faiss, nflip=max(p["nflip"], min(p["hash_bits"], radius // p["nhash"])))
        if self.kind == "ivf":
            return _TemporaryParams(self._faiss, nprobe=p["nlist"])
        return _TemporaryParams(self._faiss)

    def _train_ivf(self, codes: np.ndarray) -> None:
        nlist = self._params["nlist"] or default_nlist(len(codes))
        if len(codes) < nlist:
            raise ValueError(f"an IVF index with nlist={nlist} needs at least {nlist} codes in its first add, got {len(codes)}")
        if nlist != self._faiss.nlist:
            self._faiss = _new_faiss_index("ivf", 8 * self.nbytes, {**self._params, "nlist": nlist})
        self._params["nlist"] = nlist
        self._params["nprobe"] = min(self._params["nprobe"] or max(1, nlist // 16), nlist)
        self._faiss.nprobe = self._params["nprobe"]
        # k-means on 39 codes per list (FAISS's minimum) keeps training seconds even at millions of codes
        self._faiss.cp.max_points_per_centroid = 39
        self._faiss.train(codes)

    def _gpu_searcher(self, device: str, batch: int):
        if device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'gpu', got {device!r}")
        if device == "cpu" or (device == "auto" and (batch < GPU_MIN_BATCH or self.kind not in EXACT_KINDS)):
            return None
        from vdsh.index.gpu_search import gpu_backend, make_gpu_searcher

        if gpu_backend() is None:
            if device == "gpu":
                raise RuntimeError("device='gpu' but neither faiss-gpu nor torch sees a CUDA device")
            return None
        if self.kind not in EXACT_KINDS:
            raise ValueError(f"GPU search is exact flat search; a {self.kind} index searches on the CPU")
        if self._gpu is None:
            self._gpu = make_gpu_searcher(self._codes, self.bits)
        return self._gpu


@contextlib.contextmanager
def single_faiss_thread():
    """FAISS on one OpenMP thread in this thread (OpenMP's thread count is per calling thread)."""
    saved = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(saved)


@functools.lru_cache(maxsize=1)
def _search_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=CORES, thread_name_prefix="vdsh-search")


def in_parallel(search, queries: np.ndarray, codes_per_query: int, calls_faiss: bool = True) -> list:
    """`search` over chunks of `queries`, one chunk per core when the batch is big enough, in order.

    FAISS is held to one OpenMP thread while `search` runs, unless it does not call FAISS
    (`calls_faiss=False`: the compiled scan), which spares three calls into FAISS (2 us).
    """
    threads = single_faiss_thread if calls_faiss else contextlib.nullcontext
    workers = min(CORES, len(queries))
    if workers < 2 or len(queries) * codes_per_query < PARALLEL_MIN_WORK:
        with threads():
            return [search(queries)]

    def run(chunk: np.ndarray):
        with threads():
            return search(chunk)

    return list(_search_pool().map(run, np.array_split(queries, workers)))


class _TemporaryParams:
    """Set FAISS search parameters for one call and restore them, even on error."""

    def __init__(self, index, **params: int):
        self.index, self.params = index, params
        self.saved = {name: getattr(index, name) for name in params}

    def __enter__(self):
        for name, value in self.params.items():
            setattr(self.index, name, value)

    def __exit__(self, *exc):
        for name, value in self.saved.items():
            setattr(self.index, name, value)


_PARAM_ATTRS: dict[str, dict[str, str]] = {
    "flat": {},
    "distinct": {},
    "auto": {},
    "hash": {"hash_bits": "b", "nflip": "nflip"},
    "multihash": {"hash_bits": "b", "nflip": "nflip", "nhash": "nhash"},
    "ivf": {"nlist": "nlist", "nprobe": "nprobe"},
}


def default_nlist(n: int) -> int:
    """IVF lists for `n` codes: ~sqrt(n) (FAISS's rule of thumb), with the 39 training codes per list FAISS
    asks for, and at most 1024 so that training stays seconds on 2 cores."""
    return int(max(1, min(round(math.sqrt(n)), n // 39, 1024)))


def _default_params(kind, d, hash_bits, nflip, nhash, nlist, nprobe) -> dict[str, int]:
    given = {"hash_bits": hash_bits, "nflip": nflip, "nhash": nhash, "nlist": nlist, "nprobe": nprobe}
    wanted = set(_PARAM_ATTRS[kind])
    extra = sorted(name for name, value in given.items() if value is not None and name not in wanted)
    if extra:
        raise ValueError(f"{kind} index takes no parameter {extra}")
    if kind == "hash":
        b = hash_bits or min(d, 16)  # 2^16 buckets: about one code per bucket at 59k items
        return {"hash_bits": _in_range("hash_bits", b, 1, min(d, 64)), "nflip": _in_range("nflip", 2 if nflip is None else nflip, 0, b)}
    if kind == "multihash":
        nh = nhash or max(1, min(4, d // 16))
        b = hash_bits or min(16, d // nh)
        if nh * b > d:
            raise ValueError(f"multihash needs nhash * hash_bits <= {d}, got {nh} * {b}")
        return {"hash_bits": b, "nhash": nh, "nflip": _in_range("nflip", 1 if nflip is None else nflip, 0, b)}
    if kind == "ivf":
        return {"nlist": nlist or 0, "nprobe": nprobe or 0}  # 0: chosen at the first add (training)
    return {}


def _new_faiss_index(kind: str, d: int, params: dict[str, int]):
    if kind in ("flat", "distinct", "auto"):
        return faiss.IndexBinaryFlat(d)
    if kind == "hash":
        index = faiss.IndexBinaryHash(d, params["hash_bits"])
    elif kind == "multihash":
        index = faiss.IndexBinaryMultiHash(d, params["nhash"], params["hash_bits"])
    else:
        quantizer = faiss.IndexBinaryFlat(d)
        index = faiss.IndexBinaryIVF(quantizer, d, max(params["nlist"], 1))
        index.own_fields = True
        quantizer.this.disown()
        index.nprobe = max(params["nprobe"], 1)
        return index
    index.nflip = params["nflip"]
    return index


def _faiss_type(kind: str) -> type:
    return {
        "flat": faiss.IndexBinaryFlat,
        "distinct": faiss.IndexBinaryFlat,
        "auto": faiss.IndexBinaryFlat,
        "hash": faiss.IndexBinaryHash,
        "multihash": faiss.IndexBinaryMultiHash,
        "ivf": faiss.IndexBinaryIVF,
    }[kind]


def _in_range(name: str, value: int, low: int, high: int) -> int:
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return int(value)


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
