"""`vdsh bench ...`: the only way figures get into BENCHMARKS.md."""

from __future__ import annotations

import os
import statistics
import time

import torch
import typer

from vdsh.app.bench.report import markdown_table, write_section

bench = typer.Typer(no_args_is_help=True, help="Measure, and write the figures into BENCHMARKS.md.")


def clustered_sign_codes(n: int, bits: int, classes: torch.Tensor, centres: torch.Tensor, flip: float) -> torch.Tensor:
    """Codes near one centre per class, `flip` of their bits flipped: the shape of learned codes."""
    flips = torch.where(torch.rand(n, bits) < flip, -1, 1)
    return (centres[classes] * flips).to(torch.int8)


@bench.command("metrics")
def bench_metrics(repeats: int = typer.Option(3, help="Timed runs per size; the median is reported."),
                  bits: int = typer.Option(64)) -> None:
    """Time mAP@all + mAP@5000 + P@k + P@H<=2 + PR curve at protocol sizes."""
    from vdsh.index.codes import as_multi_hot
    from vdsh.index.metrics import retrieval_metrics

    torch.manual_seed(0)
    centres = torch.randint(0, 2, (10, bits)) * 2 - 1
    rows = []
    for n_query, n_db in [(1_000, 59_000), (10_000, 50_000)]:
        qy, dy = torch.randint(0, 10, (n_query,)), torch.randint(0, 10, (n_db,))
        qc, dc = clustered_sign_codes(n_query, bits, qy, centres, 0.1), clustered_sign_codes(n_db, bits, dy, centres, 0.1)
        ql, dl = as_multi_hot(qy.numpy(), 10), as_multi_hot(dy.numpy(), 10)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            retrieval_metrics(qc, ql, dc, dl, map_at=(5000,))
            times.append(time.perf_counter() - start)
        rows.append([f"{n_query:,} x {n_db:,}", bits, f"{statistics.median(times):.2f}", f"{min(times):.2f}"])
        typer.echo(f"{n_query} x {n_db}: median {statistics.median(times):.2f} s")
    write_section("Retrieval metrics", "Codes: 10 class centres, 10 % of bits flipped (single-label relevance). "
                  "All metrics of one report: mAP@all, mAP@5000, P@100/500/1000, P@H<=2, PR curve.\n\n"
                  + markdown_table(["queries x database", "bits", "median s", "min s"], rows))


@bench.command("baselines")
def bench_baselines(protocol: str = typer.Option("mnist-5k", help="Retrieval protocol (PROTOCOL.md)."),
                    bits: list[int] = typer.Option([16, 32, 48, 64], help="Code lengths; repeat the option."),
                    method: list[str] = typer.Option(["lsh", "itq", "spectral", "sdh"], help="Baselines; repeat."),
                    seed: int = typer.Option(0, help="Split and fitting seed (one seed per run)."),
                    features: str = typer.Option("pixels", help="'pixels' (/255), 'gist' (GIST-512) or 'efficientnet-lite0' (cached)."),
                    resolution: int = typer.Option(None, help="Input side of a pretrained backbone (default 160).")) -> None:
    """mAP@all and fit / scoring times of the classic baselines (LSH, ITQ, SH, SDH)."""
    from vdsh.training.run import RunConfig, run

    load_before = os.getloadavg()[0]  # other processes on the machine stretch the times; say how busy it was
    rows = []
    for b in bits:
        for name in method:
            m = run(RunConfig(protocol, name, b, seed=seed, features=features, resolution=resolution,
                              show_progress=False)).summary["metrics"]
            rows.append([name, b, f"{m['map_all']:.4f}", f"{m['train_time_s']:.1f}", f"{m['score_time_s']:.1f}"])
            typer.echo(f"{name:9s} {b:3d} bits  mAP@all {m['map_all']:.4f}  fit {m['train_time_s']:.1f} s  "
                       f"score {m['score_time_s']:.1f} s")
    load = f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    features_words = {"pixels": "pixels (normalised)", "gist": "GIST-512"}.get(features, f"{features} at {resolution} px")
    write_section(f"Classic baselines, {protocol}, {features}" + (f" {resolution} px" if resolution else ""),
                  f"Protocol `{protocol}`, seed {seed} (1 seed), {features_words} as features, mAP@all over Hamming "
                  "ranking (ties by database position). Fit: training set; score: encoding queries + database and "
                  f"the mAP; {load}.\n\n"
                  + markdown_table(["method", "bits", "mAP@all", "fit s", "score s"], rows))


def _latency_rows(rows: list[dict], label: str) -> list[list[object]]:
    table = []
    for row in rows:
        for batch, latency in row["latency"].items():
            table.append([label, f"{row['items']:,}", row["distinct_codes"] and f"{row['distinct_codes']:,}", row["kind"],
                          batch, f"{latency['p50_ms']:.4f}", f"{latency['p99_ms']:.4f}", f"{latency['qps']:,.0f}",
                          "yes" if row["identical"] else f"no (recall {row['recall']:.3f})"])
    return table


@bench.command("query")
def bench_query(
    sizes: str = typer.Option("59000,1000000,10000000", help="Database sizes of synthetic clustered codes."),
    bits: int = typer.Option(64),
    kinds: str = typer.Option("flat,distinct,auto,multihash,hash,ivf", help="Index kinds to compare."),
    k: int = typer.Option(100),
    queries: int = typer.Option(1000, help="Distinct queries cycled through."),
    max_seconds: float = typer.Option(3.0, help="Time limit per kind and batch size."),
    model: str = typer.Option(None, help="A trained model: also time its real codes of its protocol's database."),
    index: str = typer.Option(None, help="An index built with --model: also time HTTP image queries end to end."),
    data_root: str = typer.Option(None, envvar="VDSH_DATA"),
) -> None:
    """Search-only latency per index kind (p50/p99 per query, batch 1 and 64), and HTTP end to end."""
    from vdsh.index.bench import clustered_codes, compare_kinds

    kind_list = kinds.split(",")
    table: list[list[object]] = []
    for n in (int(s) for s in sizes.split(",")):
        for flip, label in ((0.15, "synthetic, 15 % flips"), (0.02, "synthetic, 2 % flips")):
            database = clustered_codes(n, bits, flip=flip, seed=0)
            probe = clustered_codes(queries, bits, flip=flip, seed=0, draw=1)
            # Sub-linear kinds degrade on clustered codes: beyond 1M items time only the exact ones.
            chosen = kind_list if n <= 1_000_000 else [c for c in kind_list if c in ("flat", "distinct", "auto")]
            rows = compare_kinds(database, probe, bits, chosen, k=k, max_seconds=max_seconds)
            table += _latency_rows(rows, label)
            typer.echo(markdown_table(HEADER_QUERY, table[-len(rows) * 2:]))
            del database
    if model:
        from vdsh.data import load_protocol
        from vdsh.training.encoders.model import load_model
        from vdsh.training.encoding import model_codes

        hashing_model, protocol = load_model(model), model_protocol(model, None)
        pool, split = load_protocol(protocol, data_root)
        database, probe = model_codes(hashing_model, pool, split.database), model_codes(hashing_model, pool, split.query)
        rows = compare_kinds(database, probe, hashing_model.bits, kind_list, k=k, max_seconds=max_seconds)
        table += _latency_rows(rows, f"learned ({hashing_model.bits} bits, {protocol})")
    body = ("Codes around 10 random centres with each bit flipped with the given probability; queries drawn the "
            "same way. Latency per query = call time / batch size. `identical`: same ids, distances and tie order "
            "as the exact flat index for every query. Above 1M items only the exact kinds (flat, distinct, auto) "
            "are timed: hash, multihash and ivf take minutes to build or seconds per query there.\n\n" + markdown_table(HEADER_QUERY, table))
    if index and model:
        body += "\n\n" + http_image_queries(index, model, model_protocol(model, None), data_root)
    write_section(f"Search latency, {bits} bits, k={k}", body)


def model_protocol(model: str, protocol: str | None) -> str:
    """`protocol`, or the one the model was trained on."""
    from vdsh.training.encoders.model import read_model_metadata

    protocol = protocol or read_model_metadata(model).get("info", {}).get("protocol")
    if not protocol:
        raise typer.BadParameter(f"{model} names no protocol: give --protocol for the query images")
    return protocol


def http_image_queries(index: str, model: str, protocol: str, data_root: str | None, queries: int = 200,
                       serve_options: tuple[str, ...] = (), concurrency: tuple[int, ...] = (1, 4, 16),
                       requests: int = 500, seconds: float = 20.0, seed: int = 0) -> str:
    """Time POST /search with `protocol`'s query images against `vdsh serve` (with `serve_options`); a markdown
    paragraph and table. The images are sent at their stored size, as PNG uploads."""
    import numpy as np

    from vdsh.app.bench.http import bench_http
    from vdsh.data import load_protocol

    pool, split = load_protocol(protocol, data_root, seed)
    chosen = np.sort(np.random.default_rng(seed).permutation(split.query)[:queries])
    result = bench_http(index, model, np.asarray(pool.images[chosen]), k=10, concurrency=concurrency,
                        requests=requests, duration_s=seconds, options=serve_options)
    rows = [[r["concurrency"], r["p50_ms"], r["p99_ms"], r["req_per_s"], r["errors"], r["server_total_p50_ms"]]
            for r in result["rows"]]
    return (f"HTTP: POST /search with a PNG upload ({len(chosen)} query images of `{protocol}`, "
            f"{result['image_bytes_mean']:,} bytes on average) to `{' '.join(('vdsh serve',) + serve_options)}` on "
            f"127.0.0.1, {result['items']:,} items, {result['bits']} bits, {result['index_kind']} index, k=10, one "
            f"worker; client-measured, closed loop, each level {requests} requests or {seconds:g} s; GET /health "
            f"floor p50 {result['health_p50_ms']:.1f} ms. {memory_sentence(result)}\n\n"
            + markdown_table(["concurrency", "p50 ms", "p99 ms", "req/s", "errors", "server-side p50 ms"], rows))


def memory_sentence(result: dict) -> str:
    """The server's resident memory once loaded and at its peak, as `bench_http` read it."""
    if result["loaded_mib"] is None:
        return "Server memory: not measured (no Linux /proc)."
    return (f"Server resident memory: {result['loaded_mib']:,.0f} MiB once the model and index are loaded, "
            f"{result['peak_mib']:,.0f} MiB at its peak under the load (sampled every 0.1 s).")


@bench.command("http")
def bench_http_command(
    model: str = typer.Option(..., help="The model the index was built with."),
    index: str = typer.Option(..., help="The index to serve."),
    protocol: str = typer.Option(None, help="Where the query photos come from [default: the model's protocol]."),
    queries: int = typer.Option(200, help="Query images, sent in turn."),
    int8: bool = typer.Option(False, "--int8", help="Serve with the backbone quantised to int8 (vdsh serve --int8)."),
    memory_limit_mb: int = typer.Option(None, help="vdsh serve --memory-limit-mb [default: serve's]; a photo model "
                                        "and its index may hold more than serve's default"),
    threads: int = typer.Option(None, help="vdsh serve --threads [default: serve's, 1]: a backbone answers one photo "
                                "sooner on more threads"),
    concurrency: str = typer.Option("1,4,16", help="Client threads per level, comma-separated."),
    requests: int = typer.Option(500, help="Requests per level (or --seconds, whichever ends first)."),
    seconds: float = typer.Option(20.0),
    data_root: str = typer.Option(None, envvar="VDSH_DATA"),
) -> None:
    """Image queries end to end over HTTP (photo in, neighbours out): p50/p99 and req/s per concurrency."""
    from vdsh.training.encoders.model import read_model_metadata

    protocol = model_protocol(model, protocol)
    load_before = os.getloadavg()[0]
    serve_options = ((("--int8",) if int8 else ()) + (("--memory-limit-mb", str(memory_limit_mb)) if memory_limit_mb else ())
                     + (("--threads", str(threads)) if threads else ()))
    body = http_image_queries(index, model, protocol, data_root, queries, serve_options,
                              tuple(int(c) for c in concurrency.split(",")), requests, seconds)
    typer.echo(body)
    meta = read_model_metadata(model)
    spec = meta["input"]
    what = f"{spec['features']} {spec['resolution']} px" if spec.get("resolution") else spec["features"]
    write_section(f"HTTP image queries: {protocol}, {what}{', int8' if int8 else ''}", (
        f"Model `{model}` ({meta.get('info', {}).get('trainer')}), index `{index}`. 1-min load average "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after.\n\n" + body))


@bench.command("items")
def bench_items(
    items: int = typer.Option(59_000, help="Items in the saved index (synthetic codes, 64x64 grey thumbnails)."),
    bits: int = typer.Option(64),
    kind: str = typer.Option("flat", help="Index kind."),
    adds: int = typer.Option(100, help="Timed adds committed as deltas (a fifth as many deletes)."),
    full_saves: int = typer.Option(3, help="Timed adds committed as a full save each (the old way)."),
    directory: str = typer.Option(None, help="Where to write the temporary index (default: the system temp dir)."),
) -> None:
    """Latency of adding / deleting one item of a saved index and committing it to disk (POST /items' store part)."""
    from vdsh.index.bench import add_latency

    load_before = os.getloadavg()[0]
    result = add_latency(items, bits, kind, adds=adds, full_saves=full_saves, directory=directory)
    rows = [[name, r["count"], f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}", f"{r['max_ms']:.1f}", f"{r['mean_ms']:.1f}"]
            for name, r in result.items()]
    table = markdown_table(["operation", "count", "p50 ms", "p99 ms", "max ms", "mean ms"], rows)
    typer.echo(table)
    write_section(f"Index changes, {items:,} items", (
        f"One item added to (or deleted from) a saved {kind} index of {items:,} {bits}-bit items with 64x64 grey "
        "thumbnails, committed before returning: as a full new version (`add, full save`: the server before "
        "delta files, and the cost of a compaction every 256 changes) or as one delta file (`add, delta`, "
        f"`delete, delta`: the server now); `load` replays the {adds + max(1, adds // 5)} deltas. Includes the "
        f"fsyncs of the disk under the temporary directory; 1-min load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after.\n\n" + table))


CLIENT_WORDS = {"ab": "ApacheBench, one `ab -k -c N` per kind of request, each sending one request body again and again; "
                       "ab gives whole milliseconds", "python": "separate Python processes"}
HEADER_QUERY = ["codes", "items", "distinct codes", "kind", "batch", "p50 ms/query", "p99 ms/query", "queries/s", "identical to flat"]


@bench.command("serve")
def bench_serve_command(
    model: str = typer.Option(..., help="The model the index was built with (e.g. runs/demo/model.safetensors)."),
    index: str = typer.Option(..., help="The index to serve (copied first: the writer scenario adds items)."),
    seconds: float = typer.Option(8.0, help="Length of each load scenario."),
    clients: int = typer.Option(8, help="Concurrent clients sending queries."),
    client: str = typer.Option(None, help="ab (ApacheBench, light on a shared CPU; apt-get install apache2-utils) or "
                                         "python (client processes) [default: ab when installed]"),
) -> None:
    """The server under hostile load: code and image queries alone, beside decompression-bomb uploads and
    beside a writer; /health; resident memory under 16 parallel worst-case uploads."""
    from vdsh.app.bench.serve import bench_serve
    from vdsh.data import load

    import shutil

    client = client or ("ab" if shutil.which("ab") else "python")
    load_before = os.getloadavg()[0]
    result = bench_serve(index, model, load("mnist-sample").images[:200], duration_s=seconds, clients=clients, client=client)
    rows = result["rows"]
    table = markdown_table(
        ["scenario", "answers", "req/s", "p50 ms", "p99 ms", "max ms", "statuses", "server CPU ms / answer of the run"],
        [[name, r.requests, f"{r.req_per_s:,.0f}", r.p50_ms, r.p99_ms, r.max_ms,
          ", ".join(f"{k}: {v}" for k, v in r.statuses.items()), result["cpu_ms"][name]] for name, r in rows.items()])
    unloaded, hostile = rows["code queries"], rows["code queries + 2 bomb clients"]
    kept = 100 * hostile.req_per_s / unloaded.req_per_s if unloaded.req_per_s else 0.0
    worst = rows["16 parallel worst-case uploads"]
    goals = markdown_table(["goal", "target", "measured"], [
        ["code queries kept beside 2 bomb clients", "≥ 80 %", f"{kept:.0f} %"],
        ["code-query p99 beside 2 bomb clients", "≤ 30 ms", f"{hostile.p99_ms} ms"],
        ["/health p99 beside 2 bomb clients", "≤ 10 ms", f"{rows['health + 2 bomb clients'].p99_ms} ms"],
        ["peak resident memory, 16 parallel worst-case uploads", "≤ 1,536 MB (default limit)",
         f"{result['rss_peak_mb']:,.0f} MB (from {result['rss_start_mb']:,.0f} MB; {result['rss_end_mb']:,.0f} MB after)"],
        ["slowest answer, 16 parallel worst-case uploads", "≤ 10 s", f"{worst.max_ms / 1000:.1f} s"],
        ["code queries alone / beside a writer", "≥ 1,500 req/s",
         f"{unloaded.req_per_s:,.0f} / {rows['code queries + 1 writer'].req_per_s:,.0f} req/s"],
        ["image queries alone / beside a writer", "≥ 500 req/s",
         f"{rows['image queries'].req_per_s:,.0f} / {rows['image queries + 1 writer'].req_per_s:,.0f} req/s"],
    ])
    typer.echo(table + "\n\n" + goals)
    write_section("Serving under hostile load", (
        f"`vdsh serve` with its default limits on 127.0.0.1 over a copy of `{index}` ({result['items']:,} items, "
        f"{result['bits']} bits, {result['index_kind']} index; pixel limit {result['max_pixels']:,}); each scenario runs "
        f"{seconds:g} s of closed-loop clients with keep-alive connections ({CLIENT_WORDS[client]}), on the same "
        f"cores as the server ({clients} query clients unless the scenario says otherwise). Bomb uploads: 6300 x 6300 "
        f"1-bit PNGs of 5 KB, refused from their header (400). Worst-case uploads: an RGBA PNG at the pixel limit "
        f"({result['worst_case_bytes'] / 2**20:.1f} MB), the most one decode may hold. Server CPU per answer: the "
        "server process's CPU time over a run divided by all the answers of that run, a figure the machine's other "
        "load changes far less than req/s and latency. The machine was shared with "
        f"other engineers' runs (1-min load average {load_before:.1f} before, {result['load_average']:.1f} after), so "
        "these figures are pessimistic.\n\n" + table + "\n\n" + goals))
