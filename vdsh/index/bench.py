"""Index benchmarks: synthetic clustered codes, per-query latency of any index's `search`, and the
latency of adding one item to a saved index directory.

Learned supervised codes are clustered by class, so benchmarks draw codes around a few random centres
with each bit flipped with probability `flip`: flip=0.15 at 64 bits makes nearly every code distinct;
flip=0.02 gives the few distinct codes real learned codes have (a third of the items on their centre).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from vdsh.index.codes import code_bytes
from vdsh.index.distinct_codes import code_keys
from vdsh.index.hamming_index import HammingIndex
from vdsh.index.items import ItemIndex
from vdsh.index.store import load_index, save_changes, save_index

_CHUNK_ROWS = 1 << 18  # draw this many codes at a time: 10M codes never hold 10M x bits bytes at once


def clustered_codes(n: int, bits: int, centres: int = 10, flip: float = 0.15, seed: int = 0, draw: int = 0) -> np.ndarray:
    """(n, ceil(bits/8)) packed codes, each a random centre with every bit flipped with probability `flip`.

    The centres depend on `seed` only, so database (draw=0) and queries (draw=1) share them.
    """
    if n < 0 or centres < 1 or not 0.0 <= flip <= 1.0:
        raise ValueError(f"need n >= 0, centres >= 1, 0 <= flip <= 1; got n={n}, centres={centres}, flip={flip}")
    centre_bits = np.random.default_rng(seed).integers(0, 2, (centres, bits), dtype=np.uint8)
    rng = np.random.default_rng([seed, draw + 1])
    threshold = round(flip * 65536)  # flip a bit when a uniform 16-bit draw falls below it
    out = np.empty((n, code_bytes(bits)), dtype=np.uint8)
    for start in range(0, n, _CHUNK_ROWS):
        rows = min(_CHUNK_ROWS, n - start)
        which = rng.integers(0, centres, rows)
        flips = rng.integers(0, 65536, (rows, bits), dtype=np.uint32) < threshold
        out[start : start + rows] = np.packbits(centre_bits[which] ^ flips, axis=1)
    return out


def search_latency(
    index,
    queries: np.ndarray,
    k: int,
    batch_sizes: Iterable[int] = (1, 64, 1024),
    *,
    warmup: int = 5,
    repeats: int = 1000,
    max_seconds: float = 5.0,
    min_calls: int = 20,
) -> dict[int, dict[str, float]]:
    """Per batch size: p50/p99/mean milliseconds per query (call time / batch) and per call, and QPS.

    Calls `index.search(batch, k)` (a HammingIndex or a raw FAISS index) on consecutive slices of
    `queries`, after `warmup` untimed calls, `repeats` timed calls or `max_seconds` (but >= `min_calls`).
    """
    results: dict[int, dict[str, float]] = {}
    for batch_size in batch_sizes:
        if not 1 <= batch_size <= len(queries):
            raise ValueError(f"batch size {batch_size} needs 1 to {len(queries)} queries")
        batches = [queries[i : i + batch_size] for i in range(0, len(queries) - batch_size + 1, batch_size)]
        for i in range(warmup):
            index.search(batches[i % len(batches)], k)
        seconds = _time_calls(index, batches, k, repeats, max_seconds, min_calls)
        per_query_ms = seconds * 1e3 / batch_size
        results[batch_size] = {
            "calls": len(seconds),
            "p50_ms": float(np.percentile(per_query_ms, 50)),
            "p99_ms": float(np.percentile(per_query_ms, 99)),
            "mean_ms": float(per_query_ms.mean()),
            "p50_call_ms": float(np.percentile(seconds * 1e3, 50)),
            "qps": float(batch_size * len(seconds) / seconds.sum()),
        }
    return results


def _time_calls(index, batches: Sequence[np.ndarray], k: int, repeats: int, max_seconds: float, min_calls: int) -> np.ndarray:
    seconds: list[float] = []
    deadline = time.perf_counter() + max_seconds
    while len(seconds) < repeats and (len(seconds) < min_calls or time.perf_counter() < deadline):
        batch = batches[len(seconds) % len(batches)]
        start = time.perf_counter()
        index.search(batch, k)
        seconds.append(time.perf_counter() - start)
    return np.array(seconds)


def compare_kinds(
    database: np.ndarray,
    queries: np.ndarray,
    bits: int,
    kinds: Iterable[str] = ("flat", "distinct", "auto", "hash", "multihash", "ivf"),
    k: int = 100,
    batch_sizes: Iterable[int] = (1, 64),
    params: dict[str, dict] | None = None,
    recall_queries: int | None = None,
    **latency_options,
) -> list[dict]:
    """Build each kind over `database`, time its search and score it against flat (exact) answers.

    Each row: kind, items, distinct codes, build seconds, latency per batch size, `recall` (share of
    flat's ids found), `identical` (same ids, distances and order as flat for every scored query);
    answers are scored on the first `recall_queries` queries (all by default).
    """
    ids = np.arange(len(database), dtype=np.int64)
    scored = queries[:recall_queries]
    reference = _build("flat", database, ids, bits, {})[0].search(scored, k, device="cpu")
    distinct = len(np.unique(code_keys(database)))
    rows = []
    for kind in kinds:
        index, build_seconds = _build(kind, database, ids, bits, (params or {}).get(kind, {}))
        found_ids, found_dists = index.search(scored, k, device="cpu")
        rows.append(
            {
                "kind": kind,
                "items": len(database),
                "scored_queries": len(scored),
                "bits": bits,
                "distinct_codes": distinct,
                "params": index.params,
                "build_s": build_seconds,
                "latency": search_latency(index, queries, k, batch_sizes, **latency_options),
                "recall": _recall(found_ids, reference[0]),
                "identical": bool(np.array_equal(found_ids, reference[0]) and np.array_equal(found_dists, reference[1])),
            }
        )
        del index
    return rows


def _build(kind: str, database: np.ndarray, ids: np.ndarray, bits: int, params: dict) -> tuple[HammingIndex, float]:
    start = time.perf_counter()
    index = HammingIndex(bits, kind, **params)
    index.add(database, ids)
    if kind in ("distinct", "auto"):
        index.search(database[:1], 1, device="cpu")  # the grouping is built at the first search
    return index, time.perf_counter() - start


def _recall(found: np.ndarray, reference: np.ndarray) -> float:
    hits = sum(len(np.intersect1d(f[f >= 0], r[r >= 0])) for f, r in zip(found, reference))
    return hits / max(int((reference >= 0).sum()), 1)


def add_latency(items: int, bits: int = 64, kind: str = "flat", adds: int = 50, full_saves: int = 3,
                thumbnail_side: int = 64, directory: str | Path | None = None) -> dict[str, dict[str, float]]:
    """Milliseconds to change a saved index of `items` items by one item and commit it to disk.

    Rows: `add, full save` (a new version per add: what the server did before, and what a compaction
    costs), `add, delta` and `delete, delta` (`vdsh.index.store.save_changes`, one delta file each: what the
    server does now), and `load` of the directory with those deltas to replay. Items carry a grey
    `thumbnail_side`-pixel square thumbnail, as the server stores for MNIST. Each row: median, p99,
    max, mean, count.
    """
    deletes = max(1, adds // 5)
    with tempfile.TemporaryDirectory(prefix="vdsh-add-bench-", dir=directory) as tmp:
        path = Path(tmp) / "index"
        item_index = _item_index(items, bits, kind, thumbnail_side)
        save_index(path, item_index)
        codes = clustered_codes(full_saves + adds, bits, seed=1, draw=2)
        thumbnail = np.full((thumbnail_side, thumbnail_side, 1), 128, np.uint8)
        timings: dict[str, list[float]] = {"add, full save": [], "add, delta": [], "delete, delta": [], "load": []}
        for i in range(full_saves + adds):
            item_id, start = items + i, time.perf_counter()
            item_index.add(codes[i : i + 1], [item_id], sources=[f"bench:{item_id}"], thumbnails=[thumbnail])
            if i < full_saves:
                save_index(path, item_index)
            else:
                save_changes(path, item_index, added=[item_id])
            timings["add, full save" if i < full_saves else "add, delta"].append(time.perf_counter() - start)
        for item_id in range(deletes):
            start = time.perf_counter()
            item_index.remove([item_id])
            save_changes(path, item_index, removed=[item_id])
            timings["delete, delta"].append(time.perf_counter() - start)
        start = time.perf_counter()
        loaded = load_index(path)
        timings["load"].append(time.perf_counter() - start)
        if len(loaded) != len(item_index):
            raise AssertionError(f"the directory reloads {len(loaded)} items, {len(item_index)} were committed")
        return {name: _summary(seconds) for name, seconds in timings.items()}


def _item_index(items: int, bits: int, kind: str, thumbnail_side: int) -> ItemIndex:
    item_index = ItemIndex(HammingIndex(bits, kind), model_id="bench", class_names=[str(c) for c in range(10)])
    thumbnails = np.random.default_rng(0).integers(0, 256, (items, thumbnail_side, thumbnail_side, 1), dtype=np.uint8)
    item_index.add(clustered_codes(items, bits, seed=0), np.arange(items), labels=np.arange(items) % 10,
                   sources=[f"bench:{i}" for i in range(items)], thumbnails=list(thumbnails))
    return item_index


def _summary(seconds: list[float]) -> dict[str, float]:
    ms = np.array(seconds) * 1e3
    return {"p50_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max()),
            "mean_ms": float(ms.mean()), "count": len(ms)}
