"""`vdsh bench train`: VDSH's ADMM against ProxProp and back-prop at several depths, one BENCHMARKS.md table."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import typer

from vdsh.app.bench.report import write_section
from vdsh.app.cli.protocol_options import DEPRECATED_DATASET, PROTOCOL_HELP, chosen_protocol
from vdsh.training.run import RunConfig, RunResult, run


# `vdsh bench train` rows: name -> (row label, trainer, BatchNorm + residual, extra options)
BENCH_ROWS = {
    "admm": ("ADMM (VDSH)", "admm", False, {}),
    "admm-odd-even": ("ADMM (VDSH), odd-even z-steps", "admm", False, {"order": "odd-even"}),
    "admm-backward-forward": ("ADMM (VDSH), backward then forward z-steps (dlADMM's order)", "admm", False, {"order": "backward-forward"}),
    "admm-centres": ("ADMM (VDSH), class-codeword targets", "admm", False, {"codes": "centres"}),
    "admm-layer-penalties": ("ADMM (VDSH), β and γ doubling per layer upwards", "admm", False, {"penalty_ratio": 2.0}),
    "admm-nonnegative": ("ADMM (VDSH), z ≥ 0 in the z-steps", "admm", False, {"nonnegative": True}),
    "admm-msra": ("ADMM (VDSH), MSRA start", "admm", False, {"init": "msra"}),
    "proxprop": ("ProxProp", "proxprop", False, {}),
    "bp-msra": ("back-prop (plain, MSRA init)", "backprop", False, {}),
    "bp-identity": ("back-prop (plain, identity init)", "backprop", False, {"init": "identity"}),
    "bp-bn-res": ("back-prop BN+residual", "backprop", True, {}),
}
SWEEP_TRAINERS = ("admm", "proxprop")


def bench_row(label: str, result: RunResult, iterations: int) -> str:
    """One table row: what ran (codes target, augmentation), how well, how fast, and how far ADMM's constraints are from met."""
    summary, history = result.summary, result.history
    m, options, trainer = summary["metrics"], summary["options"], summary["trainer"]
    codes = options["codes"] if trainer in SWEEP_TRAINERS else "—"
    depth, width = summary["depth"], summary["width"]
    augmentation = "none" if summary["augmentation"] is None else ", ".join(f"{k} {v}" for k, v in summary["augmentation"].items())
    residual = f"{history[-1]['residual_max']:.3f}" if trainer == "admm" else "—"
    per_iteration = m["train_time_s"] / max(len(history), 1)
    return (f"| {depth} × {width} | {label} | {codes} | {augmentation} | {iterations} | {m['map_all']:.3f} | "
            f"{m['train_time_s']:.1f} | {per_iteration:.2f} | {residual} |")


def bench_train(
    protocol: str = typer.Option(None, "--protocol", help=f"{PROTOCOL_HELP} (default mnist-5k)"),
    dataset: str = DEPRECATED_DATASET,
    bits: int = typer.Option(48),
    depths: str = typer.Option("8,32", help="comma-separated depths"),
    width: int = typer.Option(1024),
    trainers: str = typer.Option("admm,proxprop,bp-msra,bp-identity,bp-bn-res", help=f"comma-separated rows of {', '.join(BENCH_ROWS)}"),
    sweeps: int = typer.Option(15, help="sweeps of admm and proxprop"),
    epochs: int = typer.Option(15, help="back-prop epochs"),
    device: str = typer.Option("cuda" if torch.cuda.is_available() else "cpu"),
    seed: int = typer.Option(0),
    data_root: str = typer.Option(None),
    admm_options: str = typer.Option("{}", help="extra options of every admm row, as JSON"),
    proxprop_options: str = typer.Option("{}", help="extra options of the proxprop row, as JSON"),
    augment: bool = typer.Option(None, "--augment/--no-augment", help="shifts of pixel input, noise on GIST, for every row that takes it (default: proxprop and back-prop rows)"),
    title: str = typer.Option(None, help="section title (default: from the protocol, bits, width and device)"),
    output: Path = typer.Option(Path("BENCHMARKS.md")),
) -> None:
    """VDSH's ADMM vs ProxProp vs back-prop (MSRA, identity, BN + residuals) at several depths; a BENCHMARKS.md section."""
    protocol = chosen_protocol(protocol, dataset, "mnist-5k")
    names = trainers.split(",")
    unknown = [n for n in names if n not in BENCH_ROWS]
    if unknown:
        raise typer.BadParameter(f"unknown rows {unknown}; known: {', '.join(BENCH_ROWS)}")
    extra_of = {"admm": json.loads(admm_options), "proxprop": json.loads(proxprop_options)}
    rows = []
    for depth in [int(d) for d in depths.split(",")]:
        for name in names:
            label, trainer, bn_res, extra = BENCH_ROWS[name]
            iterations = sweeps if trainer in SWEEP_TRAINERS else epochs
            result = run(RunConfig(protocol, trainer, bits, depth=depth, width=width, batchnorm=bn_res, residual=bn_res,
                                   iterations=iterations, options={**extra_of.get(trainer, {}), **extra}, device=device,
                                   seed=seed, data_root=data_root, augment=augment))
            rows.append(bench_row(label, result, iterations))
            typer.echo(rows[-1])
    body = "\n".join([
        f"Protocol {protocol}, {bits} bits, seed {seed}; mAP@all of the protocol's queries against its database (forward-pass codes).",
        "Codes: the top's targets (learned: SDH's B-step against the classifier W; centres: a fixed codeword per class).",
        "Time per sweep or epoch includes the per-sweep validation. ADMM's last column is its largest relative primal",
        "residual ||z_m − f_m(z_{m−1})|| / ||z_m|| over layers at the end of training (0: forward and auxiliary networks agree).",
        "",
        "| network | trainer | codes | augmentation | sweeps/epochs | mAP@all | train time (s) | s per sweep/epoch | ADMM residual |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
    ])
    title = title or f"Training: {protocol}, {bits} bits, width {width}, {device}" + (", no augmentation" if augment is False else "")
    write_section(title, body, output, device)
    typer.echo(f"wrote {output}")
