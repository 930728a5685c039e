"""ProxProp for plain deep ReLU MLPs: per-layer targets from one backward pass, closed-form proximal weight solves.

What it is (Frerix, Möllenhoff, Moeller & Cremers, "Proximal Backpropagation", ICLR 2018, in closed form for
every layer, with hashing targets). Per mini-batch:
  1. a plain forward pass gives every layer's pre-activation a_m and output z_m = relu(a_m);
  2. the top's target codes B (`code_head.target_codes`: a fixed random codeword per class, 'centres', by
     default, or SDH's discrete B-step against the classifier W, 'learned'); a_M moves the fraction `step` of
     the way to B;
  3. one top→bottom pass carries that change down: δz_{m−1} = W_mᵀ δa_m, δa_{m−1} = 1[a_{m−1} > 0] ⊙ δz_{m−1},
     i.e. exactly back-prop's gradient direction of ½||a_M − B||² (a test checks it against autograd); each
     hidden layer's change is scaled to step·||a_m|| (every layer is asked for the same relative change);
  4. every W_m, independently and at once (one batched Cholesky), is the proximal ridge regression of its
     target a_m + δa_m on the forward input it sees: W = argmin ||T − W[z 1]||² + λ||W||² + ρ||W − W_prev||².
The step decays on a cosine over the run (scaled by √(8/M) for M layers); hidden layers start at the
identity (`init`), which is what makes depth trainable here (back-prop from the same start does as well).
It is not ADMM: no auxiliary variable outlives its mini-batch and there are no multipliers (VDSH's ADMM is
`vdsh.training.trainers.admm`). Deviations from ProxProp: targets are discrete codes rather than a loss's gradient
step, per-layer steps are relative, and the weight step is an exact ridge solve instead of CG iterations.
Data-parallel over torch.distributed: the weight statistics and classifier sums are all-reduced, so ranks
stay identical. Measured figures: BENCHMARKS.md, "Training".
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from vdsh.training.trainers.base import Trainer
from vdsh.index.codes import sign_codes
from vdsh.training.code_head import CODE_TARGETS, class_codewords, ridge_classifier, squared_loss, target_codes
from vdsh.training.distributed import global_mean, global_min, global_sum, rank_zero_value
from vdsh.training.encoders.mlp import DeepMLP
from vdsh.training.stacked_mlp import LayerWeights, affine, start_plain_mlp, with_ones
from vdsh.training.validation import Validation, evaluate_encoder


@dataclass
class ProxPropOptions:
    """ProxProp options. Defaults come from screens on mnist-5k and cifar10-5k GIST (48 bits, width 256, depths
    8 and 32; step, rho, ridge, mini-batch size, nu, stat_decay, classifier decay, init); within seed noise of
    these except where a comment says otherwise. Not a converged tuning."""

    init: str = "identity"  # hidden layers start as 'identity' (W = I, b = 0) or keep the encoder's 'msra' init
    step: float = 0.05  # every layer's target moves by step·√(8/M)·||a_m|| per mini-batch; 0.1 rose again late in 30-sweep runs
    step_schedule: str = "cosine"  # 'cosine' decay of step over the run, or 'constant'
    rho: float = 1.0  # proximal pull of W towards its previous value
    # λ of the weight ridge regression (per-sample scale). 0: ridge shrinks every layer a little at every mini-batch
    # while the targets' pull decays with the step, and the shrinkage compounds over depth (the last sweeps collapsed).
    ridge: float = 0.0
    classifier_ridge: float = 1.0  # λ of the classifier ridge regression on the codes
    codes: str = "centres"  # top targets B: 'centres' (a fixed random codeword per class) or 'learned' (SDH's B-step)
    nu: float = 0.1  # ν: closeness of the discrete codes B to the forward-pass outputs in the learned B-step
    bit_sweeps: int = 2  # DCC sweeps over the bits in the B-step
    sweeps: int = 15
    keep_best: bool = True  # return the weights of the evaluation with the best validation (else train) mAP
    patience: int = 0  # stop after this many evaluations without improvement (0: never)
    minibatch_size: int | None = 100  # None: one batch of every sample
    stat_decay: float = 0.0  # running-mean decay of the weight statistics across mini-batches (0: this batch's only)
    classifier_decay: float = 0.9  # running-mean decay of the classifier across mini-batches
    device: str = "cpu"
    dtype: str = "float32"  # storage/GEMM dtype of the forward pass: 'float32' or 'bfloat16'; solves stay float32
    eval_every: int = 1  # sweeps between mAP evaluations (0: only at the end)
    eval_size: int = 1000  # training samples scored as queries against the training set
    seed: int = 0

    def __post_init__(self) -> None:
        if self.init not in ("identity", "msra"):
            raise ValueError(f"init must be 'identity' or 'msra', got {self.init!r}")
        if self.step_schedule not in ("cosine", "constant") or not 0 < self.step <= 1:
            raise ValueError(f"step must be in (0, 1] and step_schedule 'cosine' or 'constant', got {self.step}, {self.step_schedule!r}")
        if self.codes not in CODE_TARGETS:
            raise ValueError(f"codes must be one of {CODE_TARGETS}, got {self.codes!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if min(self.rho, self.ridge, self.nu) < 0 or self.sweeps < 1 or self.bit_sweeps < 0 or self.patience < 0:
            raise ValueError("rho, ridge and nu must be >= 0, sweeps >= 1, bit_sweeps and patience >= 0")
        if self.rho + self.ridge <= 0:
            raise ValueError("rho + ridge must be > 0: a mini-batch's Gram matrix is singular without them")


@dataclass
class Forward:
    """A mini-batch's forward pass: hidden pre-activations a and outputs z stacked (M−1, N, w), the top a_M (N, bits)."""

    a: torch.Tensor
    z: torch.Tensor
    a_top: torch.Tensor


@dataclass
class Targets:
    """What each layer's weight solve fits: hidden pre-activation targets (M−1, N, w) on the forward inputs z, and the top's."""

    a: torch.Tensor
    z: torch.Tensor
    a_top: torch.Tensor


def forward_pass(weights: LayerWeights, x: torch.Tensor, dtype: torch.dtype) -> Forward:
    a_list, z_list = [], []
    z = x
    for m in range(1 + len(weights.hidden)):
        w = weights.first if m == 0 else weights.hidden[m - 1]
        a = affine(z, w)
        z = torch.relu(a)
        a_list.append(a)
        z_list.append(z)
    return Forward(torch.stack(a_list).to(dtype), torch.stack(z_list).to(dtype), affine(z, weights.top).to(dtype))


def layer_outputs(weights: LayerWeights, x: torch.Tensor, targets: Targets) -> tuple[torch.Tensor, torch.Tensor]:
    """W_m z_{m−1} + b_m for every hidden layer (M−1, N, w) and for the top (N, bits), on the forward inputs."""
    first = affine(x, weights.first)[None]
    rest = affine(targets.z[:-1], weights.hidden) if len(weights.hidden) else first[:0]
    return torch.cat([first, rest]), affine(targets.z[-1], weights.top)


@dataclass
class WeightStatistics:
    """Per-sample means of the ridge normal equations: Gram [z 1]ᵀ[z 1] and right side [z 1]ᵀ T.

    gram_first (D+1, D+1), rhs_first (D+1, w); gram_rest (M−1, w+1, w+1) for W_2..W_M;
    rhs_hidden (M−2, w+1, w); rhs_top (w+1, bits).
    """

    gram_first: torch.Tensor
    rhs_first: torch.Tensor
    gram_rest: torch.Tensor
    rhs_hidden: torch.Tensor
    rhs_top: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        return [self.gram_first, self.rhs_first, self.gram_rest, self.rhs_hidden, self.rhs_top]

    def blend(self, other: "WeightStatistics", decay: float) -> "WeightStatistics":
        """decay·self + (1 − decay)·other: a running mean across mini-batches."""
        return WeightStatistics(*(decay * s + (1 - decay) * o for s, o in zip(self.tensors(), other.tensors())))


def weight_statistics(x: torch.Tensor, targets: Targets) -> WeightStatistics:
    """Normal-equation statistics of every layer: layer m reads only its input z_{m−1} and its target."""
    n = x.shape[0]
    x1 = with_ones(x.float())
    z1 = with_ones(targets.z.float())  # (M−1, N, w+1): inputs of W_2..W_M
    target = targets.a.float()
    return WeightStatistics(
        gram_first=x1.T @ x1 / n,
        rhs_first=x1.T @ target[0] / n,
        gram_rest=torch.bmm(z1.transpose(1, 2), z1) / n,
        rhs_hidden=torch.bmm(z1[:-1].transpose(1, 2), target[1:]) / n,
        rhs_top=z1[-1].T @ targets.a_top.float() / n,
    )


def solve_weights(stats: WeightStatistics, previous: LayerWeights, ridge: float, rho: float) -> LayerWeights:
    """All layers' ridge regressions with proximal term, at once.

    W_mᵀ = (G_m + (λ + ρ)I)⁻¹ (R_m + ρ W_m^prevᵀ); one batched Cholesky factorisation for W_2..W_M.
    """

    def regularised(gram: torch.Tensor) -> torch.Tensor:
        return gram + (ridge + rho) * torch.eye(gram.shape[-1], device=gram.device)

    first = torch.linalg.solve(regularised(stats.gram_first), stats.rhs_first + rho * previous.first.T).T
    chol = torch.linalg.cholesky(regularised(stats.gram_rest))  # (M−1, w+1, w+1), batched over layers
    hidden = torch.cholesky_solve(stats.rhs_hidden + rho * previous.hidden.transpose(1, 2), chol[:-1]).transpose(1, 2)
    top = torch.cholesky_solve(stats.rhs_top + rho * previous.top.T, chol[-1]).T
    return LayerWeights(first.contiguous(), hidden.contiguous(), top.contiguous())


def backward_targets(weights: LayerWeights, forward: Forward, codes: torch.Tensor, step: float) -> Targets:
    """Every layer's pre-activation target from one top→bottom pass in which each step reads only its neighbour.

    Top: a_M moves the fraction `step` of the way to its codes. Below, δz_{m−1} = W_mᵀ δa_m and
    δa_{m−1} = 1[a_{m−1} > 0] ⊙ δz_{m−1} (a unit that is off stays off); each hidden δa_m is then scaled to
    step·||a_m||, so that the deep layers are not starved by the attenuation of the product of Jacobians.
    """
    a = forward.a.float()
    top_delta = step * (codes.float() - forward.a_top.float())
    above = [*weights.hidden.unbind(0), weights.top]  # W_{m+1}: the layer reading hidden layer m's output
    delta, directions = top_delta, []
    for m in range(len(a) - 1, -1, -1):
        delta = (delta @ above[m][:, :-1]) * (a[m] > 0)
        delta = delta / delta.norm().clamp_min(1e-30)  # only the direction travels on: no under- or overflow at depth
        directions.append(delta)
    unit = torch.stack(directions[::-1])
    targets = a + step * a.norm(dim=(1, 2))[:, None, None] * unit
    dtype = forward.a.dtype
    return Targets(targets.to(dtype), forward.z, (forward.a_top.float() + top_delta).to(dtype))


def target_residuals(weights: LayerWeights, x: torch.Tensor, targets: Targets) -> torch.Tensor:
    """Per layer, ||target − (W z + b)|| / ||target|| after the weight step: how far each layer is from its target."""
    hidden, top = layer_outputs(weights, x, targets)
    hidden_res = (targets.a.float() - hidden.float()).norm(dim=(1, 2)) / targets.a.float().norm(dim=(1, 2)).clamp_min(1e-12)
    top_res = (targets.a_top.float() - top.float()).norm() / targets.a_top.float().norm().clamp_min(1e-12)
    return torch.cat([hidden_res, top_res[None]])


class ProxPropTrainer(Trainer):
    """Trains a plain DeepMLP by ProxProp; `fit` returns the encoder (weights for a plain forward pass) and its history."""

    options_class = ProxPropOptions
    takes_augmentation = True  # applied afresh to each mini-batch

    def fit(self, encoder: DeepMLP, features: torch.Tensor, labels: torch.Tensor, validation: Validation | None = None) -> tuple[DeepMLP, list[dict]]:
        opt = self.options
        device = torch.device(opt.device)
        x, y, weights = start_plain_mlp(encoder, features, labels, "ProxPropTrainer", device, opt.seed, opt.init, self.dtype)
        size = opt.minibatch_size or len(x)
        batches = global_min(-(-len(x) // size), device)  # ranks take the same number of collective steps
        state: dict = {"stats": None, "classifier": None, "step": 0, "steps": opt.sweeps * batches, "batches": batches,
                       "depth_scale": math.sqrt(8 / encoder.depth)}
        history: list[dict] = []
        start = time.perf_counter()
        best: tuple[float, LayerWeights | None] = (-1.0, None)
        since_best, best_sweep = 0, 0
        for sweep in range(1, opt.sweeps + 1):
            weights, terms = self.sweep(weights, x, y, state)
            record = {"sweep": sweep, "time": time.perf_counter() - start, **terms}
            if (opt.eval_every and sweep % opt.eval_every == 0) or sweep == opt.sweeps:
                weights.write_to(encoder)
                record.update(evaluate_encoder(encoder, x, y, validation, opt.eval_size, opt.seed))
                score = float(rank_zero_value(record.get("val_map", record["train_map"]), device))  # ranks keep the same sweep
                if score > best[0]:
                    best, since_best, best_sweep = (score, weights.clone()), 0, sweep
                else:
                    since_best += 1
                record["best_sweep"] = best_sweep
            self.report(history, record)
            if opt.patience and since_best >= opt.patience:
                break
        if opt.keep_best and best[1] is not None:
            weights = best[1]
        weights.write_to(encoder)
        return encoder, history

    def sweep(self, weights: LayerWeights, x: torch.Tensor, y: torch.Tensor, state: dict) -> tuple[LayerWeights, dict]:
        """One pass over shuffled mini-batches: forward, codes, backward targets, all weights at once."""
        opt = self.options
        totals = {"loss": 0.0, "residual_max": 0.0, "residual_mean": 0.0, "step": 0.0}
        residuals = torch.zeros(0)
        batches = 0
        for idx in torch.randperm(len(x), device=x.device).split(opt.minibatch_size or len(x))[: state["batches"]]:
            xb, yb = self.batch(x, idx), y[idx]
            forward = forward_pass(weights, xb, self.dtype)
            codes = self.minibatch_codes(forward.a_top.float(), yb, state)
            step = self.step_size(state)
            targets = backward_targets(weights, forward, codes, step)
            stats = WeightStatistics(*global_mean(weight_statistics(xb, targets).tensors(), len(xb)))
            state["stats"] = stats if state["stats"] is None or opt.stat_decay == 0 else state["stats"].blend(stats, opt.stat_decay)
            weights = solve_weights(state["stats"], weights, opt.ridge, opt.rho)
            residuals = target_residuals(weights, xb, targets)
            totals["loss"] += float(squared_loss(sign_codes(forward.a_top, torch.float32), yb, state["classifier"]))
            totals["residual_max"] += float(residuals.max())
            totals["residual_mean"] += float(residuals.mean())
            totals["step"] += step
            batches += 1
        return weights, {**{k: v / batches for k, v in totals.items()}, "residuals": residuals.tolist()}

    def batch(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The mini-batch's input, augmented afresh when an augmentation is set."""
        return self.augment(x[idx]) if self.augment is not None else x[idx]

    def step_size(self, state: dict) -> float:
        """The relative target step of this mini-batch: constant, or cosine-decayed over the whole run.

        Scaled by √(8/M): M layers each changing by a relative step compose to about √M times the change of
        one (independent directions), so the network as a whole moves alike at every depth.
        """
        opt = self.options
        fraction = min(state["step"] / max(state["steps"], 1), 1.0)
        state["step"] += 1
        step = opt.step * state["depth_scale"]
        return step if opt.step_schedule == "constant" else step * 0.5 * (1 + math.cos(math.pi * fraction))

    def minibatch_codes(self, forward_top: torch.Tensor, y: torch.Tensor, state: dict) -> torch.Tensor:
        """The B-step on a mini-batch; the classifier is refitted on its codes and blended, so over a sweep it sees all."""
        opt = self.options
        if state["classifier"] is None:
            start = class_codewords(y, forward_top.shape[1], opt.seed)
            state["classifier"] = ridge_classifier(start, y, opt.classifier_ridge, reduce=global_sum)
        codes = target_codes(opt.codes, forward_top, y, state["classifier"], opt.nu, opt.bit_sweeps, opt.seed)
        new_classifier = ridge_classifier(codes, y, opt.classifier_ridge, reduce=global_sum)
        state["classifier"] = opt.classifier_decay * state["classifier"] + (1 - opt.classifier_decay) * new_classifier
        return codes
