"""Alternating minimisation with closed-form weights (method of auxiliary coordinates, Carreira-Perpiñán & Wang 2014).

Every sample k carries the pre-activations of every layer as free variables, z_l^k (l = 1..L); with
φ = ReLU for hidden layers, φ(z_0) = x and the linear hashing layer on top, the relaxed problem is

    E(W, z) = Σ_k ℓ(z_L^k, y_k) + Σ_l μ_l ||z_l^k − W_l φ(z_{l−1}^k) − b_l||²  [+ α Σ_{l<L} ||φ(z_l^k)||₁]

with ℓ(z, y) = ||y − zC||² the squared loss of the shared code head (C: ridge classifier on the codes
sgn(z_L), refitted every sweep). It alternates two steps, each parallel over what it leaves free:

  W-step  every layer alone (parallel over layers), in closed form by ridge regression:
          [W_l, b_l] = (Σ_k z_l^k a_kᵀ)(Σ_k a_k a_kᵀ + (λ/μ_l) I)⁻¹,  a_k = [φ(z_{l−1}^k); 1].
          The two sums are `LayerStatistics`: exactly what a data-parallel all-reduce has to add.
  z-step  every sample alone (parallel over samples): odd layers, then even layers (each layer's
          local objective touches only its two neighbours), by damped Newton steps with the Hessian's
          diagonal (elementwise φ makes it one number per unit; ReLU's φ'' = 0 almost everywhere),
          backtracking per sample until the local objective decreases. The top z_L is quadratic: its
          Newton step is exact (one bits×bits system shared by all samples).

μ grows geometrically over sweeps (MAC's penalty path): as μ → ∞ the z's become the forward pass and
E the original loss. The stochastic variant draws fresh z's for each mini-batch from a forward pass,
runs the z-steps on it, and averages the batch's closed-form weights into the current ones:
[W, b] ← s[W, b] + (1 − s)[nW, nb].

The ℓ1 option (α > 0) penalises the hidden activations φ(z_l) (sparse codes at every layer); it keeps
the W-step closed form and adds α·φ'(z) to the z-gradient.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from vdsh.training.validation import Validation, evaluate_encoder
from vdsh.index.codes import sign_codes
from vdsh.training.code_head import LinearCodeHead, ridge_classifier
from vdsh.training.encoders.mlp import DeepMLP, check_plain_mlp_problem
from vdsh.training.stacked_mlp import affine, with_ones


@dataclass
class AltMinOptions:
    """Alternating-minimisation options; defaults measured on mnist-sample (tests/test_altmin.py)."""

    mu: float = 0.01  # μ_l of every layer at the first sweep: small, so the loss moves the z's
    mu_growth: float = 1.3  # μ multiplied by this after every sweep (the penalty path)
    ridge: float = 1.0  # λ of the W-step (on the sum scale: Σ_k a_k a_kᵀ + (λ/μ) I)
    classifier_ridge: float = 1.0  # λ of the code head's ridge regression
    quantisation: float = 0.0  # pull of z_L towards its codes sgn(z_L) in the top z-step
    l1: float = 0.0  # α: ℓ1 penalty on the hidden activations φ(z_l)
    newton_steps: int = 2  # damped Newton steps per z-step and layer
    damping: float = 1e-6  # Levenberg term added to the diagonal Hessian
    backtracking: int = 6  # step halvings tried per sample before the step is refused
    sweeps: int = 20
    minibatch_size: int | None = None  # None: full batch; else the stochastic variant
    averaging: float = 0.5  # s of the stochastic weight averaging
    device: str = "cpu"
    eval_every: int = 1
    eval_size: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mu <= 0 or self.mu_growth < 1 or self.ridge < 0 or self.l1 < 0 or self.quantisation < 0:
            raise ValueError("mu must be > 0, mu_growth >= 1, ridge, l1 and quantisation >= 0")
        if self.sweeps < 1 or self.newton_steps < 1 or not 0 <= self.averaging < 1:
            raise ValueError("sweeps and newton_steps must be >= 1, averaging in [0, 1)")


# ---------------------------------------------------------------- the W-step: per layer, closed form


@dataclass
class LayerStatistics:
    """Σ_k a_k a_kᵀ (gram, (in+1, in+1)) and Σ_k z_k a_kᵀ (cross, (out, in+1)) of one layer.

    Sums, not means: statistics of disjoint shards add (`+`, or all_reduce(SUM) across ranks).
    """

    gram: torch.Tensor
    cross: torch.Tensor

    def __add__(self, other: "LayerStatistics") -> "LayerStatistics":
        return LayerStatistics(self.gram + other.gram, self.cross + other.cross)


def layer_statistics(inputs: torch.Tensor, targets: torch.Tensor) -> LayerStatistics:
    """inputs φ(z_{l−1}) (N, in), targets z_l (N, out) -> the sums of the layer's normal equations."""
    a = with_ones(inputs)
    return LayerStatistics(a.T @ a, targets.T @ a)


def solve_layer(stats: LayerStatistics, ridge: float, mu: float) -> torch.Tensor:
    """[W | b] = cross (gram + (λ/μ) I)⁻¹, solved by Cholesky (the system is symmetric positive definite)."""
    system = stats.gram + (ridge / mu) * torch.eye(stats.gram.shape[0], dtype=stats.gram.dtype, device=stats.gram.device)
    if ridge == 0:
        return torch.linalg.solve(system, stats.cross.T).T  # may be only semi-definite: plain LU
    return torch.cholesky_solve(stats.cross.T, torch.linalg.cholesky(system)).T


# ---------------------------------------------------------------- the z-step: per sample, damped Newton


def hidden_local_objective(z: torch.Tensor, target: torch.Tensor, above: torch.Tensor, weight_above: torch.Tensor,
                           mu: float, mu_above: float, l1: float) -> torch.Tensor:
    """Per-sample E_l(z) = μ_l||z − t_l||² + μ_{l+1}||z_{l+1} − W_{l+1}φ(z) − b_{l+1}||² + α||φ(z)||₁ (N,)."""
    h = torch.relu(z)
    value = mu * (z - target).pow(2).sum(1) + mu_above * (above - affine(h, weight_above)).pow(2).sum(1)
    return value + l1 * h.sum(1) if l1 else value


def hidden_newton_step(z: torch.Tensor, target: torch.Tensor, above: torch.Tensor, weight_above: torch.Tensor,
                       mu: float, mu_above: float, l1: float, damping: float) -> torch.Tensor:
    """The undamped diagonal-Newton step −g / (diag H + δ) of `hidden_local_objective` at z, per sample and unit.

    g = 2μ_l(z − t) − 2μ_{l+1} φ'(z) ⊙ W_{l+1}ᵀ r + α φ'(z),  r = z_{l+1} − W_{l+1}φ(z) − b_{l+1};
    diag H = 2μ_l + 2μ_{l+1} φ'(z)² ⊙ diag(W_{l+1}ᵀ W_{l+1})  (ReLU: φ'' = 0 away from 0).
    """
    w = weight_above[:, :-1]
    slope = (z > 0).to(z.dtype)
    residual = above - affine(torch.relu(z), weight_above)
    grad = 2 * mu * (z - target) - 2 * mu_above * slope * (residual @ w) + l1 * slope
    hess = 2 * mu + 2 * mu_above * slope * w.pow(2).sum(0)
    return -grad / (hess + damping)


def damped(objective: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, step: torch.Tensor, halvings: int) -> torch.Tensor:
    """z + η·step with η = 1, ½, ¼, … chosen per sample: the first that lowers the objective, else 0."""
    best = objective(z)
    out = z.clone()
    pending = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
    eta = 1.0
    for _ in range(halvings + 1):
        trial = z + eta * step
        accept = pending & (objective(trial) < best)
        out[accept] = trial[accept]
        pending &= ~accept
        if not pending.any():
            break
        eta /= 2
    return out


def top_step(target: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor, mu: float, quantisation: float) -> torch.Tensor:
    """Exact minimiser of ||y − zC||² + μ_L||z − t_L||² + q||z − sgn(t_L)||²: z (CCᵀ + (μ + q) I) = yCᵀ + μt + q sgn(t).

    The objective is quadratic, so this is its (undamped) Newton step from any point.
    """
    system = classifier @ classifier.T + (mu + quantisation) * torch.eye(classifier.shape[0], dtype=classifier.dtype, device=classifier.device)
    rhs = labels @ classifier.T + mu * target
    if quantisation:
        rhs = rhs + quantisation * sign_codes(target, target.dtype)
    return torch.linalg.solve(system, rhs.T).T


# ---------------------------------------------------------------- the trainer


def weights_of(mlp: DeepMLP, device: torch.device) -> list[torch.Tensor]:
    """[W_l | b_l] of every layer, float32 on `device`."""
    return [torch.cat([l.weight, l.bias[:, None]], 1).detach().float().to(device) for l in mlp.linears]


def write_weights(mlp: DeepMLP, weights: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for linear, w in zip(mlp.linears, weights):
            linear.weight.copy_(w[:, :-1])
            linear.bias.copy_(w[:, -1])


def forward_preactivations(weights: list[torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    """z_1..z_L of a plain forward pass: the z's at which every constraint holds."""
    zs, h = [], x
    for w in weights:
        zs.append(affine(h, w))
        h = torch.relu(zs[-1])
    return zs


def layer_inputs(x: torch.Tensor, zs: list[torch.Tensor]) -> list[torch.Tensor]:
    """φ(z_{l−1}) for l = 1..L (φ(z_0) = x)."""
    return [x] + [torch.relu(z) for z in zs[:-1]]


class AltMinTrainer:
    """Trains a plain DeepMLP by alternating W-steps (closed form) and z-steps (damped Newton); `fit` -> (encoder, history)."""

    def __init__(self, options: AltMinOptions | None = None, progress: Callable[[dict], None] | None = None) -> None:
        self.options = options or AltMinOptions()
        self.progress = progress

    def fit(self, encoder: DeepMLP, features: torch.Tensor, labels: torch.Tensor,
            validation: Validation | None = None) -> tuple[DeepMLP, list[dict]]:
        check_plain_mlp_problem(encoder, features, labels, "AltMinTrainer")
        opt = self.options
        device = torch.device(opt.device)
        torch.manual_seed(opt.seed)
        encoder.to(device)
        x, y = features.to(device).float(), labels.to(device).float()
        weights = weights_of(encoder, device)
        head = LinearCodeHead(opt.classifier_ridge)
        head.fit(forward_preactivations(weights, x)[-1], y)
        stochastic = opt.minibatch_size is not None and opt.minibatch_size < len(x)
        zs = None if stochastic else forward_preactivations(weights, x)
        history: list[dict] = []
        mu, start = opt.mu, time.perf_counter()
        for sweep in range(1, opt.sweeps + 1):
            if stochastic:
                weights, terms = self.stochastic_sweep(weights, x, y, head, mu)
            else:
                weights, terms = self.full_batch_sweep(weights, zs, x, y, head, mu)
            record = {"sweep": sweep, "time": time.perf_counter() - start, "mu": mu, **terms}
            if (opt.eval_every and sweep % opt.eval_every == 0) or sweep == opt.sweeps:
                write_weights(encoder, weights)
                record.update(evaluate_encoder(encoder, x, y, validation, opt.eval_size, opt.seed))
            history.append(record)
            if self.progress:
                self.progress(record)
            mu *= opt.mu_growth
        write_weights(encoder, weights)
        return encoder, history

    def w_step(self, x: torch.Tensor, zs: list[torch.Tensor], mu: float) -> list[torch.Tensor]:
        """Every layer's closed-form weights from its statistics (independent across layers)."""
        return [solve_layer(layer_statistics(h, z), self.options.ridge, mu) for h, z in zip(layer_inputs(x, zs), zs)]

    def z_step(self, weights: list[torch.Tensor], zs: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
               classifier: torch.Tensor, mu: float) -> None:
        """Odd hidden layers, then even ones (conditionally independent given their neighbours), then the top."""
        opt = self.options
        depth = len(weights)
        for parity in (0, 1):
            for l in range(parity, depth - 1, 2):
                below = x if l == 0 else torch.relu(zs[l - 1])
                target = affine(below, weights[l])
                objective = lambda z: hidden_local_objective(z, target, zs[l + 1], weights[l + 1], mu, mu, opt.l1)  # noqa: E731
                for _ in range(opt.newton_steps):
                    step = hidden_newton_step(zs[l], target, zs[l + 1], weights[l + 1], mu, mu, opt.l1, opt.damping)
                    zs[l] = damped(objective, zs[l], step, opt.backtracking)
        zs[-1] = top_step(affine(torch.relu(zs[-2]), weights[-1]), y, classifier, mu, opt.quantisation)

    def full_batch_sweep(self, weights: list[torch.Tensor], zs: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                         head: LinearCodeHead, mu: float) -> tuple[list[torch.Tensor], dict]:
        weights = self.w_step(x, zs, mu)
        head.fit(zs[-1], y)
        self.z_step(weights, zs, x, y, head.classifier, mu)
        return weights, objective_terms(weights, zs, x, y, head.classifier, mu, self.options.l1)

    def stochastic_sweep(self, weights: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor, head: LinearCodeHead,
                         mu: float) -> tuple[list[torch.Tensor], dict]:
        """One pass over shuffled mini-batches: fresh z's, z-steps, batch W-step averaged into the weights."""
        opt = self.options
        s = opt.averaging
        order = torch.randperm(len(x), device=x.device)
        totals: dict[str, float | list[float]] = {}  # batch means of every term, per-layer lists elementwise
        batches = 0
        for begin in range(0, len(x), opt.minibatch_size):
            idx = order[begin : begin + opt.minibatch_size]
            xb, yb = x[idx], y[idx]
            zs = forward_preactivations(weights, xb)
            self.z_step(weights, zs, xb, yb, head.classifier, mu)
            batch_weights = self.w_step(xb, zs, mu)
            weights = [s * w + (1 - s) * nw for w, nw in zip(weights, batch_weights)]
            batch_classifier = ridge_classifier(sign_codes(zs[-1], zs[-1].dtype), yb, opt.classifier_ridge)
            head.classifier = s * head.classifier + (1 - s) * batch_classifier
            for k, v in objective_terms(weights, zs, xb, yb, head.classifier, mu, opt.l1).items():
                totals[k] = [t + u for t, u in zip(totals[k], v)] if isinstance(v, list) and k in totals else (
                    totals.get(k, 0.0) + v if not isinstance(v, list) else v)
            batches += 1
        return weights, {k: [t / batches for t in v] if isinstance(v, list) else v / batches for k, v in totals.items()}


@torch.no_grad()
def objective_terms(weights: list[torch.Tensor], zs: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                    classifier: torch.Tensor, mu: float, l1: float) -> dict:
    """Per-sample means of E's terms and the relative constraint residual of every layer."""
    inputs = layer_inputs(x, zs)
    gaps = [z - affine(h, w) for z, h, w in zip(zs, inputs, weights)]
    residuals = [float(g.norm() / z.norm().clamp_min(1e-12)) for g, z in zip(gaps, zs)]
    n = len(x)
    return {
        "loss": float((y - zs[-1] @ classifier).pow(2).sum() / n),
        "code_loss": float((y - sign_codes(zs[-1], zs[-1].dtype) @ classifier).pow(2).sum() / n),
        "penalty": float(mu * sum(g.pow(2).sum() for g in gaps) / n),
        "l1_penalty": float(l1 * sum(h.sum() for h in inputs[1:]) / n),
        "residual_max": max(residuals),
        "residual_mean": sum(residuals) / len(residuals),
        "residuals": residuals,
    }
