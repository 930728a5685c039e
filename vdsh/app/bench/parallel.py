"""`vdsh bench parallel`: do the parallel training methods pay on this machine's cores?

Three methods, each in three layouts, every run in freshly spawned processes (gloo between them):
  features replay (K modules, one per worker: model parallel), back-prop (DistributedDataParallel: data
  parallel) and VDSH's ADMM (consensus over data blocks: data parallel);
  1 worker with 1 thread, 1 worker with as many threads as the workers of the parallel run, and W workers with 1
  thread each, so that a speed-up is measured against the best serial use of the same cores, not a handicapped one.
The same algorithm runs in every layout: features replay always has K = W modules (one process runs them one
after another), ADMM always has W data blocks (one process holds them all), back-prop's global mini-batch is
the same (each of W ranks takes 1/W of it). Reported per epoch (ADMM: per sweep) of training alone: the median
epoch's wall time, the mean time spent communicating (replay: blocked in send/recv; back-prop: all-reduces in flight, which overlap the
backward pass; ADMM: in its all-reduces), the speed-ups and mAP@all on the protocol's queries.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import typer

from vdsh.app.bench.report import markdown_table, write_section

METHODS = ("replay", "backprop", "admm")
TITLES = {"replay": "features replay", "backprop": "back-prop (DDP)", "admm": "VDSH ADMM (consensus)"}


def layouts(workers: int) -> list[tuple[int, int]]:
    """(processes, threads each): the serial run on one thread, on all the parallel run's threads, the parallel run."""
    return [(1, 1), (1, workers), (workers, 1)]


def trainer_for(method: str, processes: int, workers: int, settings: dict):
    """The method's trainer with the same algorithm whatever the layout (see the module docstring)."""
    from vdsh.training.trainers.admm import AdmmOptions, AdmmTrainer
    from vdsh.training.trainers.backprop import BackpropOptions, BackpropTrainer
    from vdsh.training.trainers.features_replay import FeaturesReplayOptions, FeaturesReplayTrainer

    common = dict(eval_every=0, seed=settings["seed"])
    if method == "replay":
        return FeaturesReplayTrainer(FeaturesReplayOptions(modules=workers, split=settings["split"], epochs=settings["epochs"],
                                                           batch_size=settings["batch_size"], **common))
    if method == "backprop":
        return BackpropTrainer(BackpropOptions(epochs=settings["epochs"], batch_size=settings["batch_size"], **common))
    return AdmmTrainer(AdmmOptions(sweeps=settings["sweeps"], blocks=workers // processes, keep_best=False, **common))


def worker(rank: int, processes: int, threads: int, workers: int, method: str, settings: dict, x: torch.Tensor,
           y: torch.Tensor, scratch: str) -> None:
    """One process of a run: trains, and rank 0 saves the weights, the time per epoch and the communication time."""
    from vdsh.training import distributed
    from vdsh.training.encoders.mlp import DeepMLP

    torch.set_num_threads(threads)
    if processes > 1:
        dist.init_process_group("gloo", init_method=f"file://{scratch}/init", rank=rank, world_size=processes)
    try:
        torch.manual_seed(settings["seed"])
        encoder = DeepMLP(x.shape[1], settings["depth"], settings["width"], settings["bits"])
        if method == "admm":  # ADMM's ranks are given their shards (the others their share of each mini-batch)
            x, y = x[rank::processes], y[rank::processes]
        encoder, history = trainer_for(method, processes, workers, settings).fit(encoder, x, y)
        if rank == 0:
            comm = history[-1].get("comm_time", distributed.SUM_CLOCK.seconds) if processes > 1 else 0.0
            torch.save({"state": encoder.state_dict(), "epoch_s": median_epoch(history), "comm_s": comm / len(history)},
                       Path(scratch) / "result.pt")
    finally:
        if processes > 1:
            dist.destroy_process_group()


def median_epoch(history: list[dict]) -> float:
    """The median epoch's training time (history's `time` is cumulative): robust to a slow first epoch or a spike."""
    times = [r["time"] for r in history]
    return float(np.median(np.diff([0.0] + times)))


def run_layout(method: str, processes: int, threads: int, workers: int, settings: dict, x: torch.Tensor, y: torch.Tensor) -> dict:
    """One layout of one method in fresh processes; its rank 0's result (weights, seconds per epoch, communication)."""
    with tempfile.TemporaryDirectory(prefix="vdsh-bench-parallel-") as scratch:
        mp.spawn(worker, args=(processes, threads, workers, method, settings, x, y, scratch), nprocs=processes, join=True)
        return torch.load(Path(scratch) / "result.pt")


def query_map(state: dict, settings: dict, inputs, in_features: int) -> float:
    """mAP@all of the protocol's queries against its database with the trained weights (the pipeline's figure)."""
    from vdsh.training.encoders.mlp import DeepMLP
    from vdsh.training.run import protocol_map

    encoder = DeepMLP(in_features, settings["depth"], settings["width"], settings["bits"])
    encoder.load_state_dict(state)
    return protocol_map(encoder.eval(), inputs)[0]


def table(rows: list[dict]) -> str:
    """One row per (method, layout); speed-ups against the same method's two serial layouts."""
    out = []
    for r in rows:
        serial = {(s["processes"], s["threads"]): s["epoch_s"] for s in rows if s["method"] == r["method"] and s["processes"] == 1}
        one, best = serial.get((1, 1)), min(serial.values())
        out.append([TITLES[r["method"]], f"{r['processes']} × {r['threads']}", f"{r['epoch_s']:.3f}", f"{r['comm_s']:.3f}",
                    f"{one / r['epoch_s']:.2f}×" if one else "–", f"{best / r['epoch_s']:.2f}×", f"{r['map']:.3f}"])
    return markdown_table(["method", "processes × threads", "s / epoch", "communication s / epoch",
                           "speed-up vs 1 × 1", "speed-up vs best serial", "mAP@all"], out)


def bench_parallel(
    protocol: str = typer.Option("mnist-5k", help="protocol (training set, queries, database)"),
    depth: int = typer.Option(8, help="DeepMLP layers"),
    width: int = typer.Option(1024, help="hidden width"),
    bits: int = typer.Option(32, help="code length"),
    workers: int = typer.Option(2, help="processes of the parallel runs (features replay: its modules K)"),
    epochs: int = typer.Option(5, help="epochs of features replay and back-prop"),
    sweeps: int = typer.Option(5, help="ADMM sweeps"),
    batch_size: int = typer.Option(128, help="global mini-batch of features replay and back-prop"),
    split: str = typer.Option("work", help="features replay's cut: 'work' (equal work per module) or 'depth'"),
    methods: str = typer.Option(",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS)),
    train_limit: int = typer.Option(0, help="use only this many training images (0: all; for smoke runs)"),
    data_root: str = typer.Option(None, envvar="VDSH_DATA", help="dataset root"),
    seed: int = typer.Option(0),
) -> None:
    """Wall time per epoch of features replay, DDP back-prop and ADMM on 1 and W processes; BENCHMARKS.md."""
    from vdsh.training.protocol_inputs import protocol_inputs

    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    if not chosen or set(chosen) - set(METHODS):
        raise ValueError(f"--methods must be a comma-separated subset of {', '.join(METHODS)}, got {methods!r}")
    if workers < 2 or split not in ("work", "depth"):
        raise ValueError("--workers must be >= 2 and --split 'work' or 'depth'")
    inputs = protocol_inputs(protocol, data_root, seed)
    train = inputs.split.train
    train = train if not train_limit else np.random.default_rng(seed).permutation(train)[:train_limit]
    x, y = inputs.prepare(train), inputs.labels[train]
    settings = dict(depth=depth, width=width, bits=bits, epochs=epochs, sweeps=sweeps, batch_size=batch_size, split=split, seed=seed)
    rows = []
    for method in chosen:
        for processes, threads in layouts(workers):
            result = run_layout(method, processes, threads, workers, settings, x, y)
            score = query_map(result["state"], settings, inputs, x.shape[1])
            rows.append({"method": method, "processes": processes, "threads": threads, "epoch_s": result["epoch_s"],
                         "comm_s": result["comm_s"], "map": score})
            typer.echo(f"{method:8s} {processes} × {threads}: {result['epoch_s']:.3f} s/epoch, "
                       f"communication {result['comm_s']:.3f} s/epoch, mAP@all {score:.4f}")
    notes = (f"{len(train):,} training images of `{protocol}`, DeepMLP {depth} × {width}, {bits} bits; {epochs} epochs "
             f"(ADMM: {sweeps} sweeps), global batch {batch_size}; features replay with K = {workers} modules, split by "
             f"{split}. Processes × threads: the layout; every run in fresh processes. Time: training alone, per epoch.")
    title = f"Parallel training: {protocol}, {depth} × {width}, batch {batch_size}"
    write_section(title, table(rows) + "\n\n" + notes)
    typer.echo(f"wrote BENCHMARKS.md section {title!r}")
