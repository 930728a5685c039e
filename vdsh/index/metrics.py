"""Retrieval metrics over Hamming rankings, exactly as PROTOCOL.md defines them.

The database is ranked by Hamming distance with ties broken by database position (a stable sort),
never at random. A database item is relevant to a query when they share at least one label.
All metrics of a chunk of queries come from one sort, vectorised in torch (GPU when the codes are there).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


# Elements of a (queries x database) chunk: bounds memory to a few hundred MB whatever the sizes.
CHUNK_ELEMENTS = 16_000_000


@dataclass
class RetrievalReport:
    """Mean metrics over queries, plus the PR curve over Hamming radius 0..bits."""

    bits: int
    n_query: int
    n_database: int
    map_all: float
    map_at: dict[int, float] = field(default_factory=dict)
    precision_at: dict[int, float] = field(default_factory=dict)
    precision_within: dict[int, float] = field(default_factory=dict)  # radius -> P@H<=radius
    pr_precision: list[float] = field(default_factory=list)  # index = Hamming radius
    pr_recall: list[float] = field(default_factory=list)

    def rows(self) -> list[tuple[str, float]]:
        """(metric name, value) rows in the order a table prints them."""
        rows = [("mAP@all", self.map_all)]
        rows += [(f"mAP@{k}", v) for k, v in self.map_at.items()]
        rows += [(f"P@{k}", v) for k, v in self.precision_at.items()]
        rows += [(f"P@H<={r}", v) for r, v in self.precision_within.items()]
        return rows

    def to_dict(self) -> dict:
        return {
            "bits": self.bits, "n_query": self.n_query, "n_database": self.n_database,
            "metrics": dict(self.rows()),
            "pr_curve": {"radius": list(range(self.bits + 1)), "precision": self.pr_precision, "recall": self.pr_recall},
        }


def relevance(query_labels: torch.Tensor, db_labels: torch.Tensor) -> torch.Tensor:
    """(q, n) bool: query and item share at least one label (multi-hot inputs)."""
    return (query_labels.float() @ db_labels.float().T) > 0


def _class_ids(labels: torch.Tensor) -> torch.Tensor | None:
    """Class index per row when every row has exactly one label, else None (multi-label)."""
    return labels.argmax(1) if bool((labels.sum(1) == 1).all()) else None


def _as_tensor(array: torch.Tensor | np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(array) if not isinstance(array, torch.Tensor) else array).to(device)


def stable_ranking(dist: torch.Tensor) -> torch.Tensor:
    """(q, n) Hamming distances -> database order per query, ties by database position.

    On the CPU numpy's stable sort of uint8 keys is a radix sort, several times faster than torch.sort.
    """
    if dist.device.type != "cpu" or dist.dtype != torch.uint8:
        return torch.sort(dist, dim=1, stable=True).indices
    return torch.from_numpy(np.argsort(dist.numpy(), axis=1, kind="stable"))


def ranked_hits(order: torch.Tensor, query_labels: torch.Tensor, db_labels: torch.Tensor) -> torch.Tensor:
    """(q, n) float: 1 where the item at each rank is relevant to the query."""
    db_class, query_class = _class_ids(db_labels), _class_ids(query_labels)
    if db_class is None or query_class is None or order.device.type != "cpu" or db_labels.shape[1] > 255:
        return relevance(query_labels, db_labels).gather(1, order).float()
    # Single-label on the CPU: gathering one byte per item is the cheapest pass.
    ranked_class = np.take(db_class.to(torch.uint8).numpy(), order.numpy())
    return torch.from_numpy(ranked_class == query_class.to(torch.uint8).numpy()[:, None]).float()


def retrieval_metrics(
    query_codes: torch.Tensor,
    query_labels: torch.Tensor | np.ndarray,
    db_codes: torch.Tensor,
    db_labels: torch.Tensor | np.ndarray,
    map_at: tuple[int, ...] = (),
    precision_at: tuple[int, ...] = (100, 500, 1000),
    radii: tuple[int, ...] = (2,),
    device: str | torch.device | None = None,
) -> RetrievalReport:
    """mAP@all, mAP@k, P@k, P@H<=r and the PR curve of ±1 codes (q, bits) against (n, bits).

    mAP@all: AP = (1/R) sum_j P(j) rel(j) over the whole ranking, R = relevant items in the database.
    mAP@k: AP over the top k normalised by the relevant items found there (0 when none).
    P@H<=r and the PR curve: precision over the items within radius r (0 when none), recall = found / R.
    """
    device = torch.device(device) if device is not None else query_codes.device
    qc, dc = _as_tensor(query_codes, device), _as_tensor(db_codes, device)
    ql, dl = _as_tensor(query_labels, device), _as_tensor(db_labels, device)
    n_query, bits = qc.shape
    n_db = dc.shape[0]
    if dc.shape[1] != bits:
        raise ValueError(f"query codes have {bits} bits, database codes {dc.shape[1]}")
    if len(ql) != n_query or len(dl) != n_db:
        raise ValueError(f"labels ({len(ql)}, {len(dl)}) do not match codes ({n_query}, {n_db})")
    for k in (*map_at, *precision_at):
        if not 0 < k <= n_db:
            raise ValueError(f"cut-off k={k} must be in 1..{n_db} (database size)")

    sums = {"ap_all": 0.0, "map_at": np.zeros(len(map_at)), "p_at": np.zeros(len(precision_at)),
            "precision": torch.zeros(bits + 1, dtype=torch.float64), "recall": torch.zeros(bits + 1, dtype=torch.float64)}
    chunk = max(1, CHUNK_ELEMENTS // max(n_db, 1))
    positions = torch.arange(1, n_db + 1, device=device, dtype=torch.float32)
    radius_values = torch.arange(bits + 1, device=device, dtype=torch.int32)
    db_float = dc.float()
    for start in range(0, n_query, chunk):
        stop = min(start + chunk, n_query)
        # d = (bits - <q, b>) / 2, exact: <q, b> has the parity of bits.
        dist = (qc[start:stop].float() @ db_float.T).neg_().add_(bits).mul_(0.5)
        dist = dist.to(torch.uint8 if bits <= 255 else torch.int32)
        order = stable_ranking(dist)
        hits = ranked_hits(order, ql[start:stop], dl)
        found = hits.cumsum(1)
        n_rel = found[:, -1]
        precision_at_hits = (found / positions).mul_(hits)
        sums["ap_all"] += float((precision_at_hits.sum(1) / n_rel.clamp(min=1)).sum())
        for i, k in enumerate(map_at):
            sums["map_at"][i] += float((precision_at_hits[:, :k].sum(1) / found[:, k - 1].clamp(min=1)).sum())
        for i, k in enumerate(precision_at):
            sums["p_at"][i] += float((found[:, k - 1] / k).sum())
        # Items within radius r form a prefix of the ranking: its length comes from the sorted distances.
        sorted_dist = dist.gather(1, order).to(torch.int32)
        within = torch.searchsorted(sorted_dist, radius_values.expand(stop - start, -1).contiguous(), right=True)
        rel_within = found.gather(1, (within - 1).clamp(min=0)) * (within > 0)
        precision = torch.where(within > 0, rel_within / within.clamp(min=1), torch.zeros_like(rel_within))
        sums["precision"] += precision.double().sum(0).cpu()
        sums["recall"] += (rel_within / n_rel.clamp(min=1)[:, None]).double().sum(0).cpu()

    pr_precision = (sums["precision"] / n_query).tolist()
    return RetrievalReport(
        bits=bits, n_query=n_query, n_database=n_db,
        map_all=sums["ap_all"] / n_query,
        map_at={k: float(v / n_query) for k, v in zip(map_at, sums["map_at"])},
        precision_at={k: float(v / n_query) for k, v in zip(precision_at, sums["p_at"])},
        precision_within={r: pr_precision[min(r, bits)] for r in radii},
        pr_precision=pr_precision,
        pr_recall=(sums["recall"] / n_query).tolist(),
    )


def mean_average_precision(
    query_codes: torch.Tensor,
    query_labels: torch.Tensor | np.ndarray,
    db_codes: torch.Tensor,
    db_labels: torch.Tensor | np.ndarray,
    k: int | None = None,
) -> float:
    """mAP@all (k=None) or mAP@k of ±1 codes; the one number trainers track."""
    report = retrieval_metrics(query_codes, query_labels, db_codes, db_labels,
                               map_at=(k,) if k else (), precision_at=(), radii=())
    return report.map_at[k] if k else report.map_all
