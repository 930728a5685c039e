"""`vdsh bench features` and `vdsh bench int8`: what a pretrained backbone costs and gives on this machine."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import typer

from vdsh.app.bench.report import markdown_table, write_section


def images_per_second(backbone: torch.nn.Module, images: np.ndarray, resolution: int, batch_size: int = 64) -> float:
    """Throughput of feature extraction (resize, scale, network, pooling) over `images`, after one warm-up batch."""
    from vdsh.training.features.efficientnet import backbone_features

    backbone_features(backbone, images[:batch_size], resolution, batch_size)
    start = time.perf_counter()
    backbone_features(backbone, images, resolution, batch_size)
    return len(images) / (time.perf_counter() - start)


def cached_path_exists(images: np.ndarray, dataset: str, features: str, resolution: int) -> bool:
    from vdsh.data.cache import images_fingerprint
    from vdsh.data.paths import cache_dir

    key = images_fingerprint(images, f"{features}-{resolution}-v1")
    return (cache_dir() / "features" / f"{features}-{resolution}" / f"{dataset}-{key}.npy").is_file()


def bench_features(
    protocol: str = typer.Option("cifar10-5k", help="protocol whose mAP@all is reported (PROTOCOL.md)"),
    resolutions: str = typer.Option("96,128,160,224", help="comma-separated input sides"),
    features: str = typer.Option("efficientnet-lite0", help="a pretrained backbone of the feature registry"),
    bits: int = typer.Option(48),
    timing_images: int = typer.Option(256, help="images timed per resolution"),
    extract: bool = typer.Option(False, "--extract/--cached-only", help="extract the whole pool where not cached "
                                 "(60,000 CIFAR-10 images per resolution); default: mAP only where features are cached"),
    seed: int = typer.Option(0),
    data_root: str = typer.Option(None, envvar="VDSH_DATA"),
) -> None:
    """Per input resolution: extraction images/s on this CPU, and mAP@all of SDH on the frozen features."""
    from vdsh.data.protocols import load_protocol
    from vdsh.training.features import cached_feature_vectors, extraction_backbone
    from vdsh.training.run import RunConfig, run

    pool, _ = load_protocol(protocol, data_root, seed)
    images = np.asarray(pool.images)
    timed = images[np.random.default_rng(seed).permutation(len(images))[:timing_images]]
    load_before, rows = os.getloadavg()[0], []
    for resolution in (int(r) for r in resolutions.split(",")):
        rate = images_per_second(extraction_backbone(features, resolution), timed, resolution)
        full_minutes = len(images) / rate / 60
        if extract or cached_path_exists(images, pool.name, features, resolution):
            cached_feature_vectors(features, images, pool.name, resolution)
            result = run(RunConfig(protocol, "sdh", bits, seed=seed, data_root=data_root, features=features,
                                   resolution=resolution, show_progress=False))
            score = f"{result.summary['metrics']['map_all']:.4f}"
        else:
            score = "not measured (features not extracted)"
        rows.append([resolution, f"{rate:.0f}", f"{full_minutes:.1f}", score])
        typer.echo(rows[-1])
    write_section(f"Pretrained features: resolution, {features}, {protocol}", (
        f"Frozen ImageNet {features} features of `{protocol}`'s images (32 px CIFAR-10 images resized), float32 CPU "
        f"inference (batch norm folded, as extraction runs it) in batches of 64 with {torch.get_num_threads()} threads; images/s over {timing_images} images "
        f"after a warm-up batch; minutes for the whole pool ({len(images):,} images) follow from that rate. mAP@all: "
        f"SDH, {bits} bits, on the protocol's queries against its database; 1-min load average {load_before:.1f} "
        f"before, {os.getloadavg()[0]:.1f} after (a shared machine: rates under load).\n\n"
        + markdown_table(["resolution", "images/s", f"minutes for {len(images):,}", f"mAP@all (SDH, {bits} bits)"], rows)))


def latency_ms(model, images: np.ndarray, batch: int, repeats: int) -> float:
    """Median milliseconds per image of `model.encode` (uint8 images in, codes out) at one batch size."""
    times = []
    model.encode(images[:batch], batch_size=batch)
    for r in range(repeats):
        chunk = images[(r * batch) % (len(images) - batch + 1):][:batch]
        start = time.perf_counter()
        model.encode(chunk, batch_size=batch)
        times.append((time.perf_counter() - start) / batch * 1000)
    return statistics.median(times)


def bench_int8(
    model: Path = typer.Option(..., "--model", exists=True, dir_okay=False, help="a model trained on backbone features"),
    protocol: str = typer.Option(None, help="protocol for the mAP change (default: the model's)"),
    queries: int = typer.Option(200, help="queries drawn from the protocol's (mAP on a subset: both encoders see every image)"),
    database: int = typer.Option(2000, help="database items drawn from the protocol's"),
    repeats: int = typer.Option(20, help="timed calls per batch size"),
    threads: int = typer.Option(None, help="torch threads (default: torch's)"),
    seed: int = typer.Option(0),
    data_root: str = typer.Option(None, envvar="VDSH_DATA"),
    title: str = typer.Option(None, help="section title (default: 'int8 backbone, FEATURES RESOLUTION px')"),
) -> None:
    """Float vs int8 backbone: latency per image at batch 1 and 64, backbone size, mAP@all on a protocol subset."""
    from vdsh.data.protocols import load_protocol
    from vdsh.index.metrics import mean_average_precision
    from vdsh.training.features.quantize import engine, serialized_bytes
    from vdsh.training.encoders.model import load_model

    if threads:
        torch.set_num_threads(threads)
    float_model = load_model(model, fold=True)  # as `vdsh serve` runs it
    if not float_model.input_spec.backbone:
        raise typer.BadParameter(f"{model} is not a model on pretrained backbone features")
    start = time.perf_counter()
    int8_model = load_model(model, int8=True)
    quantize_s = time.perf_counter() - start
    pool, split = load_protocol(protocol or float_model.info.get("protocol"), data_root, seed)
    rng = np.random.default_rng(seed)
    q = np.sort(rng.permutation(split.query)[:queries])
    db = np.sort(rng.permutation(split.database)[:database])
    images, labels = np.asarray(pool.images), np.asarray(pool.labels)
    load_before, rows = os.getloadavg()[0], []
    for name, m in (("float32", float_model), ("int8", int8_model)):
        b1, b64 = latency_ms(m, images[q], 1, repeats), latency_ms(m, images[db], 64, max(2, repeats // 4))
        score = mean_average_precision(m.encode(images[q], 64), labels[q], m.encode(images[db], 64), labels[db])
        rows.append([name, f"{b1:.1f}", f"{b64:.1f}", f"{serialized_bytes(m.backbone.net) / 2**20:.1f}", f"{score:.4f}"])
        typer.echo(rows[-1])
    spec = float_model.input_spec
    write_section(title or f"int8 backbone, {spec.features} {spec.resolution} px", (
        f"Model `{model}` ({float_model.bits} bits, {float_model.info.get('trainer')} on {spec.features} at "
        f"{spec.resolution} px). Latency: median ms per image of `encode` (uint8 image in, code out: resize, "
        f"backbone, hashing head) at batch 1 ({repeats} calls) and 64, {torch.get_num_threads()} torch threads. "
        f"Size: the backbone's network as saved (frozen TorchScript where `vdsh serve` runs it so). mAP@all: {len(q)} queries against {len(db)} "
        f"database items drawn from `{pool.name}`'s split (a subset: both encoders run on every image). Both run as "
        f"`vdsh serve` runs them (`inference.scripted`: frozen TorchScript on the CPU); float32: batch norm folded "
        f"into the convolutions. int8: "
        f"torch.ao FX static post-training quantisation, {engine()} engine, calibrated on the {len(float_model.calibration)} "
        f"training images stored in the model, the stem and the first two stages in float (quantize.FLOAT_MODULES); quantising "
        f"took {quantize_s:.1f} s at load. 1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after.\n\n"
        + markdown_table(["backbone", "ms/image, batch 1", "ms/image, batch 64", "backbone MiB", "mAP@all (subset)"], rows)))
