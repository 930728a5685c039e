"""Features replay (Huo, Gu & Huang, "Training Neural Networks Using Features Replay", NeurIPS 2018).

The DeepMLP's layers are cut into K consecutive modules (the top one holds the hashing layer and the
classifier). At iteration t:
  forward   every module maps its input with the current weights; module k stores the input h_{k−1}^t
            it saw (it keeps the last K−k of them);
  backward  module K computes the loss on batch t and back-propagates through itself only; every
            module k < K *replays* its forward pass, with its current weights, on the input it saw
            K−k iterations earlier, and back-propagates the error gradient δ_k^{t−1} that module k+1
            sent at the previous iteration (which belongs to that same earlier batch). Each module
            sends the gradient w.r.t. its input down, to be used at iteration t+1;
  update    every module steps its own weights.
No module waits for another within an iteration: the K backward passes are independent (on CUDA they
run on K streams; on the CPU one after another, the same arithmetic). K = 1 is plain back-propagation
— step for step, identical to `BackpropTrainer` (tests/test_features_replay.py checks it).
Loss, optimiser and schedule are the back-prop trainer's (`BackpropOptions`): tanh-relaxed codes, a
linear classifier, cross-entropy. The first K−1 iterations update only the modules that have a δ.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass

import torch
from torch import nn

from vdsh.training.trainers.base import Trainer
from vdsh.training.validation import Validation
from vdsh.training.trainers.backprop import BackpropOptions, classification_loss, close_epoch, make_optimizer, make_schedule
from vdsh.training.encoders.mlp import DeepMLP


@dataclass
class FeaturesReplayOptions(BackpropOptions):
    """Back-prop options plus the number of modules K (1: plain back-propagation)."""

    modules: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.modules < 1:
            raise ValueError(f"modules must be >= 1, got {self.modules}")


def module_bounds(depth: int, modules: int) -> list[tuple[int, int]]:
    """[start, stop) layer ranges of K consecutive modules of near-equal depth."""
    if not 1 <= modules <= depth:
        raise ValueError(f"cannot cut {depth} layers into {modules} modules (need 1 <= K <= depth)")
    cuts = [round(k * depth / modules) for k in range(modules + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


class MlpModule(nn.Module):
    """Layers [start, stop) of a DeepMLP, sharing its parameters (the top module ends with the linear hashing layer)."""

    def __init__(self, mlp: DeepMLP, start: int, stop: int) -> None:
        super().__init__()
        self.mlp, self.start, self.stop = mlp, start, stop

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for m in range(self.start, self.stop):
            h = self.mlp.linears[m](h) if m == self.mlp.depth - 1 else self.mlp.hidden(h, m)
        return h


class ReplayState:
    """What crosses iterations: each module's stored inputs and the δ each module received."""

    def __init__(self, modules: int) -> None:
        self.inputs = [deque(maxlen=modules - k) for k in range(modules)]  # module k keeps K−k inputs
        self.deltas: list[torch.Tensor | None] = [None] * modules  # δ for module k's output, from k+1


def replay_step(blocks: list[MlpModule], classifier: nn.Linear, state: ReplayState, x: torch.Tensor, y: torch.Tensor,
                loss_kind: str, quantisation: float, streams: list | None = None) -> float:
    """One features-replay iteration's forward and backward (gradients accumulate in .grad); returns the loss."""
    top = len(blocks) - 1
    with torch.no_grad():
        h = x
        for k, block in enumerate(blocks):
            state.inputs[k].append(h)
            if k < top:
                h = block(h)
    new_deltas: list[torch.Tensor | None] = [None] * len(blocks)
    if streams:
        for s in streams:
            s.wait_stream(torch.cuda.current_stream())  # the forward above ran on the default stream
    loss_value = math.nan
    for k in range(top, -1, -1):
        if k < top and state.deltas[k] is None:
            continue  # no gradient has reached this module yet
        context = torch.cuda.stream(streams[k]) if streams else _null_context()
        with context:
            stored = state.inputs[k][0]  # the input it saw K−k iterations ago (the current one for the top)
            inp = stored.detach().requires_grad_(k > 0)
            out = blocks[k](inp)
            if k == top:
                codes = torch.tanh(out)
                loss = classification_loss(classifier(codes).float(), y, loss_kind)
                if quantisation > 0:
                    loss = loss + quantisation * (codes.float() - torch.sign(codes.float())).pow(2).sum(1).mean()
                loss.backward()
                loss_value = float(loss.detach())
            else:
                out.backward(state.deltas[k])
            if k > 0:
                new_deltas[k - 1] = inp.grad.detach()
    if streams:
        for s in streams:
            torch.cuda.current_stream().wait_stream(s)
    state.deltas = new_deltas
    return loss_value


class _null_context:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class FeaturesReplayTrainer(Trainer):
    """Trains a DeepMLP by features replay over K modules; `fit` -> (encoder, history), as `BackpropTrainer`."""

    options_class = FeaturesReplayOptions

    def fit(self, encoder: DeepMLP, features: torch.Tensor, labels: torch.Tensor,
            validation: Validation | None = None) -> tuple[DeepMLP, list[dict]]:
        opt = self.options
        if not isinstance(encoder, DeepMLP):
            raise ValueError("FeaturesReplayTrainer cuts a DeepMLP into modules; got " + type(encoder).__name__)
        if len(features) != len(labels):
            raise ValueError(f"features and labels differ in length: {len(features)} vs {len(labels)}")
        blocks = [MlpModule(encoder, a, b) for a, b in module_bounds(encoder.depth, opt.modules)]
        # Same order of random draws as BackpropTrainer, so that K = 1 reproduces it exactly.
        torch.manual_seed(opt.seed)
        device = torch.device(opt.device)
        encoder.to(device).train()
        x, y = features.to(device).float(), labels.to(device).float()
        classifier = nn.Linear(encoder.bits, y.shape[1]).to(device)
        optimizer = make_optimizer(list(encoder.parameters()) + list(classifier.parameters()), opt)
        schedule = make_schedule(optimizer, opt, math.ceil(len(x) / opt.batch_size))
        streams = [torch.cuda.Stream() for _ in blocks] if device.type == "cuda" and len(blocks) > 1 else None
        state = ReplayState(len(blocks))
        history: list[dict] = []
        start = time.perf_counter()
        for epoch in range(1, opt.epochs + 1):
            total, seen = 0.0, 0
            for idx in torch.randperm(len(x), device=device).split(opt.batch_size):
                optimizer.zero_grad(set_to_none=True)
                loss = replay_step(blocks, classifier, state, x[idx], y[idx], opt.loss, opt.quantisation, streams)
                optimizer.step()
                schedule.step()
                total += loss * len(idx)
                seen += len(idx)
            record = {"epoch": epoch, "sweep": epoch, "time": time.perf_counter() - start, "loss": total / seen,
                      "lr": optimizer.param_groups[0]["lr"], "modules": len(blocks)}
            history.append(close_epoch(record, encoder, x, y, validation, opt, self.progress))
        return encoder.eval(), history
