"""Exact Hamming search that scores each distinct code once.

Codes learned with labels are strongly clustered: the items of one class share a handful of codes.
Grouping items by code makes a search cost follow the number of distinct codes `u`, not the number
of items `n`: the `u` codes are ranked (by `flat_scan`, or FAISS where it does not apply), then the
best codes are expanded to their items. Items that tie on distance come back by insertion order
(their row), exactly like a flat scan.
"""

from __future__ import annotations

import faiss
import numpy as np

from vdsh.index.codes import code_words, extended_code_words


def code_keys(codes: np.ndarray) -> np.ndarray:
    """One hashable, sortable key per packed code row (uint64 when a code fits in 8 bytes)."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    n, nbytes = codes.shape
    if nbytes <= 8:
        padded = np.zeros((n, 8), dtype=np.uint8)
        padded[:, :nbytes] = codes
        return padded.view(np.uint64).ravel()
    return codes.view(np.dtype((np.void, nbytes))).ravel()


def sort_by_distance_then_row(rows: np.ndarray, dists: np.ndarray, n_rows: int, k: int | None = None):
    """(rows, dists) ordered by (distance, row), keeping the first `k`; one int64 key, no ties left."""
    key = dists.astype(np.int64) * max(n_rows, 1) + rows
    if k is not None and k < len(key):
        key = key[np.argpartition(key, k - 1)[:k]]
    key = np.sort(key)
    return key % max(n_rows, 1), (key // max(n_rows, 1)).astype(np.int32)


class DistinctCodes:
    """Items grouped by identical code, with a FAISS flat index over the distinct codes only."""

    def __init__(self, codes: np.ndarray):
        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        self.n_rows, nbytes = codes.shape
        keys, first, inverse, counts = np.unique(
            code_keys(codes), return_index=True, return_inverse=True, return_counts=True
        )
        # distinct codes by key, to find a new code's group (codes added later go last, not in key order)
        self._sorted_keys, self._code_of_sorted = keys, np.arange(len(keys), dtype=np.int64)
        self.codes = codes[first]  # (u, nbytes): one row per distinct code
        self.counts = counts.astype(np.int64)  # items per distinct code
        # rows grouped by code; a stable sort keeps each group in insertion (row) order
        self.rows_by_code = np.argsort(inverse.ravel(), kind="stable").astype(np.int64)
        self.starts = np.cumsum(self.counts) - self.counts
        self.index = faiss.IndexBinaryFlat(8 * nbytes)
        self.index.add(self.codes)
        # FAISS's counting k-NN (one counter per distance) costs about one scan whatever k is, while
        # its heap's upkeep grows with k
        self.index.use_heap = False
        self.words = code_words(self.codes)  # for the compiled scan (flat_scan)

    def __len__(self) -> int:
        """Number of distinct codes."""
        return len(self.codes)

    def append(self, codes: np.ndarray) -> None:
        """Group `codes` as rows n_rows, n_rows + 1, ... in place: array copies (O(n)), no regrouping (a sort)
        of the rows already here. Each group keeps its rows in row order, the new ones last."""
        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        keys, first, inverse = np.unique(code_keys(codes), return_index=True, return_inverse=True)
        group, fresh = self._groups_of(keys)
        old_groups = len(self.codes)
        self.codes = np.concatenate([self.codes, codes[first[fresh]]])
        self.words = extended_code_words(self.words, self.codes, codes[first[fresh]])
        self.index.add(codes[first[fresh]])
        at = np.searchsorted(self._sorted_keys, keys[fresh])
        self._sorted_keys = np.insert(self._sorted_keys, at, keys[fresh])
        self._code_of_sorted = np.insert(self._code_of_sorted, at, group[fresh])
        self._regroup_rows(group[inverse.ravel()], old_groups)

    def _groups_of(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Distinct-code index of each (unique, sorted) key, numbering unknown ones after the known codes;
        and the positions of the unknown ones."""
        pos = np.minimum(np.searchsorted(self._sorted_keys, keys), len(self._sorted_keys) - 1)
        known = self._sorted_keys[pos] == keys
        group = self._code_of_sorted[pos].copy()
        fresh = np.flatnonzero(~known)
        group[fresh] = len(self.codes) + np.arange(len(fresh))
        return group, fresh

    def _regroup_rows(self, new_row_groups: np.ndarray, old_groups: int) -> None:
        """Make room in `rows_by_code` after each group's rows for its new rows (`new_row_groups[i]` is the
        group of row n_rows + i), and put them there."""
        added = np.bincount(new_row_groups, minlength=len(self.codes))
        old_counts = np.concatenate([self.counts, np.zeros(len(self.codes) - old_groups, np.int64)])
        counts = old_counts + added
        starts = np.cumsum(counts) - counts
        rows = np.empty(self.n_rows + len(new_row_groups), dtype=np.int64)
        shift = (starts[:old_groups] - self.starts)[np.repeat(np.arange(old_groups), self.counts)]
        rows[np.arange(self.n_rows) + shift] = self.rows_by_code
        order = np.argsort(new_row_groups, kind="stable")  # the new rows by group, in row order
        by_group = new_row_groups[order]
        rank = np.arange(len(order)) - (np.cumsum(added) - added)[by_group]
        rows[starts[by_group] + old_counts[by_group] + rank] = self.n_rows + order
        self.rows_by_code, self.counts, self.starts = rows, counts, starts
        self.n_rows += len(new_row_groups)

    def knn(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(q, min(k, n)) rows and int32 distances, by (distance, row); exact."""
        k = min(k, self.n_rows)
        # each code holds >= 1 item, so the k nearest codes hold the k nearest items; only the level of
        # the k-th distance may continue past them (then it is fetched whole, see _knn_one)
        code_idx, code_dists = self._nearest_codes(queries, min(k, len(self)))
        if len(queries) == 1:  # the interactive case: no copies
            rows, dists = self._knn_one(queries, code_dists[0], code_idx[0], k)
            return rows[None], dists[None]
        rows = np.empty((len(queries), k), dtype=np.int64)
        dists = np.empty((len(queries), k), dtype=np.int32)
        for i in range(len(queries)):
            rows[i], dists[i] = self._knn_one(queries[i : i + 1], code_dists[i], code_idx[i], k)
        return rows, dists

    def _nearest_codes(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(q, k) indices and distances of the nearest distinct codes, by (distance, index)."""
        from vdsh.index import flat_scan  # here, not at the top: numba is slow to import

        if flat_scan.supports(8 * self.codes.shape[1], k):
            return flat_scan.knn(self.words, queries, k)
        code_dists, code_idx = self.index.search(queries, k)
        return code_idx, code_dists

    def range(self, queries: np.ndarray, max_distance: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query: every row within `max_distance` (inclusive), by (distance, row)."""
        lims, code_dists, code_idx = self.index.range_search(queries, max_distance + 1)
        results = []
        for i in range(len(queries)):
            sel = slice(lims[i], lims[i + 1])
            codes, dists = code_idx[sel], code_dists[sel].astype(np.int32)
            results.append(self._gather_sorted(codes, dists, self.counts[codes], None))
        return results

    def _knn_one(self, query: np.ndarray, code_dists: np.ndarray, code_idx: np.ndarray, k: int):
        """The k best rows from the nearest codes (sorted by distance), which hold at least k items."""
        # plain Python over the window: cheaper than numpy calls on a hundred numbers
        dists, counts = code_dists.tolist(), self.counts[code_idx].tolist()
        boundary, total = 0, counts[0]
        while total < k:
            boundary += 1
            total += counts[boundary]
        kth = dists[boundary]  # the k-th item's distance
        first, end = boundary, boundary + 1  # the codes at distance kth within the window
        while first > 0 and dists[first - 1] == kth:
            first -= 1
        while end < len(dists) and dists[end] == kth:
            end += 1
        if end == len(dists) < len(self):
            # codes at distance kth may continue past the window; all must compete on row order
            return self._knn_from_range(query, kth, k)
        if first == boundary == end - 1 and all(dists[j] < dists[j + 1] for j in range(boundary)):
            return self._concatenate(code_idx[: boundary + 1], dists[: boundary + 1], k)
        return self._take_levels(code_idx[:end], code_dists[:end], first, k)

    def _knn_from_range(self, query: np.ndarray, kth: int, k: int):
        _, code_dists, code_idx = self.index.range_search(query, kth + 1)  # every code within kth
        order = np.argsort(code_dists, kind="stable")
        code_idx, code_dists = code_idx[order], code_dists[order]
        return self._take_levels(code_idx, code_dists, int(np.searchsorted(code_dists, kth)), k)

    def _take_levels(self, code_idx: np.ndarray, code_dists: np.ndarray, first: int, k: int):
        """Codes before `first` are nearer than the k-th distance and give all their rows; the others,
        at that distance, give their first rows; all merged by (distance, row)."""
        take = self.counts[code_idx]
        remaining = k - int(take[:first].sum())
        np.minimum(take[first:], remaining, out=take[first:])
        return self._gather_sorted(code_idx, code_dists.astype(np.int32), take, k)

    def _concatenate(self, code_idx: np.ndarray, dists: list[int], k: int):
        """Fast path: each code alone at its distance, so its rows follow the previous code's, in order."""
        if len(dists) == 1:
            start = int(self.starts[code_idx[0]])
            return self.rows_by_code[start : start + k], np.full(k, dists[0], dtype=np.int32)
        counts = self.counts[code_idx]
        rows = np.concatenate([self.rows_by_code[s : s + c] for s, c in zip(self.starts[code_idx].tolist(), counts.tolist())])
        return rows[:k], np.repeat(np.array(dists, dtype=np.int32), counts)[:k]

    def _gather_sorted(self, code_idx: np.ndarray, code_dists: np.ndarray, take: np.ndarray, k: int | None):
        """First `take[j]` rows of each code `code_idx[j]`, merged by (distance, row)."""
        total = int(take.sum())
        offsets = np.cumsum(take) - take
        flat = np.repeat(self.starts[code_idx] - offsets, take) + np.arange(total)
        rows = self.rows_by_code[flat]
        return sort_by_distance_then_row(rows, np.repeat(code_dists, take), self.n_rows, k)
