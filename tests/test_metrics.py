"""Metrics against a plain, obviously-correct reference and hand-worked cases."""

import numpy as np
import pytest
import torch

from vdsh.index.codes import as_multi_hot
from vdsh.index.metrics import mean_average_precision, retrieval_metrics


def reference_metrics(qc, ql, dc, dl, k_map, k_p, radius):
    """One query at a time, straight from the definitions in PROTOCOL.md."""
    bits = qc.shape[1]
    aps, aps_k, ps_k, ps_r = [], [], [], []
    pr_p, pr_r = np.zeros(bits + 1), np.zeros(bits + 1)
    for q in range(len(qc)):
        dist = (qc[q][None] != dc).sum(1)
        rel = (ql[q][None] & dl).any(1)
        order = np.argsort(dist, kind="stable")
        hits = rel[order]
        R = hits.sum()
        precisions = [hits[: j + 1].sum() / (j + 1) for j in range(len(hits))]
        aps.append(sum(p for p, h in zip(precisions, hits) if h) / R if R else 0.0)
        top = hits[:k_map]
        aps_k.append(sum(p for p, h in zip(precisions[:k_map], top) if h) / top.sum() if top.sum() else 0.0)
        ps_k.append(hits[:k_p].sum() / k_p)
        for r in range(bits + 1):
            inside = dist <= r
            p = rel[inside].sum() / inside.sum() if inside.sum() else 0.0
            pr_p[r] += p
            pr_r[r] += rel[inside].sum() / R if R else 0.0
            if r == radius:
                ps_r.append(p)
    n = len(qc)
    return np.mean(aps), np.mean(aps_k), np.mean(ps_k), np.mean(ps_r), pr_p / n, pr_r / n


@pytest.mark.parametrize("multi_label", [False, True])
def test_metrics_match_reference_on_codes_with_many_ties(multi_label):
    rng = np.random.default_rng(1)
    bits, n_db, n_q = 6, 300, 25  # 6 bits: heavy ties, so tie order matters
    dc = rng.integers(0, 2, (n_db, bits)).astype(bool)
    qc = rng.integers(0, 2, (n_q, bits)).astype(bool)
    if multi_label:
        dl = rng.random((n_db, 5)) < 0.3
        ql = rng.random((n_q, 5)) < 0.3
    else:
        dl = as_multi_hot(rng.integers(0, 4, n_db), 4).astype(bool)
        ql = as_multi_hot(rng.integers(0, 4, n_q), 4).astype(bool)
    expected = reference_metrics(qc, ql, dc, dl, k_map=50, k_p=20, radius=2)

    to_pm1 = lambda b: torch.from_numpy(np.where(b, 1, -1).astype(np.int8))
    report = retrieval_metrics(to_pm1(qc), ql.astype(np.uint8), to_pm1(dc), dl.astype(np.uint8),
                               map_at=(50,), precision_at=(20,), radii=(2,))
    assert report.map_all == pytest.approx(expected[0], abs=1e-6)
    assert report.map_at[50] == pytest.approx(expected[1], abs=1e-6)
    assert report.precision_at[20] == pytest.approx(expected[2], abs=1e-6)
    assert report.precision_within[2] == pytest.approx(expected[3], abs=1e-6)
    np.testing.assert_allclose(report.pr_precision, expected[4], atol=1e-6)
    np.testing.assert_allclose(report.pr_recall, expected[5], atol=1e-6)


def test_chunking_does_not_change_results(monkeypatch):
    rng = np.random.default_rng(2)
    qc = torch.from_numpy(rng.choice([-1, 1], (40, 8)).astype(np.int8))
    dc = torch.from_numpy(rng.choice([-1, 1], (200, 8)).astype(np.int8))
    ql, dl = as_multi_hot(rng.integers(0, 3, 40), 3), as_multi_hot(rng.integers(0, 3, 200), 3)
    whole = retrieval_metrics(qc, ql, dc, dl, map_at=(10,), precision_at=(10,))
    monkeypatch.setattr("vdsh.index.metrics.CHUNK_ELEMENTS", 200 * 3)  # 3 queries per chunk
    chunked = retrieval_metrics(qc, ql, dc, dl, map_at=(10,), precision_at=(10,))
    assert chunked.map_all == pytest.approx(whole.map_all)
    assert chunked.map_at == pytest.approx(whole.map_at)
    assert chunked.precision_at == pytest.approx(whole.precision_at)
    assert chunked.pr_precision == pytest.approx(whole.pr_precision)
    assert chunked.pr_recall == pytest.approx(whole.pr_recall)


def test_hand_worked_ranking_with_a_tie():
    # Query 0000. Database distances: [1, 0, 1, 2]; relevance: [yes, no, yes, no].
    # Stable ranking by distance: item1 (d0, no), item0 (d1, yes), item2 (d1, yes), item3 (d2, no).
    # AP = (1/2)(1/2 + 2/3) = 7/12. P@2 = 1/2. Within radius 1: 3 items, 2 relevant -> 2/3.
    q = torch.tensor([[-1, -1, -1, -1]], dtype=torch.int8)
    db = torch.tensor([[1, -1, -1, -1], [-1, -1, -1, -1], [-1, 1, -1, -1], [1, 1, -1, -1]], dtype=torch.int8)
    ql = np.array([[1, 0]])
    dl = np.array([[1, 0], [0, 1], [1, 0], [0, 1]])
    report = retrieval_metrics(q, ql, db, dl, map_at=(2,), precision_at=(2,), radii=(0, 1))
    assert report.map_all == pytest.approx(7 / 12)
    assert report.map_at[2] == pytest.approx(1 / 2)  # top 2 holds one relevant item, found at rank 2
    assert report.precision_at[2] == pytest.approx(1 / 2)
    assert report.precision_within == pytest.approx({0: 0.0, 1: 2 / 3})
    assert report.pr_recall[:3] == pytest.approx([0.0, 1.0, 1.0])


def test_tie_order_is_database_position_not_random():
    # All codes equal: the ranking is database order, so moving the relevant item changes AP.
    q = torch.ones(1, 8, dtype=torch.int8)
    db = torch.ones(4, 8, dtype=torch.int8)
    first = mean_average_precision(q, [[1, 0]], db, [[1, 0], [0, 1], [0, 1], [0, 1]])
    last = mean_average_precision(q, [[1, 0]], db, [[0, 1], [0, 1], [0, 1], [1, 0]])
    assert first == 1.0 and last == pytest.approx(1 / 4)


def test_query_without_relevant_items_scores_zero():
    q = torch.ones(1, 4, dtype=torch.int8)
    db = torch.ones(3, 4, dtype=torch.int8)
    report = retrieval_metrics(q, [[1, 0]], db, [[0, 1]] * 3, map_at=(2,), precision_at=(2,))
    assert report.map_all == 0.0 and report.map_at[2] == 0.0 and report.precision_within[2] == 0.0


def test_bad_inputs_are_refused():
    q = torch.ones(1, 4, dtype=torch.int8)
    with pytest.raises(ValueError, match="bits"):
        retrieval_metrics(q, [[1]], torch.ones(3, 8, dtype=torch.int8), [[1]] * 3)
    with pytest.raises(ValueError, match="cut-off"):
        retrieval_metrics(q, [[1]], torch.ones(3, 4, dtype=torch.int8), [[1]] * 3, precision_at=(10,))
