"""One training run as a library call: `run(RunConfig(...)) -> RunResult`.

protocol -> input (vectors or images, `protocol_inputs`) -> encoder -> the method's trainer (`trainers.registry`)
-> the protocol's queries scored against its database (mAP@all, forward-pass codes) -> a `RunResult`, which
`save` writes as model.safetensors, history.json and protocol.json + split.npz. `vdsh train`, `vdsh demo` and
the benchmarks are thin wrappers over this.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vdsh.data.protocols import save_protocol
from vdsh.files import atomic_write_text
from vdsh.index.metrics import mean_average_precision
from vdsh.progress import note, progress_bar
from vdsh.training.augment import FeatureNoise, FlatImageAugmentation, chosen_augmentation
from vdsh.training.distributed import init_from_env, leave_group
from vdsh.training.encoders.class_scores import ClassScoreCode
from vdsh.training.encoders.cnn import CNN_KINDS
from vdsh.training.encoders.mlp import DeepMLP
from vdsh.training.encoders.model import HashingModel, save_model
from vdsh.training.encoders.registry import ENCODERS
from vdsh.training.encoders.sigmoid_mlp import SigmoidEncoder
from vdsh.training.features.finetune import FinetuneOptions
from vdsh.training.protocol_inputs import (PREPARE_CHUNK, ProtocolInputs, calibration_images, protocol_inputs,
                                           validation_slice, validation_source)
from vdsh.training.trainers.registry import CNN_METHODS, MLP_METHODS, SHALLOW_HASHERS, Method
from vdsh.training.validation import forward_codes

MLP_DEFAULTS = {"trainer": "admm", "depth": 8, "width": 1024}
CNN_DEFAULTS = {"trainer": "backprop", "encoder": "small_cnn", "depth": 4}  # depth: the hybrid's MLP head


@dataclass
class RunConfig:
    """Everything one run needs. encoder: "mlp" (vectors) or a CNN kind (images); None picks by trainer."""

    protocol: str = "mnist-sample"
    trainer: str | None = None  # default: admm on an MLP, backprop on a CNN
    bits: int = 48
    encoder: str | None = None
    depth: int | None = None  # MLP weight layers (default 8); the hybrid's head (default 4)
    width: int | None = None  # MLP hidden units (default 1024); CNN base channels (default per encoder)
    batchnorm: bool = False  # back-prop MLPs only
    residual: bool = False  # back-prop MLPs only
    classifier_baseline: bool = False  # CNN back-prop: a plain classifier, its class scores coded
    iterations: int = 20  # sweeps or epochs: the field the method's registry entry names
    options: dict = field(default_factory=dict)  # extra options of the method
    device: str = "cpu"
    seed: int = 0
    data_root: str | None = None
    protocol_options: dict = field(default_factory=dict)  # keyword arguments of `load_protocol`
    features: str | None = None  # MLPs and shallow hashers: a kind of `vdsh.training.features`
    resolution: int | None = None  # a pretrained backbone's input side
    finetune_stages: int = 0  # fine-tune the backbone's last stages on the labels first (0: frozen features)
    finetune_epochs: int = FinetuneOptions.epochs
    finetune_lr: float = FinetuneOptions.lr
    augment: bool | None = None  # None: where the method augments by default and the dataset names a recipe
    show_progress: bool = True

    def __post_init__(self) -> None:
        on_cnn = (self.encoder or "mlp") != "mlp" or (self.trainer in CNN_METHODS and self.trainer not in MLP_METHODS)
        for name, value in (CNN_DEFAULTS if on_cnn else MLP_DEFAULTS).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.encoder = self.encoder or "mlp"
        if on_cnn:
            if self.trainer not in CNN_METHODS or self.encoder not in CNN_KINDS:
                raise ValueError(f"a CNN encoder trains with trainer {', '.join(CNN_METHODS)}; an MLP with "
                                 f"{', '.join([*MLP_METHODS, *SHALLOW_HASHERS])} (got encoder {self.encoder}, trainer {self.trainer})")
            if self.classifier_baseline and self.trainer != "backprop":
                raise ValueError(f"the classifier baseline trains by back-prop; it does not apply to trainer {self.trainer}")
        elif self.trainer not in MLP_METHODS and self.trainer not in SHALLOW_HASHERS:
            raise ValueError(f"trainer must be one of {', '.join([*MLP_METHODS, *SHALLOW_HASHERS, *CNN_METHODS])}, got {self.trainer!r}")
        self.finetune  # noqa: B018 -- checks the fine-tuning options now, not after the data has loaded

    @property
    def on_images(self) -> bool:
        return self.encoder != "mlp"

    @property
    def finetune(self) -> FinetuneOptions | None:
        """The backbone fine-tuning this run asks for, or None (frozen features)."""
        if not self.finetune_stages:
            return None
        return FinetuneOptions(self.finetune_stages, self.finetune_epochs, self.finetune_lr, seed=self.seed,
                               device=self.device)


@dataclass
class RunResult:
    """A finished run: the model (None on torchrun ranks > 0, which leave scoring and saving to rank 0), its summary
    (what ran and how well: the `info` the model file keeps), the trainer's history, the protocol's inputs and
    the query codes."""

    model: HashingModel | None
    summary: dict
    history: list[dict]
    inputs: ProtocolInputs
    query_codes: torch.Tensor | None = None

    def save(self, out: Path) -> None:
        """model.safetensors, history.json, protocol.json + split.npz under `out`."""
        out.mkdir(parents=True, exist_ok=True)
        save_model(out / "model.safetensors", self.model, self.summary)
        source = self.summary.get("validation")
        history = [{**r, "val_on": source} if r.get("val_map") is not None else r for r in self.history]
        atomic_write_text(out / "history.json", json.dumps(history, indent=1))
        save_protocol(out, self.inputs.split, self.inputs.images.images.shape)


def run(config: RunConfig) -> RunResult:
    """Train one model on a protocol's training set and score it on its queries against its database."""
    inputs = protocol_inputs(config.protocol, config.data_root, config.seed, config.protocol_options,
                             config.features, config.resolution, images=config.on_images, finetune=config.finetune,
                             progress=finetune_reporter(config))
    if config.trainer in SHALLOW_HASHERS:
        encoder, history = fit_shallow(config, inputs)
        return finish(config, inputs, encoder, history, None, None, {"seed": config.seed, **config.options})
    method = (CNN_METHODS if config.on_images else MLP_METHODS)[config.trainer]
    augmentation = input_augmentation(config, method, inputs)
    validation_on = validation_source(inputs.split) if method.validates else None
    validation = validation_slice(inputs, config.seed) if validation_on else None
    if config.show_progress:
        describe_run(inputs, augmentation, validation_on)
    options = method_options(config, method)
    rank, world = init_from_env(config.device)  # under torchrun: every process trains on its shard of the samples
    if world > 1 and not method.distributed:
        raise ValueError(f"several processes (torchrun) train with trainer "
                         f"{', '.join(n for n, m in MLP_METHODS.items() if m.distributed)} only, not {config.trainer}")
    train = inputs.split.train[rank::world] if method.distributed == "shards" else inputs.split.train
    x, y = inputs.prepare(train), inputs.labels[train]
    torch.manual_seed(config.seed)  # the encoder's initial weights
    encoder = build_encoder(config, method, options, x.shape[1:], y.shape[1])
    trainer = method.trainer(options, None, augmentation)
    steps = getattr(options, "steps", None) or getattr(options, method.iterations)
    with progress_bar(f"{config.trainer} {describe_network(config, method)}", steps, config.show_progress and rank == 0) as advance:
        trainer.progress = epoch_reporter(advance)
        encoder, history = trainer.fit(encoder, x, y, validation)
    if world > 1:
        leave_group()
    if config.classifier_baseline:
        encoder = ClassScoreCode(encoder.cpu().eval(), config.bits, config.seed)
    if rank > 0:  # the weights are identical on every rank: rank 0 scores and saves them
        return RunResult(None, {"protocol": config.protocol, "trainer": config.trainer, "rank": rank}, history, inputs)
    return finish(config, inputs, encoder, history, augmentation, validation_on, asdict(options))


def method_options(config: RunConfig, method: Method):
    """The trainer's options: the run's device, seed and iterations, then the extra options of --options."""
    settings = {"device": config.device, "seed": config.seed, method.iterations: config.iterations, **config.options}
    if method.network_settings:  # options that describe the network it builds (the hybrid's head)
        settings = {**method.network_settings(config), **settings}
    if config.classifier_baseline:
        settings["plain_classifier"] = True
    return method.options(settings)


def fit_shallow(config: RunConfig, inputs: ProtocolInputs) -> tuple[nn.Module, list[dict]]:
    """A shallow hasher: one fit on the training features (float64 inside), no iterations."""
    train = inputs.split.train
    torch.manual_seed(config.seed)
    start = time.perf_counter()
    encoder = SHALLOW_HASHERS[config.trainer](inputs.prepare(train), np.asarray(inputs.images.labels)[train],
                                              bits=config.bits, seed=config.seed, **config.options)
    return encoder, [{"sweep": 1, "time": time.perf_counter() - start}]


def finish(config: RunConfig, inputs: ProtocolInputs, encoder: nn.Module, history: list[dict], augmentation,
           validation_on: str | None, options: dict) -> RunResult:
    """Wrap the encoder with its input spec, score it on the protocol, and write the summary."""
    model = HashingModel(encoder.cpu().eval(), inputs.spec, calibration_images(inputs), inputs.backbone)
    start = time.perf_counter()
    query_map, query_codes = protocol_map(model.encoder, inputs)
    summary = {"protocol": inputs.split.protocol, "seed": inputs.split.seed, "trainer": config.trainer,
               "encoder": config.encoder, "encoder_config": model.encoder.config(), "bits": config.bits,
               "depth": config.depth, "width": config.width, "features": inputs.spec.features,
               "resolution": inputs.spec.resolution, "finetune": asdict(config.finetune) if config.finetune else None,
               "finetune_history": inputs.finetune_history, "batchnorm": config.batchnorm, "residual": config.residual,
               "classifier_baseline": config.classifier_baseline, "options": options,
               "augmentation": augmentation.config() if augmentation else None, "validation": validation_on,
               "protocol_spec": asdict(inputs.split.spec) if inputs.split.spec else None,
               "class_names": list(inputs.images.class_names),
               "metrics": {"map_all": query_map, "val_map": history[-1].get("val_map"),
                           "train_time_s": history[-1]["time"], "score_time_s": time.perf_counter() - start}}
    return RunResult(model, summary, history, inputs, query_codes)


def protocol_codes(encoder: nn.Module, inputs: ProtocolInputs, indices: np.ndarray) -> torch.Tensor:
    """±1 forward-pass codes of some of the pool's images, prepared a chunk at a time."""
    return torch.cat([forward_codes(encoder, inputs.prepare(indices[i : i + PREPARE_CHUNK]))
                      for i in range(0, len(indices), PREPARE_CHUNK)])


def protocol_map(encoder: nn.Module, inputs: ProtocolInputs) -> tuple[float, torch.Tensor]:
    """(mAP@all of the protocol's queries against its database, the query codes): the reported figure."""
    split, labels = inputs.split, np.asarray(inputs.images.labels)
    queries, database = protocol_codes(encoder, inputs, split.query), protocol_codes(encoder, inputs, split.database)
    return mean_average_precision(queries, labels[split.query], database, labels[split.database]), queries


def build_encoder(config: RunConfig, method: Method, options, input_shape: tuple[int, ...], classes: int) -> nn.Module:
    """The network a method trains: a ReLU DeepMLP, semantic hashing's sigmoid stack, or a CNN with `bits` outputs
    (one per class for a classifier: the classifier baseline, the hybrid's classifier trunk)."""
    if method.network == "sigmoid-mlp":
        return SigmoidEncoder([input_shape[0]] + [config.width] * (config.depth - 1) + [config.bits])
    if method.network == "mlp":
        return DeepMLP(input_shape[0], config.depth, config.width, config.bits, config.batchnorm, config.residual)
    as_classifier = config.classifier_baseline or getattr(options, "trunk_objective", None) == "classifier"
    width = {} if config.width is None else {"width": config.width}
    return ENCODERS[config.encoder](input_shape[0], input_shape[1], classes if as_classifier else config.bits, **width)


def input_augmentation(config: RunConfig, method: Method, inputs: ProtocolInputs):
    """The method's input augmentation, or None: the dataset's recipe on images and pixels (crop, and flip for
    photos), Gaussian noise on vector features. augment None: where the method augments by default; True: required
    (the photos recipe on data that names none)."""
    if config.augment and not method.trainer.takes_augmentation:
        augmented = [n for n, m in {**MLP_METHODS, **CNN_METHODS}.items() if m.trainer.takes_augmentation]
        raise ValueError(f"augmentation needs a trainer of {', '.join(dict.fromkeys(augmented))}, got {config.trainer}")
    if not (config.augment or (config.augment is None and method.augmented_by_default)):
        return None
    spec = inputs.spec
    if spec.features not in ("pixels", "image"):
        return FeatureNoise()
    recipe = chosen_augmentation(inputs.split.spec.dataset, config.augment)
    if recipe is None or spec.features == "image":
        return recipe
    return FlatImageAugmentation(recipe, spec.channels, spec.size)


def describe_network(config: RunConfig, method: Method) -> str:
    """The progress bar's words: the network and what it counts."""
    network = config.encoder if config.on_images else f"{config.depth}x{config.width}"
    return f"{network}, {method.unit or method.iterations.removeprefix('finetune_')}"


def finetune_reporter(config: RunConfig):
    """What fine-tuning says after each epoch (on stderr), or None when the run is quiet."""
    if not config.show_progress:
        return None

    def report(record: dict) -> None:
        accuracy = f", training accuracy {record['train_accuracy']:.4f}" if record["train_accuracy"] is not None else ""
        note(f"fine-tuning the backbone's last {config.finetune_stages} stage(s): epoch {record['epoch']}/"
             f"{config.finetune_epochs}, loss {record['loss']:.4f}{accuracy}")
    return report


def epoch_reporter(advance):
    """A trainer's `progress` callback: one step of the bar per epoch or sweep, with its loss and mAPs."""
    def progress(record: dict) -> None:
        shown = [f"{k} {record[k]:.4f}" for k in ("loss", "train_map", "val_map", "residual_max") if record.get(k) is not None]
        advance(status=", ".join(shown))
    return progress


def describe_run(inputs: ProtocolInputs, augmentation, validation_on: str | None) -> None:
    """What a run is about to do, on stderr: the protocol's parts, the image shape, augmentation, validation."""
    split, images = inputs.split, inputs.images
    shape = "x".join(map(str, images.images.shape[1:]))
    note(f"{split.spec.describe() if split.spec else split.protocol} (seed {split.seed}): "
         f"{len(split.query)} queries, {len(split.train)} training images, {len(split.database)} in the database; "
         f"{len(images.class_names)} classes; images {shape}")
    note(f"augmentation: {augmentation.config() if augmentation else 'none'}; "
         f"validation on {validation_on or 'nothing (this trainer keeps its last epoch)'}")
