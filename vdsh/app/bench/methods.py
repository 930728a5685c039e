"""`vdsh bench methods`: every training method of the field on one protocol, one table.

For each protocol and code length: the classic baselines (LSH, ITQ, SDH, spectral hashing, from
`vdsh.training.trainers.shallow`) and the network trainers (VDSH's ADMM, ProxProp, back-prop, alternating
minimisation, Taylor's ADMM, features replay, semantic hashing) are fitted on the protocol's training set and scored
on its queries against its database: mAP@all, P@H≤2, training time (wall clock of the fit alone) and
peak memory of the fit (resident-set growth above the level before it, sampled every 5 ms; on CUDA
the allocator's peak). Writes one BENCHMARKS.md section per protocol, the per-run JSON, a PR-curve
plot and an mAP-vs-time plot per code length; the table is rewritten after every code length.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import typer

from vdsh.app.bench.report import markdown_table, write_section
from vdsh.training.features.finetune import FinetuneOptions
from vdsh.training.protocol_inputs import protocol_inputs, validation_slice
from vdsh.training.run import RunConfig, build_encoder, protocol_codes
from vdsh.training.trainers.registry import MLP_METHODS, SHALLOW_HASHERS

BASELINE_METHODS = tuple(SHALLOW_HASHERS)
NETWORK_METHODS = tuple(MLP_METHODS)
SWEEP_METHODS = tuple(name for name, method in MLP_METHODS.items() if method.iterations == "sweeps")
# Published figures to stand beside ours (method, protocol, bits) -> (mAP@all, source).
LITERATURE = {
    ("sdh", "cifar10-5k", 48): (0.479, "Shen et al. 2015 (SDH), GIST"),
    ("admm", "cifar10-5k", 48): (0.548, "Zhang et al. 2016 (VDSH, a deep net), GIST"),
}


def release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc), so that RSS growth measures the next fit, not reuse of old pages."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def resident_bytes() -> int:
    """Resident set size of this process, from /proc (Linux); 0 where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    except (OSError, IndexError, ValueError):
        return 0


@contextmanager
def peak_memory(device: str):
    """Yields a dict that holds, on exit, 'peak_mib': the peak memory the block added (RSS, or CUDA allocator)."""
    out: dict[str, float] = {}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield out
        torch.cuda.synchronize()
        out["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        return
    release_free_heap()
    base, peak, running = resident_bytes(), [resident_bytes()], [True]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], resident_bytes())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield out
    finally:
        running[0] = False
        sampler.join()
        peak[0] = max(peak[0], resident_bytes())
        out["peak_mib"] = (peak[0] - base) / 2**20


def fit_method(method: str, bits: int, x: torch.Tensor, y: torch.Tensor, validation, depth: int, width: int,
               iterations: dict[str, int], options: dict, device: str, seed: int) -> tuple[torch.nn.Module, list[dict]]:
    """Fit one method on the training features; (encoder on the CPU, history: [] for the baselines)."""
    if method in SHALLOW_HASHERS:
        return SHALLOW_HASHERS[method](x, y.numpy(), bits=bits, seed=seed, **options), []
    entry = MLP_METHODS[method]
    settings = {"device": device, "seed": seed, entry.iterations: iterations[method], **options}
    torch.manual_seed(seed)
    config = RunConfig(trainer=method, bits=bits, depth=depth, width=width, show_progress=False)
    encoder = build_encoder(config, entry, None, x.shape[1:], y.shape[1])
    encoder, history = entry.trainer(entry.options(settings)).fit(encoder, x, y, validation)
    return encoder.cpu().eval(), history


def run_protocol(protocol: str, bits_list: list[int], methods: list[str], depth: int, width: int, iterations: dict[str, int],
                 method_options: dict, device: str, seed: int, data_root: str | None, train_limit: int | None,
                 out: Path, publish: Callable[[list[dict]], None], features: str | None = None,
                 resolution: int | None = None, finetune: FinetuneOptions | None = None) -> list[dict]:
    """Every (method, bits) on one protocol; writes the plots, and `publish`es the results after every code length
    (a long run that is stopped still leaves the finished code lengths in the table)."""
    from vdsh.index.metrics import retrieval_metrics

    inputs = protocol_inputs(protocol, data_root, seed, features=features, resolution=resolution, finetune=finetune)
    split, labels = inputs.split, inputs.labels
    train = split.train if train_limit is None else np.random.default_rng(seed).permutation(split.train)[:train_limit]
    x, y = inputs.prepare(train), labels[train]
    validation = validation_slice(inputs, seed)
    results = []
    for bits in bits_list:
        pr_curves = {}
        for method in methods:
            with peak_memory(device) as memory:
                start = time.perf_counter()
                encoder, history = fit_method(method, bits, x, y, validation, depth, width, iterations,
                                              method_options.get(method, {}), device, seed)
                train_s = time.perf_counter() - start
            report = retrieval_metrics(protocol_codes(encoder, inputs, split.query), labels[split.query],
                                       protocol_codes(encoder, inputs, split.database), labels[split.database], precision_at=())
            result = {"protocol": protocol, "method": method, "bits": bits, "map_all": report.map_all,
                      "p_h2": report.precision_within[2], "train_s": train_s, "peak_mib": memory["peak_mib"],
                      "n_train": len(train), "history": history, "pr_curve": report.to_dict()["pr_curve"],
                      "finetune": finetune and {**asdict(finetune), "history": inputs.finetune_history}}
            results.append(result)
            pr_curves[method] = result["pr_curve"]
            typer.echo(f"{protocol} {bits:3d} bits {method:9s} mAP@all {report.map_all:.4f}  P@H<=2 "
                       f"{result['p_h2']:.4f}  train {train_s:7.1f} s  peak {memory['peak_mib']:7.1f} MiB")
        from vdsh.app.plots import plot_pr_curves

        plot_pr_curves(pr_curves, out / f"{protocol}-{bits}-pr.png")
        plot_map_vs_time([r for r in results if r["bits"] == bits], out / f"{protocol}-{bits}-map-vs-time.png")
        publish(results)
    return results


def plot_map_vs_time(results: list[dict], path: Path) -> None:
    """Validation mAP against training time for the iterative methods; final query mAP@all as a point for all."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    colours = plt.get_cmap("tab10").colors
    for i, r in enumerate(results):
        colour = colours[i % len(colours)]
        curve = [(h["time"], h["val_map"]) for h in r["history"] if "val_map" in h]
        if curve:  # validation mAP during training (a validation slice, not the protocol's queries)
            ax.plot(*zip(*curve), marker=".", alpha=0.5, color=colour)
        ax.scatter([r["train_s"]], [r["map_all"]], marker="*" if curve else "o", s=80, color=colour, label=r["method"])
    ax.set(xlabel="training time (s)", ylabel="mAP@all", xscale="symlog", title=f"{results[0]['protocol']}, {results[0]['bits']} bits")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def section_body(results: list[dict], protocol: str, depth: int, width: int, iterations: dict[str, int]) -> str:
    rows = []
    for r in results:
        published = LITERATURE.get((r["method"], protocol, r["bits"]))
        rows.append([r["method"], r["bits"], f"{r['map_all']:.4f}", f"{r['p_h2']:.4f}", f"{r['train_s']:.1f}",
                     f"{r['peak_mib']:.0f}", f"{published[0]} ({published[1]})" if published else ""])
    n_train = results[0]["n_train"]
    networks = sorted({r["method"] for r in results} & set(NETWORK_METHODS))
    notes = (f"Training set: {n_train:,} images of `{protocol}`; queries vs database of the protocol; one seed. "
             f"Networks: {depth} weight layers x {width} units"
             + (", " + ", ".join(f"{m} {iterations[m]} {'sweeps' if m in SWEEP_METHODS else 'epochs'}" for m in networks) if networks else "")
             + ". Code targets: admm learns its codes against the classifier W (SDH's B-step); proxprop pulls to a fixed "
             "codeword per class (hash centres). Peak memory: growth of the resident set during the fit (CPU) or the CUDA "
             "allocator's peak.")
    if results[0].get("finetune"):
        notes += " " + finetune_note(results[0]["finetune"])
    return notes + "\n\n" + markdown_table(["method", "bits", "mAP@all", "P@H<=2", "train s", "peak MiB", "published mAP@all"], rows)


def finetune_note(finetune: dict) -> str:
    """The table's words on the fine-tuning every method's features came from."""
    last = finetune["history"][-1]
    accuracy = f", final training accuracy {last['train_accuracy']:.4f}" if last["train_accuracy"] is not None else ""
    return (f"Features: the backbone's last {finetune['stages']} stage(s) first fine-tuned as a classifier on the training "
            f"labels, {finetune['epochs']} epochs at lr {finetune['lr']:g} ({last['time']:.0f} s{accuracy}), shared by "
            "every method; train s excludes it.")


def bench_methods(
    protocols: str = typer.Option("mnist-5k,cifar10-5k", help="comma-separated protocols"),
    bits: str = typer.Option("16,32,48,64", help="comma-separated code lengths"),
    methods: str = typer.Option(",".join(BASELINE_METHODS + NETWORK_METHODS), help="comma-separated subset"),
    depth: int = typer.Option(3, help="weight layers of the networks"),
    width: int = typer.Option(512, help="hidden units per layer"),
    sweeps: int = typer.Option(20, help="sweeps of admm, proxprop, altmin, taylor"),
    epochs: int = typer.Option(15, help="epochs of backprop, replay and semantic fine-tuning"),
    train_limit: int = typer.Option(None, help="use only this many training images (quick runs; noted in the table)"),
    options: str = typer.Option("{}", help='per-method options as JSON, e.g. \'{"altmin": {"mu": 0.02}}\''),
    device: str = typer.Option("cuda" if torch.cuda.is_available() else "cpu"),
    seed: int = typer.Option(0),
    data_root: str = typer.Option(None, envvar="VDSH_DATA"),
    out: Path = typer.Option(Path("runs/bench-methods"), help="folder for results.json and the plots"),
    features: str = typer.Option(None, help="input features (default per dataset: pixels, GIST for CIFAR-10), e.g. efficientnet-lite0"),
    resolution: int = typer.Option(None, help="input side of a pretrained backbone (default 160)"),
    title: str = typer.Option(None, help="section title (default: 'Methods: PROTOCOL[, FEATURES RESOLUTION px]')"),
    finetune_stages: int = typer.Option(0, help="fine-tune the backbone's last N stages on the labels first (as vdsh train)"),
    finetune_epochs: int = typer.Option(FinetuneOptions.epochs, help="epochs of that fine-tuning"),
    finetune_lr: float = typer.Option(FinetuneOptions.lr, help="learning rate of that fine-tuning"),
) -> None:
    """Every method on each protocol at each code length: mAP@all, P@H<=2, time, memory; BENCHMARKS.md + plots."""
    from vdsh.files import atomic_write_text

    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = sorted(set(chosen) - set(BASELINE_METHODS + NETWORK_METHODS))
    if unknown:
        raise typer.BadParameter(f"unknown methods {unknown}; known: {', '.join(BASELINE_METHODS + NETWORK_METHODS)}")
    bits_list = [int(b) for b in bits.split(",")]
    iterations = {m: sweeps if m in SWEEP_METHODS else epochs for m in NETWORK_METHODS}
    method_options = json.loads(options)
    out.mkdir(parents=True, exist_ok=True)
    for protocol in [p.strip() for p in protocols.split(",") if p.strip()]:
        def publish(results: list[dict], protocol: str = protocol) -> None:
            atomic_write_text(out / f"{protocol}-results.json", json.dumps(results, indent=1))
            section = title or (f"Methods: {protocol}" + (f", {features}" if features else "")
                                + (f" {resolution} px" if resolution else "")
                                + (f", last {finetune_stages} stage(s) fine-tuned" if finetune_stages else ""))
            write_section(section, section_body(results, protocol, depth, width, iterations)
                          + f"\n\nPlots: `{out}/{protocol}-<bits>-pr.png`, `{out}/{protocol}-<bits>-map-vs-time.png`.")
            typer.echo(f"wrote BENCHMARKS.md section {section!r} and {out}/")

        run_protocol(protocol, bits_list, chosen, depth, width, iterations, method_options, device, seed,
                     data_root, train_limit, out, publish, features, resolution,
                     FinetuneOptions(finetune_stages, finetune_epochs, finetune_lr, seed=seed, device=device) if finetune_stages else None)
