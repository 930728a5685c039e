"""Every training method by name, in explicit dicts: the pipeline (`vdsh.training.run`) reads nothing else.

A `Method` says which `Trainer` class runs it, which network it trains, how its options are made from the
pipeline's settings, and which option `--sweeps/--epochs` sets. MLP methods train on vectors (pixels, GIST,
backbone features); CNN methods on images; the shallow hashers are fitted in one step and build their own
encoder (their fitted parameters are the encoder). Adding a method: its module here, one entry below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from vdsh.training.trainers.admm import AdmmTrainer
from vdsh.training.trainers.altmin import AltMinTrainer
from vdsh.training.trainers.backprop import BackpropTrainer
from vdsh.training.trainers.base import Trainer
from vdsh.training.trainers.cnn_backprop import cnn_options
from vdsh.training.trainers.cnn_local import CnnLocalTrainer
from vdsh.training.trainers.features_replay import FeaturesReplayTrainer
from vdsh.training.trainers.hybrid import HybridTrainer, hybrid_options
from vdsh.training.trainers.proxprop import ProxPropTrainer
from vdsh.training.trainers.semantic_hashing import SemanticHashingTrainer
from vdsh.training.trainers.shallow import fit_itq, fit_lsh, fit_sdh, fit_spectral
from vdsh.training.trainers.taylor_admm import TaylorAdmmTrainer


@dataclass(frozen=True)
class Method:
    """How the pipeline runs one method."""

    trainer: type[Trainer]
    iterations: str  # the options field that --sweeps / --epochs sets
    network: str  # what it trains: "mlp", "sigmoid-mlp" (on vectors); "cnn" (an ImageEncoder on images)
    augmented_by_default: bool = False  # gets the dataset's augmentation unless --no-augment (needs takes_augmentation)
    distributed: str | None = None  # under torchrun: "shards" (every rank its strided shard of the samples) or
    # "whole" (every rank the whole training set; the trainer splits the work: DDP's share of each batch, features
    # replay's modules); None: one process only
    validates: bool = True  # scored on a validation slice while it trains (which may pick the sweep or epoch kept)
    make_options: Callable[[dict], Any] | None = None  # settings -> options (default: the trainer's options class)
    network_settings: Callable[[Any], dict] | None = None  # run config -> options that shape what fit builds
    unit: str = ""  # what its progress counts, where not just its iterations field

    def options(self, settings: dict) -> Any:
        """The trainer's options from the pipeline's settings (device, seed, the iterations field, extras)."""
        return self.make_options(settings) if self.make_options else self.trainer.options_class(**settings)


MLP_METHODS: dict[str, Method] = {
    "admm": Method(AdmmTrainer, "sweeps", "mlp", distributed="shards"),
    "proxprop": Method(ProxPropTrainer, "sweeps", "mlp", augmented_by_default=True, distributed="shards"),
    "backprop": Method(BackpropTrainer, "epochs", "mlp", augmented_by_default=True, distributed="whole"),
    "altmin": Method(AltMinTrainer, "sweeps", "mlp", distributed="whole"),
    "taylor": Method(TaylorAdmmTrainer, "sweeps", "mlp"),
    "replay": Method(FeaturesReplayTrainer, "epochs", "mlp", distributed="whole"),
    "semantic": Method(SemanticHashingTrainer, "finetune_epochs", "sigmoid-mlp"),
}
CNN_METHODS: dict[str, Method] = {
    "backprop": Method(BackpropTrainer, "epochs", "cnn", augmented_by_default=True, validates=False,  # keeps its last epoch
                       make_options=cnn_options),
    "cnn-local": Method(CnnLocalTrainer, "epochs", "cnn", augmented_by_default=True),
    "hybrid": Method(HybridTrainer, "epochs", "cnn", augmented_by_default=True, make_options=hybrid_options,
                     network_settings=lambda config: {"bits": config.bits, "mlp_depth": config.depth},  # its MLP head
                     unit="trunk epochs + head sweeps"),
}
# name -> fit(features (N, D), labels (N, L) or None, bits, seed) -> encoder
SHALLOW_HASHERS: dict[str, Callable[..., Any]] = {"lsh": fit_lsh, "itq": fit_itq, "spectral": fit_spectral, "sdh": fit_sdh}
