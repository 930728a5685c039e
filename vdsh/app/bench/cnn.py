"""`vdsh bench cnn` (CPU encoding latency of each CNN encoder: it sets the server's query latency) and
`vdsh bench cnn-train` (the CNN trainers side by side)."""

from __future__ import annotations

import statistics
import time

import torch
import typer

from vdsh.app.bench.report import markdown_table, write_section
from vdsh.app.cli.protocol_options import DEPRECATED_DATASET, chosen_protocol



def encode_seconds(model, images: torch.Tensor, repeats: int) -> list[float]:
    """Wall time of `model.encode(images)` (uint8 in, packed-ready ±1 codes out), after one warm-up call."""
    model.encode(images)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.encode(images)
        times.append(time.perf_counter() - start)
    return times


def bench_cnn(
    bits: int = typer.Option(64, help="Code length of the hashing head."),
    dataset: str = typer.Option("cifar10", help="Image shape to time: that of a dataset of fixed shape (mnist, cifar10)."),
    repeats: int = typer.Option(50, help="Timed calls per batch size; the median is reported."),
    threads: int = typer.Option(0, help="torch CPU threads (0: torch's default)."),
) -> None:
    """Time CPU encoding per image at batch 1 and batch 64 for each CNN encoder, at its default width."""
    from vdsh.training.encoders.cnn import CNN_KINDS
    from vdsh.training.encoders.model import HashingModel, InputSpec
    from vdsh.data.datasets import dataset_info
    from vdsh.training.encoders.registry import ENCODERS

    info = dataset_info(dataset)
    if info.channels is None:
        raise ValueError(f"{dataset} images have no fixed shape: time a dataset that has one (mnist, cifar10)")
    if threads > 0:
        torch.set_num_threads(threads)
    channels, size = info.channels, info.size
    torch.manual_seed(0)
    rows = []
    for kind in CNN_KINDS:
        encoder = ENCODERS[kind](channels, size, bits)
        model = HashingModel(encoder, InputSpec(channels, size, "image", [0.5] * channels, [0.25] * channels)).eval()
        params = sum(p.numel() for p in encoder.parameters())
        row = [kind, encoder.width, f"{params / 1e6:.2f}"]
        for batch in (1, 64):
            images = torch.randint(0, 256, (batch, channels, size, size), dtype=torch.uint8)
            per_image_ms = [1e3 * t / batch for t in encode_seconds(model, images, repeats)]
            row += [f"{statistics.median(per_image_ms):.3f}", f"{min(per_image_ms):.3f}"]
        rows.append(row)
        typer.echo(f"{kind}: median ms/image batch 1 {row[3]}, batch 64 {row[5]}")
    write_section(
        f"CNN encoding latency ({dataset})",
        f"CPU time per image of `HashingModel.encode` (uint8 {channels}x{size}x{size} in, {bits}-bit codes out, "
        f"eval mode, float32), median and best of {repeats} calls after a warm-up, {torch.get_num_threads()} torch threads "
        "(best is the figure an idle machine approaches when others share its cores).\n\n"
        + markdown_table(["encoder", "width", "params (M)", "batch 1 median ms/image", "batch 1 best",
                        "batch 64 median ms/image", "batch 64 best"], rows),
    )


# (row name, trainer, classifier baseline) of `vdsh bench cnn-train`
CNN_BENCH_ROWS = {
    "backprop": ("back-prop CNN", "backprop", False),
    "classifier": ("classifier baseline", "backprop", True),
    "cnn-local": ("CNN block-wise local updates", "cnn-local", False),
    "hybrid": ("hybrid: back-prop trunk + ProxProp MLP head", "hybrid", False),
}


def bench_cnn_train(
    protocol: str = typer.Option(None, "--protocol", help="a protocol, as `vdsh train --protocol` (default mnist-5k)"),
    dataset: str = DEPRECATED_DATASET,
    bits: int = typer.Option(48),
    encoder: str = typer.Option("small_cnn", help="small_cnn, resnet9 or dwsep"),
    width: int = typer.Option(None, help="CNN base channels (default per encoder)"),
    epochs: int = typer.Option(10, help="epochs of back-prop, the classifier, cnn-local and the hybrid's trunk"),
    rows: str = typer.Option(",".join(CNN_BENCH_ROWS), help=f"comma-separated subset of {', '.join(CNN_BENCH_ROWS)}"),
    options: str = typer.Option("{}", help='per-row options as JSON, e.g. \'{"hybrid": {"head": {"sweeps": 5}}}\''),
    device: str = typer.Option("cuda" if torch.cuda.is_available() else "cpu"),
    seed: int = typer.Option(0),
    data_root: str = typer.Option(None, envvar="VDSH_DATA"),
) -> None:
    """Back-prop CNN vs its classifier baseline vs block-wise local updates (cnn-local) vs the hybrid, one protocol; a BENCHMARKS.md section."""
    import json

    from vdsh.training.run import RunConfig, run

    protocol = chosen_protocol(protocol, dataset, "mnist-5k")
    chosen = [r.strip() for r in rows.split(",") if r.strip()]
    unknown = sorted(set(chosen) - set(CNN_BENCH_ROWS))
    if unknown:
        raise typer.BadParameter(f"unknown rows {unknown}; known: {', '.join(CNN_BENCH_ROWS)}")
    per_row = json.loads(options)
    table, source = [], None  # where the validation slice came from (the same split for every row)
    for row in chosen:
        name, trainer, classifier = CNN_BENCH_ROWS[row]
        summary = run(RunConfig(protocol, trainer, bits, encoder=encoder, width=width, classifier_baseline=classifier,
                                iterations=epochs, options=per_row.get(row, {}), device=device, seed=seed,
                                data_root=data_root)).summary
        m = summary["metrics"]
        source = summary["validation"] or source
        table.append([name, f"{m['map_all']:.4f}", f"{m['train_time_s']:.1f}"])
        typer.echo(f"{name}: mAP@all {m['map_all']:.4f}, train {m['train_time_s']:.1f} s")
        write_section(
            f"CNN trainers: {protocol}, {bits} bits, {encoder}",
            f"Protocol {protocol}, {bits} bits, seed {seed}, {encoder} (width {width or 'default'}), {epochs} epochs "
            "(the hybrid: trunk epochs, then ProxProp sweeps of its MLP head); mAP@all of the protocol's queries against its "
            "database, forward-pass codes. Train time: the trainer's own wall clock, its mAP evaluations excluded (the "
            "hybrid's includes extracting the training features). cnn-local and the hybrid keep the "
            f"epoch / sweep with the best mAP on a validation slice of {source or 'no images'}.\n\n"
            + markdown_table(["trainer", "mAP@all", "train s"], table),
            device=device,
        )
