"""HammingIndex answers like an exact brute-force scan with ties broken by insertion order."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from vdsh.index.bench import clustered_codes, search_latency
from vdsh.index.codes import pack_codes
from vdsh.index.gpu_search import TorchHammingSearcher, gpu_backend
from vdsh.index.backends import base as backends_base
from vdsh.index.hamming_index import EXACT_KINDS, KINDS, HammingIndex

EXHAUSTIVE = {
    "hash": {"hash_bits": 8, "nflip": 8},
    "multihash": {"nhash": 2, "hash_bits": 8, "nflip": 8},
    "ivf": {"nlist": 8, "nprobe": 8},
}


def hamming_matrix(queries: np.ndarray, database: np.ndarray) -> np.ndarray:
    """(q, n) Hamming distances of packed codes, by numpy alone."""
    return np.unpackbits(queries[:, None, :] ^ database[None, :, :], axis=2).sum(axis=2).astype(np.int32)


def brute_force_knn(queries, database, ids, k):
    """Reference: sort every item by (distance, insertion position); pad with -1 past the last item."""
    dist = hamming_matrix(queries, database)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    out_ids = np.full((len(queries), k), -1, dtype=np.int64)
    out_d = np.full((len(queries), k), -1, dtype=np.int32)
    found = order.shape[1]
    out_ids[:, :found] = ids[order]
    out_d[:, :found] = np.take_along_axis(dist, order, axis=1)
    return out_ids, out_d


def brute_force_range(queries, database, ids, radius):
    dist = hamming_matrix(queries, database)
    results = []
    for row in dist:
        order = np.argsort(row, kind="stable")
        order = order[row[order] <= radius]
        results.append((ids[order], row[order]))
    return results


@pytest.fixture(scope="module")
def tied_codes():
    """Clustered 64-bit codes with many exact duplicates and equal distances, ids in shuffled order."""
    database = clustered_codes(3000, 64, centres=6, flip=0.02, seed=1)
    queries = np.concatenate([clustered_codes(30, 64, centres=6, flip=0.05, seed=1, draw=1), database[:5]])
    ids = np.random.default_rng(0).permutation(10 * len(database))[: len(database)].astype(np.int64)
    assert len(np.unique(database, axis=0)) < len(database) // 2  # the point: many ties
    return database, queries, ids


def build(kind, database, ids, bits=64, **params):
    index = HammingIndex(bits, kind, **params)
    index.add(database, ids)
    return index


@pytest.mark.parametrize("kind", EXACT_KINDS)
@pytest.mark.parametrize("k", [1, 7, 100, 3100])
def test_exact_kinds_match_brute_force_with_stable_ties(tied_codes, kind, k):
    database, queries, ids = tied_codes
    got_ids, got_d = build(kind, database, ids).search(queries, k, device="cpu")
    want_ids, want_d = brute_force_knn(queries, database, ids, k)
    np.testing.assert_array_equal(got_d, want_d)
    np.testing.assert_array_equal(got_ids, want_ids)
    assert got_ids.dtype == np.int64 and got_d.dtype == np.int32


@pytest.mark.parametrize("kind", ["hash", "multihash", "ivf"])
@pytest.mark.parametrize("k", [1, 50, 3100])
def test_approximate_kinds_are_exact_when_exhaustive(tied_codes, kind, k):
    database, queries, ids = tied_codes
    index = build(kind, database, ids, **EXHAUSTIVE[kind])
    assert index.knn_is_exact()
    got = index.search(queries, k)
    want = brute_force_knn(queries, database, ids, k)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])


@pytest.mark.parametrize("kind", ["hash", "multihash", "ivf"])
def test_approximate_kinds_default_answers_are_true_distances_in_stable_order(tied_codes, kind):
    """Default settings may miss items, but never misreport one, and certified answers are exact."""
    database, queries, ids = tied_codes
    index = build(kind, database, ids)
    got_ids, got_d = index.search(queries, 20)
    want_ids, want_d = brute_force_knn(queries, database, ids, 20)
    position = {int(i): p for p, i in enumerate(ids)}
    true = hamming_matrix(queries, database)
    for q in range(len(queries)):
        valid = got_ids[q] >= 0
        rows = np.array([position[int(i)] for i in got_ids[q][valid]], dtype=np.int64)
        np.testing.assert_array_equal(got_d[q][valid], true[q, rows])
        keys = got_d[q][valid].astype(np.int64) * len(ids) + rows
        assert (np.diff(keys) > 0).all(), "not ordered by (distance, insertion)"
        if valid.all() and index.knn_is_exact(int(got_d[q, -1])):
            np.testing.assert_array_equal(got_ids[q], want_ids[q])
    # the finite search still finds most neighbours, or it would be no index at all
    recall = np.mean([len(np.intersect1d(g, w)) / 20 for g, w in zip(got_ids, want_ids)])
    assert recall > 0.5


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("radius", [0, 3, 9])
def test_range_search_is_exact_for_every_kind(tied_codes, kind, radius):
    database, queries, ids = tied_codes
    got = build(kind, database, ids).range_search(queries, radius)
    want = brute_force_range(queries, database, ids, radius)
    assert len(got) == len(want)
    for (gi, gd), (wi, wd) in zip(got, want):
        np.testing.assert_array_equal(gd, wd)
        np.testing.assert_array_equal(gi, wi)


def test_flat_tie_order_holds_across_faiss_blocks_and_threads():
    """70k items cross FAISS's scan blocks; batched queries run on both threads."""
    database = clustered_codes(70_000, 64, centres=4, flip=0.01, seed=3)
    queries = clustered_codes(12, 64, centres=4, flip=0.03, seed=3, draw=1)
    ids = np.arange(len(database), dtype=np.int64)[::-1].copy()
    want = brute_force_knn(queries, database, ids, 300)
    for kind in ("flat", "distinct"):
        got = build(kind, database, ids).search(queries, 300, device="cpu")
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("bits", [8, 20, 32, 64, 72, 128, 192])
def test_compiled_flat_scan_equals_faiss_flat_search(bits):
    """Across chunk borders, code lengths of 1-3 words, heavy ties and k from 1 to n: FAISS's exact answers."""
    from vdsh.index import flat_scan

    n = 2 * flat_scan.CHUNK + 123
    database = clustered_codes(n, bits, centres=5, flip=0.03, seed=bits)
    queries = np.concatenate([clustered_codes(20, bits, centres=5, flip=0.1, seed=bits, draw=1), database[[0, n - 1]]])
    reference = faiss.IndexBinaryFlat(8 * database.shape[1])
    reference.add(database)
    words = flat_scan.code_words(database)
    for k in (1, 9, 100, 1000, n):
        assert flat_scan.supports(bits, k)
        want_d, want_rows = reference.search(queries, k)
        rows, dists = flat_scan.knn(words, queries, k)
        np.testing.assert_array_equal(dists, want_d)
        np.testing.assert_array_equal(rows, want_rows)


def test_flat_scan_stops_at_k_exact_matches_and_keeps_the_earliest():
    """More than k copies of the query: the first k rows, none of the later copies."""
    from vdsh.index import flat_scan

    other = clustered_codes(5000, 64, centres=3, flip=0.2, seed=9)
    query = other[:1] ^ np.uint8(0xFF)
    database = np.concatenate([other[:700], np.repeat(query, 50, axis=0), other[700:], np.repeat(query, 50, axis=0)])
    rows, dists = flat_scan.knn(flat_scan.code_words(database), query, 30)
    np.testing.assert_array_equal(rows[0], np.arange(700, 730))
    assert (dists == 0).all()


def test_flat_kinds_fall_back_to_faiss_beyond_the_scan(monkeypatch):
    """256-bit codes (distances past a byte) and huge k take FAISS's flat search, with the same answers."""
    from vdsh.index import flat_scan

    assert not flat_scan.supports(256, 10) and not flat_scan.supports(64, flat_scan.MAX_LEVEL_SLOTS)
    database = clustered_codes(3000, 256, centres=4, flip=0.05, seed=4)
    queries = clustered_codes(5, 256, centres=4, flip=0.05, seed=4, draw=1)
    ids = np.arange(3000, dtype=np.int64)[::-1].copy()
    got = build("flat", database, ids, bits=256).search(queries, 50)
    want = brute_force_knn(queries, database, ids, 50)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    monkeypatch.setattr(flat_scan, "MAX_LEVEL_SLOTS", 64)  # k=100 at 64 bits no longer fits the scan
    small = clustered_codes(3000, 64, centres=4, flip=0.02, seed=4)
    got = build("flat", small, ids).search(small[:5], 100)
    want = brute_force_knn(small[:5], small, ids, 100)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_auto_answers_through_distinct_codes_only_when_they_repeat_enough():
    ids = np.arange(4000, dtype=np.int64)
    for flip, through_distinct in ((0.002, True), (0.1, False)):
        database = clustered_codes(4000, 64, centres=4, flip=flip, seed=8)
        index = build("auto", database, ids)
        got = index.search(database[:6], 50)
        assert index._backend.distinct_pays(index._codes) is through_distinct
        want = brute_force_knn(database[:6], database, ids, 50)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_distinct_wide_boundary_level_matches_flat():
    """Many codes tie at the k-th distance, past any small window: all must compete on insertion order."""
    bits = 12
    codes = pack_codes(np.unpackbits(np.arange(4096, dtype=">u2").view(np.uint8).reshape(-1, 2), axis=1)[:, 4:])
    database = np.concatenate([codes, codes[::-1], codes])  # every code three times, in two orders
    ids = np.arange(len(database), dtype=np.int64)
    queries = database[[0, 100, 4095]]
    for k in (1, 5, 13, 40, 200):
        want = brute_force_knn(queries, database, ids, k)
        got = build("distinct", database, ids, bits=bits).search(queries, k)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_codes_whose_length_is_not_a_multiple_of_8():
    rng = np.random.default_rng(5)
    unpacked = rng.integers(0, 2, (500, 20))
    database = pack_codes(unpacked)
    assert database.shape == (500, 3)
    queries = pack_codes(rng.integers(0, 2, (10, 20)))
    ids = np.arange(500, dtype=np.int64)
    for kind in ("flat", "distinct", "auto"):
        got = build(kind, database, ids, bits=20).search(queries, 30)
        want = brute_force_knn(queries, database, ids, 30)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    with pytest.raises(ValueError, match="padding bits"):
        build("flat", database, ids, bits=20).search(np.full((1, 3), 255, np.uint8), 1)


@pytest.mark.parametrize("kind", EXACT_KINDS)
@pytest.mark.parametrize("bits", [64, 20])
def test_adds_between_searches_extend_the_caches_and_answer_like_a_fresh_index(kind, bits):
    """Small adds after searches: the id look-up, distinct grouping and scan words grow in place, and
    every answer equals that of an index built in one go."""
    database = clustered_codes(3000, bits, centres=4, flip=0.01, seed=6)  # repeats old codes and brings new ones
    queries = clustered_codes(8, bits, centres=4, flip=0.03, seed=6, draw=1)
    ids = np.random.default_rng(6).permutation(100_000)[:3000].astype(np.int64)
    index = build(kind, database[:2000], ids[:2000], bits=bits)
    index.search(queries, 5)
    index.range_search(queries, 3)
    index.rows_of(ids[:3])
    grouping = getattr(index._backend, "distinct", None)
    for start in range(2000, 3000, 250):
        index.add(database[start : start + 250], ids[start : start + 250])
        if grouping is not None:
            assert index._backend.distinct is grouping  # extended, not rebuilt
        fresh = build(kind, database[: start + 250], ids[: start + 250], bits=bits)
        for got, want in zip(index.search(queries, 40), fresh.search(queries, 40)):
            np.testing.assert_array_equal(got, want)
        for (gi, gd), (wi, wd) in zip(index.range_search(queries, 3), fresh.range_search(queries, 3)):
            np.testing.assert_array_equal(gi, wi)
            np.testing.assert_array_equal(gd, wd)
        np.testing.assert_array_equal(index.rows_of(ids[: start + 250]), np.arange(start + 250))
    want = brute_force_knn(queries, database, ids, 40)
    np.testing.assert_array_equal(index.search(queries, 40)[0], want[0])
    assert not index.contains(int(ids.max()) + 1)


@pytest.mark.parametrize("kind", KINDS)
def test_remove_keeps_insertion_order_of_the_rest(tied_codes, kind):
    database, queries, ids = tied_codes
    params = EXHAUSTIVE.get(kind, {})
    index = build(kind, database, ids, **params)
    gone = ids[::3]
    assert index.remove(gone) == len(gone)
    keep = np.ones(len(ids), dtype=bool)
    keep[::3] = False
    assert len(index) == keep.sum()
    assert not index.contains(int(gone[0])) and index.contains(int(ids[1]))
    want = brute_force_knn(queries, database[keep], ids[keep], 40)
    got = index.search(queries, 40)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    # re-added items rank after every older item at the same distance
    index.add(database[::3][:10], gone[:10])
    all_codes = np.concatenate([database[keep], database[::3][:10]])
    all_ids = np.concatenate([ids[keep], gone[:10]])
    got = index.search(queries, 40)
    want = brute_force_knn(queries, all_codes, all_ids, 40)
    np.testing.assert_array_equal(got[0], want[0])


def test_contents_and_codes_round_trip(tied_codes):
    database, _, ids = tied_codes
    index = build("flat", database, ids)
    assert len(index) == len(ids)
    np.testing.assert_array_equal(index.get_codes(ids[[5, 0, 9]]), database[[5, 0, 9]])
    np.testing.assert_array_equal(index.ids, ids)
    assert index.contains(int(ids[7])) and not index.contains(int(ids.max()) + 1)


def test_clear_errors_for_bad_input(tied_codes):
    database, queries, ids = tied_codes
    index = build("flat", database[:10], ids[:10])
    with pytest.raises(ValueError, match=r"shape \(n, 8\)"):
        index.add(database[:2, :4], np.array([1, 2]))
    with pytest.raises(ValueError, match="packed uint8"):
        index.search(np.unpackbits(queries, axis=1).astype(np.int8), 3)
    with pytest.raises(ValueError, match="already in the index"):
        index.add(database[:1], ids[:1])
    with pytest.raises(ValueError, match="duplicate ids in this batch: 77"):
        index.add(database[:2], np.array([77, 77]))
    with pytest.raises(ValueError, match="2 codes but 3 ids"):
        index.add(database[:2], np.array([1, 2, 3]))
    with pytest.raises(ValueError, match=">= 0"):
        index.add(database[:1], np.array([-5]))
    with pytest.raises(KeyError, match="unknown ids: 123456789"):
        index.remove([ids[0], 123456789])
    assert len(index) == 10  # a failed remove changes nothing
    for bad_k in (0, -1, 2.5):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            index.search(queries, bad_k)
    with pytest.raises(ValueError, match="radius"):
        index.range_search(queries, 65)
    with pytest.raises(ValueError, match="unknown index kind"):
        HammingIndex(64, "lsh")
    with pytest.raises(ValueError, match="takes no parameter"):
        HammingIndex(64, "flat", nprobe=3)


def test_empty_index_pads_everything():
    index = HammingIndex(16, "distinct")
    ids, dists = index.search(np.zeros((2, 2), np.uint8), 4)
    assert (ids == -1).all() and (dists == -1).all() and ids.shape == (2, 4)
    assert [len(r[0]) for r in index.range_search(np.zeros((2, 2), np.uint8), 16)] == [0, 0]


@pytest.mark.parametrize("kind", KINDS)
def test_faiss_copy_is_searchable_by_plain_faiss_and_reloads(tied_codes, kind):
    database, queries, ids = tied_codes
    index = build(kind, database, ids, **EXHAUSTIVE.get(kind, {}))
    wrapped = index.to_faiss()
    assert wrapped.ntotal == len(ids)
    plain_dists, plain_ids = wrapped.search(queries, 5)
    assert np.isin(plain_ids[plain_ids >= 0], ids).all()  # real ids, not rows
    reloaded = HammingIndex.from_faiss(wrapped, 64, kind, database)
    assert reloaded.params == index.params
    for a, b in zip(reloaded.search(queries, 25), index.search(queries, 25)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="differ"):
        if kind in EXACT_KINDS:
            HammingIndex.from_faiss(wrapped, 64, kind, database[::-1].copy())
        else:
            raise ValueError("codes differ: not checked for hashed kinds")


def test_torch_batched_search_matches_faiss_on_cpu(tied_codes):
    """The GPU algorithm (matmul of +-1 codes, unique (distance, row) keys), run on the CPU."""
    database, queries, ids = tied_codes
    rows, dists = TorchHammingSearcher(database, 64, device="cpu").knn(queries, 100)
    want_ids, want_d = brute_force_knn(queries, database, ids, 100)
    np.testing.assert_array_equal(dists, want_d)
    np.testing.assert_array_equal(ids[rows], want_ids)


@pytest.mark.skipif(gpu_backend() is None, reason="no GPU: neither faiss-gpu nor CUDA torch sees one")
@pytest.mark.parametrize("kind", EXACT_KINDS)
def test_gpu_search_matches_cpu(tied_codes, kind):
    database, queries, ids = tied_codes
    index = build(kind, database, ids)
    batch = np.concatenate([queries] * 4)
    for k in (1, 100, 2500):
        cpu = index.search(batch, k, device="cpu")
        gpu = index.search(batch, k, device="gpu")
        np.testing.assert_array_equal(gpu[0], cpu[0])
        np.testing.assert_array_equal(gpu[1], cpu[1])


@pytest.mark.skipif(gpu_backend() is not None, reason="a GPU is present")
def test_gpu_requested_without_gpu_is_a_clear_error_and_auto_falls_back(tied_codes):
    database, queries, ids = tied_codes
    index = build("flat", database, ids)
    with pytest.raises(RuntimeError, match="no.*CUDA|neither"):
        index.search(np.concatenate([queries] * 4), 3, device="gpu")
    auto = index.search(np.concatenate([queries] * 4), 3, device="auto")
    np.testing.assert_array_equal(auto[0], brute_force_knn(np.concatenate([queries] * 4), database, ids, 3)[0])


def test_clustered_codes_are_deterministic_and_flip_at_the_asked_rate():
    a = clustered_codes(20_000, 64, centres=1, flip=0.1, seed=7)
    np.testing.assert_array_equal(a, clustered_codes(20_000, 64, centres=1, flip=0.1, seed=7))
    assert not np.array_equal(a[:100], clustered_codes(100, 64, centres=1, flip=0.1, seed=7, draw=1))
    centre = np.unpackbits(a, axis=1).mean(axis=0) > 0.5  # majority bit = the single centre
    flipped = (np.unpackbits(a, axis=1) != centre).mean()
    assert abs(flipped - 0.1) < 0.005


def test_search_latency_reports_percentiles_per_batch_size(tied_codes):
    database, queries, ids = tied_codes
    index = build("flat", database, ids)
    report = search_latency(index, queries, 10, batch_sizes=(1, 8), repeats=30, max_seconds=0.5)
    assert set(report) == {1, 8}
    for row in report.values():
        assert 0 < row["p50_ms"] <= row["p99_ms"] and row["calls"] >= 20 and row["qps"] > 0
    with pytest.raises(ValueError, match="batch size"):
        search_latency(index, queries, 10, batch_sizes=(1000,))
    raw = faiss.IndexBinaryFlat(64)
    raw.add(database[:100])
    assert search_latency(raw, queries, 10, batch_sizes=(1,), repeats=20)[1]["calls"] == 20


@pytest.mark.parametrize("kind", KINDS)
def test_batches_split_across_threads_answer_like_one_call(tied_codes, kind, monkeypatch):
    database, queries, ids = tied_codes
    index = build(kind, database, ids, **EXHAUSTIVE.get(kind, {}))
    whole_knn, whole_range = index.search(queries, 30), index.range_search(queries, 4)
    monkeypatch.setattr(backends_base, "PARALLEL_MIN_WORK", 0)  # every batch of 2+ queries is split
    split_knn, split_range = index.search(queries, 30), index.range_search(queries, 4)
    for a, b in zip(whole_knn, split_knn):
        np.testing.assert_array_equal(a, b)
    for (ai, ad), (bi, bd) in zip(whole_range, split_range):
        np.testing.assert_array_equal(ai, bi)
        np.testing.assert_array_equal(ad, bd)
