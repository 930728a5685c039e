"""`vdsh bench milvus`: Milvus (BIN_FLAT, BIN_IVF_FLAT) beside vdsh's own flat index on the same codes.

One run: synthetic clustered codes (`vdsh.index.bench.clustered_codes`) go into vdsh's flat index and into
a Milvus collection (the embedded server, started here in a temporary directory, or `--uri` to a running
one); insert rate, then single-query latency (p50/p99) and answers of each, the Milvus server's memory.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time

import numpy as np
import typer

from vdsh.app.bench.report import markdown_table, write_section

INDEX_WAIT_S = 1200  # the longest wait for Milvus to finish building an index


def bench_milvus(
    items: int = typer.Option(1_000_000, help="Synthetic codes in the collection."),
    bits: int = typer.Option(64),
    k: int = typer.Option(10),
    queries: int = typer.Option(200, help="Distinct queries (each timed one at a time, and scored)."),
    nprobes: str = typer.Option("16,64", help="BIN_IVF_FLAT nprobe values to time."),
    max_seconds: float = typer.Option(20.0, help="Time limit per index and setting."),
    uri: str = typer.Option(None, help="milvus://HOST:PORT/COLLECTION on a running server, replaced if it "
                                                "exists (default: an embedded server)"),
) -> None:
    """Insert rate, query p50/p99 and recall of Milvus BIN_FLAT / BIN_IVF_FLAT beside vdsh's flat index."""
    from vdsh.index.bench import clustered_codes, search_latency
    from vdsh.index.hamming_index import HammingIndex

    load_before = os.getloadavg()[0]
    database = clustered_codes(items, bits, flip=0.15, seed=0)
    probe = clustered_codes(queries, bits, flip=0.15, seed=0, draw=1)
    ids = np.arange(items, dtype=np.int64)
    rows: list[list[object]] = []

    flat = HammingIndex(bits, "flat")
    started = time.perf_counter()
    flat.add(database, ids)
    add_s = time.perf_counter() - started
    exact = flat.search(probe, k, device="cpu")
    latency = search_latency(flat, probe, k, batch_sizes=(1,), max_seconds=max_seconds)[1]
    rows.append(["vdsh flat (in process)", "", f"{items / add_s:,.0f}", f"{latency['p50_ms']:.3f}",
                 f"{latency['p99_ms']:.3f}", "1.000", "yes", ""])
    typer.echo(markdown_table(HEADER, rows))

    server, directory = None, None
    if uri is None:
        from vdsh.index.milvus_embedded import EmbeddedMilvus

        directory = tempfile.TemporaryDirectory(prefix="vdsh-milvus-bench-")
        server = EmbeddedMilvus(directory.name).start()
        uri = server.uri("bench")
    try:
        rows += _bench_collection(uri, database, ids, probe, exact, bits, k, nprobes, max_seconds, server)
    finally:
        if server is not None:
            server.stop(wait_s=0)  # its data is thrown away
            directory.cleanup()
    table = markdown_table(HEADER, rows)
    typer.echo(table)
    where = "the embedded Milvus 2.3 standalone server (PyPI `milvus`) on the same machine" if server else uri
    write_section("Milvus beside vdsh's flat index", (
        f"{items:,} synthetic {bits}-bit codes (10 centres, 15 % of bits flipped; `vdsh.index.bench.clustered_codes`), "
        f"{queries} queries drawn the same way, k={k}, each query sent alone (batch 1). Milvus: {where}, over gRPC "
        "on 127.0.0.1 from pymilvus; its times include the client and the round trip, "
        "vdsh's flat index is searched in process. Insert: rows a second through `MilvusItems.add` (10,000 a "
        "request, each batch first checked for taken ids), flush included; for vdsh, `HammingIndex.add` in memory "
        "(saving a directory is `vdsh bench items`). `recall`: share of the k answers within "
        "the exact k-th distance (tie-aware); `same distances`: every query's k distances equal the flat index's. "
        "Strong consistency (vdsh's default: every finished write is seen) waits for Milvus's next time tick "
        "(200 ms apart); Bounded answers at once, possibly stale for other clients' writes. "
        f"The machine is shared with other jobs and was loaded: 1-min load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after.\n\n" + table))


HEADER = ["index", "params", "insert rows/s", "p50 ms/query", "p99 ms/query", "recall", "same distances",
          "Milvus RSS MiB"]


def _bench_collection(uri: str, database: np.ndarray, ids: np.ndarray, probe: np.ndarray, exact, bits: int, k: int,
                      nprobes: str, max_seconds: float, server) -> list[list[object]]:
    from vdsh.index.bench import search_latency
    from vdsh.index.milvus_items import MilvusItems, nlist_for

    items = MilvusItems.create(uri, bits, "", [], len(database), replace=True, index_type="BIN_FLAT")
    started = time.perf_counter()
    items.add(database, ids, progress=None)
    items.flush()
    insert_rate = len(database) / (time.perf_counter() - started)
    memory = (lambda: f"{server.memory_mib():,.0f}") if server is not None else (lambda: "")
    rows = []
    nlist = nlist_for(len(database))
    ivf = [(int(p), "Bounded") for p in nprobes.split(",")]
    for index_type, settings in (("BIN_FLAT", [(0, "Strong"), (0, "Bounded")]), ("BIN_IVF_FLAT", ivf)):
        if index_type == "BIN_IVF_FLAT":
            items.rebuild_index("BIN_IVF_FLAT", nlist)
        built = _wait_for_index(items, len(database))
        for nprobe, consistency in settings:
            items.nprobe, items.target = nprobe, dataclasses.replace(items.target, consistency=consistency)
            found_ids, found_d = items.search(probe, k)
            latency = search_latency(items, probe, k, batch_sizes=(1,), max_seconds=max_seconds, warmup=3)[1]
            params = ", ".join([consistency] + ([f"nlist {nlist}, nprobe {nprobe}"] if nprobe else []))
            params += "" if built else " (index not built in time: brute force)"
            rows.append([f"Milvus {index_type}", params, f"{insert_rate:,.0f}" if not rows else "",
                         f"{latency['p50_ms']:.3f}", f"{latency['p99_ms']:.3f}", f"{_recall(found_d, exact[1]):.3f}",
                         "yes" if np.array_equal(found_d, exact[1]) else "no", memory()])
            typer.echo(markdown_table(HEADER, rows))
    return rows


def _wait_for_index(items, count: int) -> bool:
    """Wait until Milvus has indexed every row (it builds in the background); False after INDEX_WAIT_S."""
    deadline = time.monotonic() + INDEX_WAIT_S
    while time.monotonic() < deadline:
        if items.indexed_rows() >= count:
            return True
        time.sleep(2)
    return False


def _recall(found_dists: np.ndarray, exact_dists: np.ndarray) -> float:
    """Share of the answers within each query's exact k-th distance: ties at that distance count as right."""
    kth = exact_dists.max(axis=1, keepdims=True)
    return float(((found_dists >= 0) & (found_dists <= kth)).sum() / (exact_dists >= 0).sum())
