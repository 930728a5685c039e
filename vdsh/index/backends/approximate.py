"""The approximate kinds: FAISS ``IndexBinaryHash`` (`hash`), ``IndexBinaryMultiHash`` (`multihash`) and
``IndexBinaryIVF`` (`ivf`).

k-NN visits only the buckets within ``nflip`` bits of the query's hashed prefix (or ``nprobe`` lists)
and is exact once exhaustive enough (`knn_is_exact`); ties are settled by row over every visited item up
to the k-th distance. Range search is always exact: the search parameters are raised for the call as
the radius requires.
"""

from __future__ import annotations

import math

import faiss
import numpy as np

from vdsh.index.backends.base import (Backend, SearchResult, TemporaryParams, faiss_range, in_parallel, in_range, joined,
                                     single_faiss_thread)


class Approximate(Backend):
    """What the approximate kinds share: k-NN from FAISS's answer and a range search up to its k-th distance."""

    exact = False

    def knn(self, codes: np.ndarray, queries: np.ndarray, k: int) -> SearchResult:
        return joined(in_parallel(lambda q: self._knn(q, k, len(codes)), queries, len(codes)))

    def _knn(self, queries: np.ndarray, k: int, n_rows: int) -> SearchResult:
        """Ties settled by row: every visited item up to the k-th distance competes."""
        dists, rows = self.faiss.search(queries, k)
        kth = np.where(rows >= 0, dists, -1).max(axis=1)
        results = faiss_range(self.faiss, queries, kth, n_rows)
        rows = np.full((len(queries), k), -1, dtype=np.int64)
        out = np.full((len(queries), k), -1, dtype=np.int32)
        for i, (r, d) in enumerate(results):
            rows[i, : min(k, len(r))], out[i, : min(k, len(r))] = r[:k], d[:k]
        return rows, out


class Hash(Approximate):
    """Items bucketed by their first `hash_bits` bits; a query visits the buckets within `nflip` bits, so
    a k-NN answer whose k-th distance is <= nflip is exact."""

    kind = "hash"
    faiss_type = faiss.IndexBinaryHash
    faiss_params = {"hash_bits": "b", "nflip": "nflip"}
    settable = frozenset({"nflip"})

    @classmethod
    def default_params(cls, d: int, given: dict[str, int]) -> dict[str, int]:
        b = given.get("hash_bits") or min(d, 16)  # 2^16 buckets: about one code per bucket at 59k items
        nflip = given.get("nflip")
        return {"hash_bits": in_range("hash_bits", b, 1, min(d, 64)), "nflip": in_range("nflip", 2 if nflip is None else nflip, 0, b)}

    def new_faiss(self) -> faiss.IndexBinary:
        index = faiss.IndexBinaryHash(self.d, self.params["hash_bits"])
        index.nflip = self.params["nflip"]
        return index

    def exhaustive_for(self, radius: int) -> TemporaryParams:
        p = self.params
        return TemporaryParams(self.faiss, nflip=max(p["nflip"], min(p["hash_bits"], self._flips_needed(radius))))

    def _flips_needed(self, distance: int) -> int:
        return distance

    def knn_is_exact(self, kth_distance: int | None = None) -> bool:
        p = self.params
        return p["nflip"] >= p["hash_bits"] or (kth_distance is not None and self._flips_needed(kth_distance) <= p["nflip"])


class MultiHash(Hash):
    """`nhash` disjoint substrings of `hash_bits` bits, each hashed like `Hash`: an item within distance d
    differs in at most floor(d / nhash) bits in one of them (pigeonhole), so k-NN is exact when that is
    <= nflip."""

    kind = "multihash"
    faiss_type = faiss.IndexBinaryMultiHash
    faiss_params = {"hash_bits": "b", "nflip": "nflip", "nhash": "nhash"}

    @classmethod
    def default_params(cls, d: int, given: dict[str, int]) -> dict[str, int]:
        nh = given.get("nhash") or max(1, min(4, d // 16))
        b = given.get("hash_bits") or min(16, d // nh)
        if nh * b > d:
            raise ValueError(f"multihash needs nhash * hash_bits <= {d}, got {nh} * {b}")
        nflip = given.get("nflip")
        return {"hash_bits": b, "nhash": nh, "nflip": in_range("nflip", 1 if nflip is None else nflip, 0, b)}

    def new_faiss(self) -> faiss.IndexBinary:
        index = faiss.IndexBinaryMultiHash(self.d, self.params["nhash"], self.params["hash_bits"])
        index.nflip = self.params["nflip"]
        return index

    def _flips_needed(self, distance: int) -> int:
        return distance // self.params["nhash"]


class IVF(Approximate):
    """Inverted lists around k-means centroids, trained at the first add (`default_nlist` lists unless
    given); a query visits `nprobe` lists, so k-NN is exact when nprobe == nlist."""

    kind = "ivf"
    faiss_type = faiss.IndexBinaryIVF
    faiss_params = {"nlist": "nlist", "nprobe": "nprobe"}
    settable = frozenset({"nprobe"})

    @classmethod
    def default_params(cls, d: int, given: dict[str, int]) -> dict[str, int]:
        return {"nlist": given.get("nlist") or 0, "nprobe": given.get("nprobe") or 0}  # 0: chosen at training

    @classmethod
    def from_faiss(cls, d: int, base: faiss.IndexBinary) -> "IVF":
        if not base.is_trained:  # an empty IVF saved before training: lists are chosen at the first add
            return cls(d, cls.default_params(d, {}))
        backend = super().from_faiss(d, base)
        backend.faiss = faiss.clone_binary_index(base)  # keeps the trained quantizer; an owned copy
        backend.faiss.reset()
        return backend

    def new_faiss(self) -> faiss.IndexBinary:
        quantizer = faiss.IndexBinaryFlat(self.d)
        index = faiss.IndexBinaryIVF(quantizer, self.d, max(self.params["nlist"], 1))
        index.own_fields = True
        quantizer.this.disown()
        index.nprobe = max(self.params["nprobe"], 1)
        return index

    def empty_copy(self) -> faiss.IndexBinary:
        if not self.faiss.is_trained:
            return self.new_faiss()
        copy = faiss.clone_binary_index(self.faiss)
        copy.reset()
        return copy

    def add(self, codes: np.ndarray, added: np.ndarray) -> None:
        if not self.faiss.is_trained:
            self._train(added)
        super().add(codes, added)

    def _train(self, codes: np.ndarray) -> None:
        nlist = self.params["nlist"] or default_nlist(len(codes))
        if len(codes) < nlist:
            raise ValueError(f"an IVF index with nlist={nlist} needs at least {nlist} codes in its first add, got {len(codes)}")
        self.params["nlist"] = nlist
        if nlist != self.faiss.nlist:
            self.faiss = self.new_faiss()
        self.params["nprobe"] = min(self.params["nprobe"] or max(1, nlist // 16), nlist)
        self.faiss.nprobe = self.params["nprobe"]
        # k-means on 39 codes per list (FAISS's minimum) keeps training short even at millions of codes
        self.faiss.cp.max_points_per_centroid = 39
        with single_faiss_thread():
            self.faiss.train(codes)

    def exhaustive_for(self, radius: int) -> TemporaryParams:
        return TemporaryParams(self.faiss, nprobe=self.params["nlist"])

    def knn_is_exact(self, kth_distance: int | None = None) -> bool:
        return self.params["nprobe"] >= self.params["nlist"]


def default_nlist(n: int) -> int:
    """IVF lists for `n` codes: ~sqrt(n) (FAISS's rule of thumb), with the 39 training codes per list FAISS
    asks for, and at most 1024 so that training stays short on a few cores."""
    return int(max(1, min(round(math.sqrt(n)), n // 39, 1024)))
