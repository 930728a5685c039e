"""`vdsh bench ...`: the only way figures get into BENCHMARKS.md."""

from __future__ import annotations

import os
import statistics
import time

import torch
import typer

from vdsh.app.benchmarks import markdown_table, write_section

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
                    features: str = typer.Option("pixels", help="'pixels' (/255) or 'gist' (GIST-512, cached).")) -> None:
    """mAP@all and fit / encode times of the classic baselines (LSH, ITQ, SH, SDH)."""
    from vdsh.training.baselines.evaluate import evaluate_baselines

    def show(r) -> None:
        typer.echo(f"{r.method:9s} {r.bits:3d} bits  mAP@all {r.map_all:.4f}  fit {r.fit_s:.1f} s  encode {r.encode_s:.1f} s")

    load_before = os.getloadavg()[0]  # other processes on the machine stretch the times; say how busy it was
    results = evaluate_baselines(protocol, bits, method, seed, features, on_result=show)
    load = f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    rows = [[r.method, r.bits, f"{r.map_all:.4f}", f"{r.fit_s:.1f}", f"{r.encode_s:.1f}"] for r in results]
    features_words = "pixels / 255" if features == "pixels" else "GIST-512"
    write_section(f"Classic baselines, {protocol}, {features}",
                  f"Protocol `{protocol}`, seed {seed} (1 seed), {features_words} as features, mAP@all over Hamming "
                  "ranking (ties by database position). Fit: training set; encode: queries + database; "
                  f"{load}.\n\n"
                  + markdown_table(["method", "bits", "mAP@all", "fit s", "encode s"], rows))
