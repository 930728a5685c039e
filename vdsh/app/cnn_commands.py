"""`vdsh bench cnn`: CPU encoding latency of each CNN encoder (it sets the server's query latency)."""

from __future__ import annotations

import statistics
import time

import torch
import typer

from vdsh.app.benchmarks import markdown_table, write_section

IMAGE_SHAPES = {"mnist": (1, 28), "cifar10": (3, 32)}


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
    dataset: str = typer.Option("cifar10", help=f"Image shape to time: one of {sorted(IMAGE_SHAPES)}."),
    repeats: int = typer.Option(50, help="Timed calls per batch size; the median is reported."),
    threads: int = typer.Option(0, help="torch CPU threads (0: torch's default)."),
) -> None:
    """Time CPU encoding per image at batch 1 and batch 64 for each CNN encoder, at its default width."""
    from vdsh.training.cnn import CNN_KINDS
    from vdsh.training.model import ENCODERS, HashingModel, InputSpec

    if dataset not in IMAGE_SHAPES:
        raise ValueError(f"dataset must be one of {sorted(IMAGE_SHAPES)}, got {dataset!r}")
    if threads > 0:
        torch.set_num_threads(threads)
    channels, size = IMAGE_SHAPES[dataset]
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


def run_cnn_training(protocol: str, bits: int, encoder: str, width: int | None, device: str, seed: int, epochs: int,
                     out, data_root: str | None, extra: dict | None = None, classifier_baseline: bool = False) -> dict:
    """`vdsh train --encoder small_cnn|resnet9|dwsep`: train on the protocol's images, save like the MLP path."""
    from dataclasses import asdict, replace

    from vdsh.app.train_commands import final_query_map, save_run
    from vdsh.data.protocols import load_protocol
    from vdsh.training.cnn_training import CNN_OPTIONS, default_augmentation, train_cnn

    images, split = load_protocol(protocol, data_root, seed)
    options = replace(CNN_OPTIONS, device=device, seed=seed, epochs=epochs,
                      dtype="bfloat16" if device.startswith("cuda") else "float32", **(extra or {}))
    torch.manual_seed(seed)
    model, history = train_cnn(encoder, images.images[split.train], images.labels[split.train], bits, width, options,
                               default_augmentation(protocol), classifier_baseline)
    summary = {"protocol": protocol, "seed": seed, "trainer": "backprop", "encoder": encoder,
               "encoder_config": model.encoder.config(), "bits": bits, "classifier_baseline": classifier_baseline,
               "options": asdict(options),
               "metrics": {"map_all": final_query_map(model, images, split, "cpu"), "train_time_s": history[-1]["time"]}}
    if out is not None:
        save_run(out, model, summary, history, split)
    return summary
