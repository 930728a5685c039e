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
No module waits for another's backward pass: the K backward passes are independent. Where they run:
  K ranks   under a torch.distributed group of K processes (torchrun, or spawned workers; gloo on CPU, NCCL
            on GPUs) rank k holds module k (`Pipeline`): it receives h_{k−1}^t from rank k−1, sends h_k^t up,
            receives δ_k^{t−1} from rank k+1 and runs its replay and backward pass while the other ranks run
            theirs; only the no-grad forward chain is sequential. Every rank is given the whole training set
            (rank 0 reads the inputs, the top rank the labels) and holds the whole DeepMLP, but trains only its
            module; the modules' weights are broadcast from their owners when an epoch is evaluated.
  1 process the reference: the K backward passes one after another (on CUDA on K streams of one device),
            the same arithmetic, the same weights (tests/test_features_replay_distributed.py checks both).
K = 1 is plain back-propagation — step for step, identical to `BackpropTrainer` (tests/test_features_replay.py).
Loss, optimiser and schedule are the back-prop trainer's (`BackpropOptions`): tanh-relaxed codes, a
linear classifier, cross-entropy. The first K−1 iterations update only the modules that have a δ.
`split='work'` cuts the layers so that the modules' work per iteration is even (`balanced_bounds`: a lower
module also pays the no-grad forward), which bounds the K-rank speed-up; 'depth' cuts them evenly by depth.
Deviations from the paper: the modules are DeepMLP layer ranges (the paper splits ResNets); the loss is the
hashing head's, not a classifier network's; the paper's learning-rate schedule is replaced by back-prop's
(`BackpropOptions`); history's `time` is training time alone (no evaluation) and `comm_time` is the time a
rank spent blocked in receives and waiting for its sends. Measured speed-ups: BENCHMARKS.md, "Parallel training".
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from vdsh.training.distributed import broadcast_, rank_and_world, rank_device, rank_value
from vdsh.training.trainers.base import Trainer
from vdsh.training.validation import Validation
from vdsh.training.trainers.backprop import BackpropOptions, classification_loss, close_epoch, make_optimizer, make_schedule
from vdsh.training.encoders.mlp import DeepMLP


@dataclass
class FeaturesReplayOptions(BackpropOptions):
    """Back-prop options plus the number of modules K (1: plain back-propagation)."""

    modules: int = 2
    split: str = "depth"  # 'depth': modules of near-equal depth; 'work': of near-equal work per iteration (`balanced_bounds`)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.modules < 1:
            raise ValueError(f"modules must be >= 1, got {self.modules}")
        if self.split not in ("depth", "work"):
            raise ValueError(f"split must be 'depth' or 'work', got {self.split!r}")


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

    def layers(self) -> list[nn.Module]:
        """This module's own layers (linear, and batch norm where the MLP has it)."""
        layers: list[nn.Module] = [self.mlp.linears[m] for m in range(self.start, self.stop)]
        if self.mlp.norms is not None:
            layers += [self.mlp.norms[m] for m in range(self.start, min(self.stop, self.mlp.depth - 1))]
        return layers

    def own_parameters(self) -> list[nn.Parameter]:
        """The parameters of this module's layers only (`parameters()` would list the whole DeepMLP's)."""
        return [p for layer in self.layers() for p in layer.parameters()]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for m in range(self.start, self.stop):
            h = self.mlp.linears[m](h) if m == self.mlp.depth - 1 else self.mlp.hidden(h, m)
        return h


class ReplayState:
    """What crosses iterations: each module's stored inputs and the δ each module received."""

    def __init__(self, modules: int) -> None:
        self.inputs = [deque(maxlen=modules - k) for k in range(modules)]  # module k keeps K−k inputs
        self.deltas: list[torch.Tensor | None] = [None] * modules  # δ for module k's output, from k+1


def top_backward(out: torch.Tensor, classifier: nn.Linear, y: torch.Tensor, loss_kind: str, quantisation: float) -> float:
    """The top module's loss on its output (tanh-relaxed codes, linear classifier), back-propagated; its value."""
    codes = torch.tanh(out)
    loss = classification_loss(classifier(codes).float(), y, loss_kind)
    if quantisation > 0:
        loss = loss + quantisation * (codes.float() - torch.sign(codes.float())).pow(2).sum(1).mean()
    loss.backward()
    return float(loss.detach())


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
                loss_value = top_backward(out, classifier, y, loss_kind, quantisation)
            else:
                out.backward(state.deltas[k])
            if k > 0:
                new_deltas[k - 1] = inp.grad.detach()
    if streams:
        for s in streams:
            torch.cuda.current_stream().wait_stream(s)
    state.deltas = new_deltas
    return loss_value


class Pipeline:
    """Module `rank` of K, one per rank: inputs arrive from the rank below and outputs go up (tag 1), deltas
    arrive from the rank above and go down (tag 2), by point-to-point messages; the same arithmetic as
    `replay_step`, but every rank runs its replay and backward pass while the others run theirs."""

    UP, DOWN = 1, 2

    def __init__(self, blocks: list[MlpModule], rank: int) -> None:
        self.block, self.rank, self.top = blocks[rank], rank, len(blocks) - 1
        self.blocks = blocks
        linears = self.block.mlp.linears
        self.in_width, self.out_width = linears[self.block.start].in_features, linears[self.block.stop - 1].out_features
        self.inputs: deque[torch.Tensor] = deque(maxlen=self.top - rank + 1)  # the last K−k inputs (k = rank + 1)
        self.iteration = 0
        self.pending: list[tuple[dist.Work, torch.Tensor]] = []
        self.comm_seconds = 0.0  # time this rank spent blocked in receives and in waiting for its sends

    def step(self, classifier: nn.Linear, x: torch.Tensor, y: torch.Tensor, loss_kind: str, quantisation: float,
             last: bool = False) -> float:
        """One iteration of this rank's module; the loss on the top rank (NaN elsewhere). `last`: send no delta down
        (nobody would receive it)."""
        self.iteration += 1
        self.wait_sends()
        h = x if self.rank == 0 else self.receive((len(x), self.in_width), self.rank - 1, self.UP)
        self.inputs.append(h)
        delta = None
        if self.rank < self.top:
            with torch.no_grad():
                self.send(self.block(h), self.rank + 1, self.UP)
            if self.iteration <= self.top - self.rank:
                return math.nan  # no delta has been sent up to here yet
            delta = self.receive((len(self.inputs[0]), self.out_width), self.rank + 1, self.DOWN)
        inp = self.inputs[0].detach().requires_grad_(self.rank > 0)
        out = self.block(inp)
        loss_value = math.nan
        if delta is None:
            loss_value = top_backward(out, classifier, y, loss_kind, quantisation)
        else:
            out.backward(delta)
        if self.rank > 0 and not last:
            self.send(inp.grad.detach(), self.rank - 1, self.DOWN)
        return loss_value

    def send(self, tensor: torch.Tensor, peer: int, tag: int) -> None:
        tensor = tensor.contiguous()
        self.pending.append((dist.isend(tensor, peer, tag=tag), tensor))

    def receive(self, shape: tuple[int, int], peer: int, tag: int) -> torch.Tensor:
        buffer = torch.empty(shape, device=self.block.mlp.linears[0].weight.device)
        start = time.perf_counter()
        dist.recv(buffer, peer, tag=tag)
        self.comm_seconds += time.perf_counter() - start
        return buffer

    def wait_sends(self) -> None:
        start = time.perf_counter()
        for work, _ in self.pending:
            work.wait()
        self.pending.clear()
        self.comm_seconds += time.perf_counter() - start

    def finish(self) -> None:
        self.wait_sends()

    def share_weights(self) -> None:
        """Every module's current weights, from the rank that trains it, onto every rank (to evaluate or save)."""
        for owner, block in enumerate(self.blocks):
            broadcast_([t for layer in block.layers() for t in layer.state_dict().values()], owner)


class _null_context:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def module_work(sizes: list[int], start: int, stop: int, top: bool) -> int:
    """Multiply-adds per sample of one module's iteration: 3 passes over its layers (forward, and the two backward
    products) at the top; 4 below (the no-grad forward that feeds the module above, then the replay's 3), less
    the input gradient of layer 0, which nobody needs."""
    flops = sum(sizes[m] * sizes[m + 1] for m in range(start, stop))
    return (3 if top else 4) * flops - (sizes[0] * sizes[1] if start == 0 else 0)


def balanced_bounds(sizes: list[int], modules: int) -> list[tuple[int, int]]:
    """[start, stop) layer ranges of K modules minimising the largest module's `module_work` (dynamic programming)."""
    depth = len(sizes) - 1
    if not 1 <= modules <= depth:
        raise ValueError(f"cannot cut {depth} layers into {modules} modules (need 1 <= K <= depth)")
    # best[k][s]: the least possible max work of modules k..K−1 covering layers s..depth−1, with its first cut.
    best: dict[tuple[int, int], tuple[int, int]] = {}
    for k in range(modules - 1, -1, -1):
        for s in range(k, depth - (modules - 1 - k)):
            if k == modules - 1:
                best[k, s] = (module_work(sizes, s, depth, True), depth)
                continue
            best[k, s] = min((max(module_work(sizes, s, e, False), best[k + 1, e][0]), e)
                             for e in range(s + 1, depth - (modules - 2 - k)))
    bounds, s = [], 0
    for k in range(modules):
        e = best[k, s][1]
        bounds.append((s, e))
        s = e
    return bounds


def blocks_of(encoder: DeepMLP, opt: FeaturesReplayOptions) -> list[MlpModule]:
    """The K modules of the encoder, cut as `opt.split` says."""
    sizes = [encoder.in_features] + [l.out_features for l in encoder.linears]
    cut = balanced_bounds(sizes, opt.modules) if opt.split == "work" else module_bounds(encoder.depth, opt.modules)
    return [MlpModule(encoder, a, b) for a, b in cut]


class FeaturesReplayTrainer(Trainer):
    """Trains a DeepMLP by features replay over K modules; `fit` -> (encoder, history), as `BackpropTrainer`.

    In one process the modules run one after another; when a torch.distributed group of K ranks is running
    (torchrun, or spawned workers), rank k holds module k and the modules run at the same time (`Pipeline`).
    """

    options_class = FeaturesReplayOptions

    def fit(self, encoder: DeepMLP, features: torch.Tensor, labels: torch.Tensor,
            validation: Validation | None = None) -> tuple[DeepMLP, list[dict]]:
        opt = self.options
        if not isinstance(encoder, DeepMLP):
            raise ValueError("FeaturesReplayTrainer cuts a DeepMLP into modules; got " + type(encoder).__name__)
        if len(features) != len(labels):
            raise ValueError(f"features and labels differ in length: {len(features)} vs {len(labels)}")
        blocks = blocks_of(encoder, opt)
        rank, world = rank_and_world()
        if world > 1 and world != len(blocks):
            raise ValueError(f"features replay runs one module per rank: {world} ranks for {len(blocks)} modules")
        # Same order of random draws as BackpropTrainer, so that K = 1 reproduces it exactly.
        torch.manual_seed(opt.seed)
        device = rank_device(opt.device)
        encoder.to(device).train()
        broadcast_([p.data for p in encoder.parameters()])  # every rank starts from rank 0's weights
        x, y = features.to(device).float(), labels.to(device).float()
        classifier = nn.Linear(encoder.bits, y.shape[1]).to(device)
        mine = blocks if world == 1 else [blocks[rank]]
        params = [p for b in mine for p in b.own_parameters()] + (list(classifier.parameters()) if rank == world - 1 else [])
        optimizer = make_optimizer(params, opt)
        schedule = make_schedule(optimizer, opt, math.ceil(len(x) / opt.batch_size))
        streams = [torch.cuda.Stream() for _ in blocks] if device.type == "cuda" and len(mine) > 1 else None
        state = ReplayState(len(blocks))
        pipe = Pipeline(blocks, rank) if world > 1 else None
        history: list[dict] = []
        elapsed = 0.0
        for epoch in range(1, opt.epochs + 1):
            total, seen, start = 0.0, 0, time.perf_counter()
            batches = torch.randperm(len(x), device=device).split(opt.batch_size)
            for b, idx in enumerate(batches):
                optimizer.zero_grad(set_to_none=True)
                if pipe is None:
                    loss = replay_step(blocks, classifier, state, x[idx], y[idx], opt.loss, opt.quantisation, streams)
                else:
                    last = epoch == opt.epochs and b == len(batches) - 1
                    loss = pipe.step(classifier, x[idx], y[idx], opt.loss, opt.quantisation, last)
                optimizer.step()
                schedule.step()
                total += loss * len(idx)
                seen += len(idx)
            if pipe is not None:
                total = rank_value(total, source=world - 1, device=device)  # the loss lives on the top rank
            elapsed += time.perf_counter() - start
            record = {"epoch": epoch, "sweep": epoch, "time": elapsed, "loss": total / seen,
                      "lr": optimizer.param_groups[0]["lr"], "modules": len(blocks)}
            if pipe is not None:
                record["comm_time"] = pipe.comm_seconds
                if evaluates(opt, epoch):
                    pipe.share_weights()
            history.append(close_epoch(record, encoder, x, y, validation, opt, self.progress))
        if pipe is not None:
            pipe.finish()
        return encoder.eval(), history


def evaluates(opt: FeaturesReplayOptions, epoch: int) -> bool:
    """Whether `close_epoch` scores this epoch (then every rank needs every module's weights)."""
    return bool(opt.eval_every and epoch % opt.eval_every == 0) or epoch == opt.epochs
