"""The exact kinds: `flat` (a full scan), `distinct` (each distinct code scored once) and `auto` (flat
storage that answers through the distinct codes when codes repeat enough to pay).

k-NN over every row runs `vdsh.index.flat_scan` (a compiled scan, faster than FAISS's flat search:
BENCHMARKS.md, "Search latency") where it applies, else FAISS's ``IndexBinaryFlat``; range search
and storage use FAISS. Every answer equals a brute-force scan's, ties by row.
"""

from __future__ import annotations

import faiss
import numpy as np

from vdsh.index.backends.base import Backend, SearchResult, in_parallel, joined
from vdsh.index.codes import code_words, extended_code_words
from vdsh.index.distinct_codes import DistinctCodes

# `auto` answers through the distinct codes when there are at most this many per item: between the
# ratios of BENCHMARKS.md, "Search latency", 2 % flips: a third at 59,000 items (flat the faster there)
# and a seventh at 1,000,000 (distinct the faster in batches)
AUTO_DISTINCT_RATIO = 0.2


class Flat(Backend):
    """Every row scanned; the scan's words are a cache over the codes, extended on add."""

    kind = "flat"

    def __init__(self, d: int, params: dict[str, int]):
        super().__init__(d, params)
        self.words: np.ndarray | None = None

    def add(self, codes: np.ndarray, added: np.ndarray) -> None:
        super().add(codes, added)
        if self.words is not None:
            self.words = extended_code_words(self.words, codes, added)

    def rebuild(self, codes: np.ndarray) -> None:
        super().rebuild(codes)
        self.words = None

    def knn(self, codes: np.ndarray, queries: np.ndarray, k: int) -> SearchResult:
        search, calls_faiss = self._flat_knn(codes, k)
        return joined(in_parallel(search, queries, len(codes), calls_faiss))

    def _flat_knn(self, codes: np.ndarray, k: int):
        """Exact k-NN over every row for this k, and whether it calls FAISS: the compiled scan where it
        applies, else FAISS's flat search.

        Both keep the earliest rows on ties (checked by the tests). The scan's words are built here,
        under the index's lock, so that the worker threads only read them.
        """
        from vdsh.index import flat_scan  # here, not at the top: numba is slow to import

        if flat_scan.supports(8 * codes.shape[1], k):
            if self.words is None:
                self.words = code_words(codes)
            words = self.words
            return (lambda queries: flat_scan.knn(words, queries, k)), False

        def faiss_knn(queries: np.ndarray) -> SearchResult:
            dists, rows = self.faiss.search(queries, k)
            return rows, dists

        return faiss_knn, True


class Distinct(Backend):
    """Items grouped by identical code (`DistinctCodes`), built at the first search and extended on add;
    cost follows the number of distinct codes, which is small for learned supervised codes. Keeps no
    FAISS index of the items; its file holds a flat one."""

    kind = "distinct"

    def __init__(self, d: int, params: dict[str, int]):
        super().__init__(d, params)
        self.distinct: DistinctCodes | None = None

    def new_faiss(self) -> None:
        return None

    def empty_copy(self) -> faiss.IndexBinary:
        return faiss.IndexBinaryFlat(self.d)  # its file holds the codes in a flat index

    def add(self, codes: np.ndarray, added: np.ndarray) -> None:
        super().add(codes, added)
        if self.distinct is not None:
            self.distinct.append(added)

    def rebuild(self, codes: np.ndarray) -> None:
        super().rebuild(codes)
        self.distinct = None

    def distinct_codes(self, codes: np.ndarray) -> DistinctCodes:
        if self.distinct is None:
            self.distinct = DistinctCodes(codes)
        return self.distinct

    def knn(self, codes: np.ndarray, queries: np.ndarray, k: int) -> SearchResult:
        distinct = self.distinct_codes(codes)
        return joined(in_parallel(lambda q: distinct.knn(q, k), queries, len(distinct)))

    def range(self, codes: np.ndarray, queries: np.ndarray, radius: int) -> list[SearchResult]:
        distinct = self.distinct_codes(codes)
        parts = in_parallel(lambda q: distinct.range(q, radius), queries, len(distinct))
        return [result for part in parts for result in part]


class Auto(Flat):
    """Flat storage and scan, answering through the distinct codes while they are at most
    AUTO_DISTINCT_RATIO of the items."""

    kind = "auto"

    def __init__(self, d: int, params: dict[str, int]):
        super().__init__(d, params)
        self.grouped = Distinct(d, params)  # its caches only: it keeps no FAISS index

    def add(self, codes: np.ndarray, added: np.ndarray) -> None:
        super().add(codes, added)
        self.grouped.add(codes, added)

    def rebuild(self, codes: np.ndarray) -> None:
        super().rebuild(codes)
        self.grouped.rebuild(codes)

    @property
    def distinct(self) -> DistinctCodes | None:
        return self.grouped.distinct

    def distinct_pays(self, codes: np.ndarray) -> bool:
        return len(self.grouped.distinct_codes(codes)) <= AUTO_DISTINCT_RATIO * len(codes)

    def knn(self, codes: np.ndarray, queries: np.ndarray, k: int) -> SearchResult:
        if self.distinct_pays(codes):
            return self.grouped.knn(codes, queries, k)
        return super().knn(codes, queries, k)

    def range(self, codes: np.ndarray, queries: np.ndarray, radius: int) -> list[SearchResult]:
        if self.distinct_pays(codes):
            return self.grouped.range(codes, queries, radius)
        return super().range(codes, queries, radius)
