"""Exact Hamming k-NN by a compiled full scan: the CPU path of the exact flat search.

Why not FAISS's ``IndexBinaryFlat.search``: it computes one distance at a time and keeps a k-heap, whose
upkeep is a large share of a k=100 query. Here the distances of `CHUNK` codes are one loop that LLVM
vectorises (AVX2 popcount), and the k best are kept by counting per distance (the scheme of FAISS's
``hammings_knn_mc``) behind a byte-parallel test that skips 8 codes at once when none of them can
enter. Its latency through `HammingIndex.search`: BENCHMARKS.md, "Search latency" (the flat rows).

Answers equal IndexBinaryFlat's exactly: ordered by (distance, row), earliest rows first on ties.
Distances are bytes, so codes up to `MAX_BITS` bits; `supports` says when to use FAISS instead.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

from vdsh.index.codes import code_words

# codes whose distances are computed before the k-selection looks at them: 4 KiB of distances stay in L1
CHUNK = 4096
# distances are uint8 and 255 pads a chunk, so a code may have at most 3 words (192 bits)
MAX_BITS = 192
# the selection holds (bits + 1) x k rows per query: stay within 16 MiB, else FAISS's heap is the better tool
MAX_LEVEL_SLOTS = 1 << 21
# queries that scan the database together (each chunk read once for all of them), as memory allows
QUERY_GROUP = 16
_ONES = np.uint64(0x0101010101010101)
_HIGHS = np.uint64(0x8080808080808080)


def supports(bits: int, k: int) -> bool:
    """Whether `knn` handles this code length and k."""
    return bits <= MAX_BITS and _levels(bits) * k <= MAX_LEVEL_SLOTS


def _levels(bits: int) -> int:
    """Distances 0..64w the scan counts for codes of `bits` bits held in w 64-bit words."""
    return 64 * -(-bits // 64) + 1


def knn(words: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(q, k) rows and int32 distances of the k nearest codes, by (distance, row); needs 1 <= k <= n.

    `words` is `code_words(database)`, `queries` packed (q, nbytes) codes of the same length. Queries
    go through the database together, a group at a time, so that each chunk is read once per group.
    """
    query_words = _query_words(queries)
    rows = np.empty((len(queries), k), dtype=np.int64)
    dists = np.empty((len(queries), k), dtype=np.int32)
    group = max(1, min(QUERY_GROUP, MAX_LEVEL_SLOTS // (_levels(64 * words.shape[0]) * k)))
    if len(queries) <= group:  # the interactive case, one query: no slices (each costs a numpy call)
        _knn_group(words, query_words, k, rows, dists)
        return rows, dists
    for first in range(0, len(queries), group):
        end = first + group
        _knn_group(words, query_words[first:end], k, rows[first:end], dists[first:end])
    return rows, dists


def _query_words(queries: np.ndarray) -> np.ndarray:
    """(q, w) uint64 words of packed queries, zero-padded like `code_words`; a view for whole words."""
    queries = np.ascontiguousarray(queries)
    if queries.shape[1] % 8 == 0:
        return queries.view(np.uint64)
    return np.ascontiguousarray(code_words(queries).T)


@intrinsic
def _popcount(typingctx, x):
    """LLVM's ctpop, which the loop vectoriser turns into AVX2 byte look-ups."""

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return types.uint64(types.uint64), codegen


@njit(nogil=True, cache=True, boundscheck=False)
def _chunk_distances(words, query, start, m, dist):
    first = words[0, start : start + m]
    q0 = query[0]
    for j in range(m):
        dist[j] = np.uint8(_popcount(first[j] ^ q0))
    for i in range(1, words.shape[0]):
        row, qi = words[i, start : start + m], query[i]
        for j in range(m):
            dist[j] += np.uint8(_popcount(row[j] ^ qi))


@njit(nogil=True, cache=True, boundscheck=False)
def _knn_group(words, queries, k, out_rows, out_dists):
    bits, n, nq = 64 * words.shape[0], words.shape[1], queries.shape[0]
    dist = np.full(CHUNK, 255, np.uint8)
    counts = np.zeros((nq, bits + 1), np.int64)
    kept = np.empty((nq, bits + 1, k), np.int64)  # per query and distance, the earliest rows at it
    # per query: every kept row is within `worst`; `nearer` of them are nearer than `worst`; a new row
    # is needed only within `accept` (-1: k rows at distance 0, nothing can enter any more)
    state = np.empty((nq, 3), np.int64)
    state[:, 0], state[:, 1], state[:, 2] = bits, 0, bits
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        for q in range(nq):
            if state[q, 2] >= 0:
                _chunk_distances(words, queries[q], start, m, dist)
                dist[m:] = 255
                _select(dist, start, m, k, counts[q], kept[q], state[q])
    for q in range(nq):
        r = 0
        for d in range(state[q, 0] + 1):
            for slot in range(min(counts[q, d], k - r)):
                out_rows[q, r] = kept[q, d, slot]
                out_dists[q, r] = d
                r += 1


@njit(nogil=True, cache=True, boundscheck=False)
def _select(dist, start, m, k, counts, kept, state):
    """Offer rows start..start+m at distances `dist` to one query's k best (FAISS's counting scheme)."""
    worst, nearer, accept = state[0], state[1], state[2]
    eight = dist.view(np.uint64)  # 8 distances per word, for the byte-parallel test
    for w8 in range((m + 7) // 8):
        if accept < 127:  # any byte < accept + 1? (exact for bytes and bounds <= 128)
            x = eight[w8]
            if ((x - _ONES * np.uint64(accept + 1)) & ~x & _HIGHS) == 0:
                continue
        for j in range(8 * w8, 8 * w8 + 8):
            d = np.int64(dist[j])
            if d > accept:
                continue
            kept[d, counts[d]] = start + j
            counts[d] += 1
            if d < worst:
                nearer += 1
                while nearer >= k and worst > 0:  # rows at `worst` are no longer needed
                    worst -= 1
                    nearer -= counts[worst]
            accept = worst if nearer + counts[worst] < k else worst - 1
        if accept < 0:
            break
    state[0], state[1], state[2] = worst, nearer, accept
