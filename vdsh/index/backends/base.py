"""What every index kind shares: the `Backend` interface, and FAISS calls spread over the cores.

A backend owns one kind's search structures over the codes a `HammingIndex` holds (a FAISS index,
caches) and answers in rows (insertion order), ties by row; `HammingIndex` keeps the codes, the ids,
the lock and the GPU path.
"""

from __future__ import annotations

import contextlib
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar

import faiss
import numpy as np

from vdsh.index.distinct_codes import sort_by_distance_then_row

SearchResult = tuple[np.ndarray, np.ndarray]

# FAISS runs on one OpenMP thread here; batches that scan more than this many codes (queries x codes)
# are split across Python threads instead (FAISS releases the GIL). Two OpenMP threads spin-wait for a
# descheduled partner on a loaded machine (fine with OMP_WAIT_POLICY=PASSIVE, which a library cannot
# set once OpenMP has started), which makes a search far slower on a loaded machine; Python threads just
# sleep when descheduled.
PARALLEL_MIN_WORK = 1 << 22
# os.cpu_count() reads /sys on every call: once is enough
CORES = os.cpu_count() or 1


class Backend:
    """One index kind. Subclasses set the class attributes and override what their kind does differently.

    `codes` arguments are all the index's codes in row order; `knn` gets 1 <= k <= len(codes).
    """

    kind: ClassVar[str]
    exact: ClassVar[bool] = True  # k-NN always exact (then a GPU may answer it too)
    faiss_type: ClassVar[type] = faiss.IndexBinaryFlat  # what `to_faiss` wraps and `from_faiss` expects
    faiss_params: ClassVar[dict[str, str]] = {}  # search parameter -> the FAISS index's attribute
    settable: ClassVar[frozenset[str]] = frozenset()  # parameters `set_params` may change

    def __init__(self, d: int, params: dict[str, int]):
        self.d, self.params = d, params
        self.faiss = self.new_faiss()

    @classmethod
    def default_params(cls, d: int, given: dict[str, int]) -> dict[str, int]:
        """The kind's parameters from those given (names already checked against `faiss_params`)."""
        return {}

    def new_faiss(self) -> faiss.IndexBinary | None:
        """An empty FAISS index of this kind, or None where the kind keeps none."""
        return faiss.IndexBinaryFlat(self.d)

    def empty_copy(self) -> faiss.IndexBinary:
        """An empty, owned FAISS index of this kind for `HammingIndex.to_faiss` (trained state kept)."""
        return self.new_faiss()

    @classmethod
    def from_faiss(cls, d: int, base: faiss.IndexBinary) -> "Backend":
        """An empty backend with the parameters (and training) of a saved FAISS index of `faiss_type`."""
        return cls(d, cls.default_params(d, {name: int(getattr(base, attr)) for name, attr in cls.faiss_params.items()}))

    def add(self, codes: np.ndarray, added: np.ndarray) -> None:
        """`added` were appended: `codes` ends with them."""
        if self.faiss is not None:
            with single_faiss_thread():
                self.faiss.add(added)

    def rebuild(self, codes: np.ndarray) -> None:
        """Rows were removed: FAISS labels are rows, which shift, so re-add (IVF keeps its quantizer)."""
        if self.faiss is not None:
            self.faiss.reset()
            with single_faiss_thread():
                self.faiss.add(codes)

    def knn(self, codes: np.ndarray, queries: np.ndarray, k: int) -> SearchResult:
        raise NotImplementedError

    def range(self, codes: np.ndarray, queries: np.ndarray, radius: int) -> list[SearchResult]:
        """Per query, rows within `radius` by (distance, row); exact for every kind."""
        with self.exhaustive_for(radius):
            parts = in_parallel(lambda q: faiss_range(self.faiss, q, np.full(len(q), radius), len(codes)), queries, len(codes))
        return [result for part in parts for result in part]

    def exhaustive_for(self, radius: int) -> contextlib.AbstractContextManager:
        """Search parameters under which FAISS's range search visits every item within `radius`."""
        return contextlib.nullcontext()

    def knn_is_exact(self, kth_distance: int | None = None) -> bool:
        return self.exact

    def set_params(self, **params: int) -> None:
        unknown = set(params) - self.settable
        if unknown:
            raise ValueError(f"{self.kind} index has no settable parameter {sorted(unknown)}; settable: {sorted(self.settable)}")
        for name, value in params.items():
            self.params[name] = int(value)
            setattr(self.faiss, name, int(value))


def faiss_range(index: faiss.IndexBinary, queries: np.ndarray, max_distances: np.ndarray, n_rows: int) -> list[SearchResult]:
    """Per query, the rows FAISS visits within its own max distance (inclusive), by (distance, row)."""
    results: list[SearchResult] = [None] * len(queries)  # type: ignore[list-item]
    for radius in np.unique(max_distances):
        which = np.flatnonzero(max_distances == radius)
        if radius < 0:
            for i in which:
                results[i] = (np.empty(0, np.int64), np.empty(0, np.int32))
            continue
        lims, dists, rows = index.range_search(queries[which], int(radius) + 1)
        for j, i in enumerate(which):
            sel = slice(lims[j], lims[j + 1])
            results[i] = sort_by_distance_then_row(rows[sel], dists[sel].astype(np.int32), n_rows)
    return results


def joined(parts: list[SearchResult]) -> SearchResult:
    """The per-chunk k-NN answers of `in_parallel` as one."""
    if len(parts) == 1:
        return parts[0]
    return np.concatenate([rows for rows, _ in parts]), np.concatenate([dists for _, dists in parts])


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
    (`calls_faiss=False`: the compiled scan), which spares three calls into FAISS.
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


class TemporaryParams:
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


def in_range(name: str, value: int, low: int, high: int) -> int:
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return int(value)
