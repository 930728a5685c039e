"""Alternating minimisation with closed-form weights (method of auxiliary coordinates, Carreira-Perpiñán & Wang
2014, as Lu's slides present it: ridge W-update, damped-Newton z-update, stochastic variant with averaging).

Every sample k carries the pre-activations of every layer as free variables, z_l^k (l = 1..L); with
φ = ReLU for hidden layers, φ(z_0) = x and the linear hashing layer on top, the relaxed problem is

    E(W, z) = Σ_k ℓ(z_L^k, y_k) + Σ_l μ_l ρ(z_l^k − W_l φ(z_{l−1}^k) − b_l)  [+ α Σ_{l<L} ||φ(z_l^k)||₁]

with ℓ(z, y) = ||y − zC||² the squared loss of the shared code head (C: ridge classifier on the codes
sgn(z_L), refitted every sweep) and ρ(r) = ||r||² (`residual='squared'`) or ||r|| (`residual='l1'`: the
slides' ℓ1-residual relaxation, the ℓ1 norm over samples of the residuals; it lets a few samples break a
constraint by much rather than all by a little). It alternates two steps, each parallel over what it leaves free:

  W-step  every layer alone (parallel over layers), in closed form by ridge regression:
          [W_l, b_l] = (Σ_k z_l^k a_kᵀ)(Σ_k a_k a_kᵀ + (λ/μ_l) I)⁻¹,  a_k = [φ(z_{l−1}^k); 1].
          The two sums are `LayerStatistics`: exactly what a data-parallel all-reduce has to add.
  z-step  every sample alone (parallel over samples): all even hidden layers of all samples as one batched
          step (layers stacked; the last hidden one, whose upper weight has another shape, in a call of its own),
          then all odd ones (each layer's local objective touches only its two neighbours), by damped
          Newton steps with the Hessian's diagonal (elementwise φ makes it one number per unit; ReLU's
          φ'' = 0 almost everywhere), backtracking per sample until the local objective decreases. The top
          z_L is quadratic: its Newton step is exact (one bits×bits system shared by all samples).
With ρ = ||·|| every step minimises the quadratic majoriser at the current point, μ||r|| ≤ μ||r||²/(2||r₀||)
+ μ||r₀||/2 (one weight per sample and layer, `constraint_penalties`): weighted ridge W-steps, per-sample μ
in the z-steps, so each step still lowers E.

μ grows geometrically over sweeps (MAC's penalty path): as μ → ∞ the z's become the forward pass and
E the original loss. The stochastic variant draws fresh z's for each mini-batch from a forward pass,
runs the z-steps on it, and averages the batch's closed-form weights into the current ones:
[W, b] ← s[W, b] + (1 − s)[nW, nb]. Under torch.distributed the samples are split across ranks and the
W-step's and classifier's sums all-reduced (`AltMinTrainer`): the same weights as one process.

Deviations from the paper and the slides:
- the loss is the code head's squared loss with a ridge classifier refitted per sweep, not a network output;
- the ℓ1 relaxation is smoothed below ||r_k|| = ε (`residual_floor`), so that a z at the forward pass (r = 0)
  can move; its minimisation by majorisation is ours (the slides give the objective only);
- the α option penalises activations φ(z_l) (sparse codes at every layer), a different thing from ρ = ℓ1;
- the z-step takes `newton_steps` damped diagonal-Newton steps, not an exact minimisation.
Measured figures: BENCHMARKS.md ("Methods" sections).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from vdsh.index.codes import sign_codes
from vdsh.training.code_head import ridge_classifier
from vdsh.training.distributed import broadcast_, global_sum, rank_and_world, rank_device
from vdsh.training.encoders.mlp import DeepMLP, check_plain_mlp_problem
from vdsh.training.stacked_mlp import affine, with_ones
from vdsh.training.trainers.base import Trainer
from vdsh.training.validation import Validation, evaluate_encoder

Penalty = float | torch.Tensor  # μ: one number, or one per sample (N, 1) under the ℓ1 relaxation

@dataclass
class AltMinOptions:
    """Alternating-minimisation options; defaults measured on mnist-sample (tests/test_altmin.py)."""

    mu: float = 0.01  # μ_l of every layer at the first sweep: small, so the loss moves the z's
    mu_growth: float = 1.3  # μ multiplied by this after every sweep (the penalty path)
    ridge: float = 1.0  # λ of the W-step (on the sum scale: Σ_k a_k a_kᵀ + (λ/μ) I)
    classifier_ridge: float = 1.0  # λ of the code head's ridge regression
    quantisation: float = 0.0  # pull of z_L towards its codes sgn(z_L) in the top z-step
    l1: float = 0.0  # α: ℓ1 penalty on the hidden activations φ(z_l)
    residual: str = "squared"  # constraint penalty: 'squared' μ||r||², or 'l1' μ Σ_k ||r_k|| (the slides' ℓ1-residual relaxation)
    residual_floor: float = 0.1  # ε: 'l1' is smoothed below ||r_k|| = ε (its majoriser's weight is capped at μ/2ε)
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
        if self.residual not in ("squared", "l1") or self.residual_floor <= 0:
            raise ValueError(f"residual must be 'squared' or 'l1' and residual_floor > 0, got {self.residual!r}, {self.residual_floor}")


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


def layer_statistics(inputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None) -> LayerStatistics:
    """inputs φ(z_{l−1}) (N, in), targets z_l (N, out) -> the sums of the layer's normal equations; with
    per-sample `weights` (N, 1) those of the weighted least squares (Σ_k ω_k a_k a_kᵀ, Σ_k ω_k z_k a_kᵀ)."""
    a = with_ones(inputs)
    weighted = a if weights is None else a * weights
    return LayerStatistics(a.T @ weighted, targets.T @ weighted)


def solve_layer(stats: LayerStatistics, ridge: float, mu: float) -> torch.Tensor:
    """[W | b] = cross (gram + (λ/μ) I)⁻¹, solved by Cholesky (the system is symmetric positive definite)."""
    system = stats.gram + (ridge / mu) * torch.eye(stats.gram.shape[0], dtype=stats.gram.dtype, device=stats.gram.device)
    if ridge == 0:
        return torch.linalg.solve(system, stats.cross.T).T  # may be only semi-definite: plain LU
    return torch.cholesky_solve(stats.cross.T, torch.linalg.cholesky(system)).T


# ---------------------------------------------------------------- the z-step: per sample, damped Newton


def hidden_local_objective(z: torch.Tensor, target: torch.Tensor, above: torch.Tensor, weight_above: torch.Tensor,
                           mu: Penalty, mu_above: Penalty, l1: float) -> torch.Tensor:
    """Per-sample E_l(z) = μ_l||z − t_l||² + μ_{l+1}||z_{l+1} − W_{l+1}φ(z) − b_{l+1}||² + α||φ(z)||₁ (N,).

    Batched over layers when the tensors are 3-D ((layers, N, units) -> (layers, N)); μ may be a number
    or per sample ((N, 1), or (layers, N, 1)): the weights of the ℓ1 relaxation's majoriser.
    """
    h = torch.relu(z)
    value = (mu * (z - target).pow(2)).sum(-1) + (mu_above * (above - affine(h, weight_above)).pow(2)).sum(-1)
    return value + l1 * h.sum(-1) if l1 else value


def hidden_newton_step(z: torch.Tensor, target: torch.Tensor, above: torch.Tensor, weight_above: torch.Tensor,
                       mu: Penalty, mu_above: Penalty, l1: float, damping: float) -> torch.Tensor:
    """The undamped diagonal-Newton step −g / (diag H + δ) of `hidden_local_objective` at z, per sample and unit.

    g = 2μ_l(z − t) − 2μ_{l+1} φ'(z) ⊙ W_{l+1}ᵀ r + α φ'(z),  r = z_{l+1} − W_{l+1}φ(z) − b_{l+1};
    diag H = 2μ_l + 2μ_{l+1} φ'(z)² ⊙ diag(W_{l+1}ᵀ W_{l+1})  (ReLU: φ'' = 0 away from 0).
    """
    w = weight_above[..., :-1]
    slope = (z > 0).to(z.dtype)
    residual = above - affine(torch.relu(z), weight_above)
    grad = 2 * mu * (z - target) - 2 * mu_above * slope * (residual @ w) + l1 * slope
    hess = 2 * mu + 2 * mu_above * slope * w.pow(2).sum(-2).unsqueeze(-2)
    return -grad / (hess + damping)


def damped(objective: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, step: torch.Tensor, halvings: int) -> torch.Tensor:
    """z + η·step with η = 1, ½, ¼, … chosen per sample (and layer): the first that lowers the objective, else 0."""
    best = objective(z)
    out = z.clone()
    pending = torch.ones(z.shape[:-1], dtype=torch.bool, device=z.device)
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


def top_step(target: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor, mu: Penalty, quantisation: float) -> torch.Tensor:
    """Exact minimiser of ||y − zC||² + μ_L||z − t_L||² + q||z − sgn(t_L)||²: z (CCᵀ + (μ + q) I) = yCᵀ + μt + q sgn(t).

    The objective is quadratic, so this is its (undamped) Newton step from any point. A per-sample μ (N, 1)
    gives every sample its own system, solved at once in CCᵀ's eigenbasis.
    """
    rhs = labels @ classifier.T + mu * target
    if quantisation:
        rhs = rhs + quantisation * sign_codes(target, target.dtype)
    gram = classifier @ classifier.T
    if isinstance(mu, torch.Tensor):
        values, vectors = torch.linalg.eigh(gram)
        return ((rhs @ vectors) / (values + mu + quantisation)) @ vectors.T
    system = gram + (mu + quantisation) * torch.eye(classifier.shape[0], dtype=classifier.dtype, device=classifier.device)
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


def constraint_penalties(weights: list[torch.Tensor], zs: list[torch.Tensor], x: torch.Tensor, mu: float,
                         opt: AltMinOptions) -> list[Penalty]:
    """Every layer's μ: the number μ (squared residuals), or under the ℓ1 relaxation the weights of its majoriser
    at the current point, μ/(2·max(||r_k||, ε)) per sample (N, 1), since μ||r|| ≤ μ||r||²/(2||r₀||) + μ||r₀||/2."""
    if opt.residual == "squared":
        return [mu] * len(weights)
    return [mu / (2 * (z - affine(h, w)).norm(dim=1, keepdim=True).clamp_min(opt.residual_floor))
            for z, h, w in zip(zs, layer_inputs(x, zs), weights)]


def same_shape_groups(layers: range, zs: list[torch.Tensor], weights: list[torch.Tensor]) -> list[list[int]]:
    """Hidden layers whose z-steps can be stacked into one batched step (same z and upper-weight shapes)."""
    groups: dict[tuple, list[int]] = {}
    for l in layers:
        groups.setdefault((tuple(zs[l].shape), tuple(weights[l + 1].shape)), []).append(l)
    return list(groups.values())


class AltMinTrainer(Trainer):
    """Trains a plain DeepMLP by alternating W-steps (closed form) and z-steps (damped Newton); `fit` -> (encoder, history).

    Under torch.distributed every rank is given the whole training set and works on its strided share of the
    samples (of every mini-batch, in the stochastic variant); the W-steps' and the classifier's sums are
    all-reduced, so all ranks hold the same weights, those of the one-process run.
    """

    options_class = AltMinOptions

    def fit(self, encoder: DeepMLP, features: torch.Tensor, labels: torch.Tensor,
            validation: Validation | None = None) -> tuple[DeepMLP, list[dict]]:
        check_plain_mlp_problem(encoder, features, labels, "AltMinTrainer")
        opt = self.options
        device = rank_device(opt.device)
        torch.manual_seed(opt.seed)
        encoder.to(device)
        rank, world = rank_and_world()
        x, y = features.to(device).float(), labels.to(device).float()
        mine = torch.arange(rank, len(x), world, device=device)  # this rank's samples (all of them in one process)
        weights = weights_of(encoder, device)
        broadcast_(weights)  # every rank starts from rank 0's weights
        classifier = self.classifier(forward_preactivations(weights, x[mine])[-1], y[mine])
        stochastic = opt.minibatch_size is not None and opt.minibatch_size < len(x)
        zs = None if stochastic else forward_preactivations(weights, x[mine])
        history: list[dict] = []
        mu, start = opt.mu, time.perf_counter()
        for sweep in range(1, opt.sweeps + 1):
            if stochastic:
                weights, classifier, terms = self.stochastic_sweep(weights, x, y, classifier, mu, rank, world)
            else:
                weights, classifier, terms = self.full_batch_sweep(weights, zs, x[mine], y[mine], mu)
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

    def classifier(self, top: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The code head: ridge regression of the labels on sgn(z_L), over every rank's samples."""
        return ridge_classifier(sign_codes(top, top.dtype), labels, self.options.classifier_ridge, reduce=global_sum)

    def w_step(self, x: torch.Tensor, zs: list[torch.Tensor], penalties: list[Penalty]) -> list[torch.Tensor]:
        """Every layer's closed-form weights from its statistics (independent across layers; one all-reduce for all).

        With per-sample penalties μ_k the layer solves Σ_k μ_k||z_k − W a_k||² + λ||W||², i.e. the weighted sums
        with a ridge λ; with one μ, the plain sums with λ/μ (the same minimiser)."""
        stats = [layer_statistics(h, z, mu if isinstance(mu, torch.Tensor) else None) for h, z, mu in zip(layer_inputs(x, zs), zs, penalties)]
        summed = global_sum([t for st in stats for t in (st.gram, st.cross)])
        return [solve_layer(LayerStatistics(gram, cross), self.options.ridge, 1.0 if isinstance(mu, torch.Tensor) else mu)
                for gram, cross, mu in zip(summed[0::2], summed[1::2], penalties)]

    def z_step(self, weights: list[torch.Tensor], zs: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
               classifier: torch.Tensor, penalties: list[Penalty]) -> None:
        """All even hidden layers of all samples in one batched step, then all odd ones (each layer's local
        objective touches only its two neighbours, so layers of one parity are independent), then the top."""
        depth = len(weights)
        for parity in (0, 1):
            for group in same_shape_groups(range(parity, depth - 1, 2), zs, weights):
                self.hidden_group_step(group, weights, zs, x, penalties)
        zs[-1] = top_step(affine(torch.relu(zs[-2]), weights[-1]), y, classifier, penalties[-1], self.options.quantisation)

    def hidden_group_step(self, group: list[int], weights: list[torch.Tensor], zs: list[torch.Tensor], x: torch.Tensor,
                          penalties: list[Penalty]) -> None:
        """Damped diagonal-Newton steps of the stacked layers `group` (layers × samples × units at once)."""
        opt = self.options
        target = torch.stack([affine(x if l == 0 else torch.relu(zs[l - 1]), weights[l]) for l in group])
        above, weight_above = torch.stack([zs[l + 1] for l in group]), torch.stack([weights[l + 1] for l in group])
        mu, mu_above = (stacked_penalty([penalties[l + d] for l in group]) for d in (0, 1))
        z = torch.stack([zs[l] for l in group])
        objective = lambda v: hidden_local_objective(v, target, above, weight_above, mu, mu_above, opt.l1)  # noqa: E731
        for _ in range(opt.newton_steps):
            step = hidden_newton_step(z, target, above, weight_above, mu, mu_above, opt.l1, opt.damping)
            z = damped(objective, z, step, opt.backtracking)
        for i, l in enumerate(group):
            zs[l] = z[i]

    def full_batch_sweep(self, weights: list[torch.Tensor], zs: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                         mu: float) -> tuple[list[torch.Tensor], torch.Tensor, dict]:
        opt = self.options
        weights = self.w_step(x, zs, constraint_penalties(weights, zs, x, mu, opt))
        classifier = self.classifier(zs[-1], y)
        self.z_step(weights, zs, x, y, classifier, constraint_penalties(weights, zs, x, mu, opt))
        return weights, classifier, objective_terms(weights, zs, x, y, classifier, mu, opt)

    def stochastic_sweep(self, weights: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor, classifier: torch.Tensor,
                         mu: float, rank: int, world: int) -> tuple[list[torch.Tensor], torch.Tensor, dict]:
        """One pass over shuffled mini-batches: fresh z's, z-steps, batch W-step averaged into the weights."""
        opt = self.options
        s = opt.averaging
        order = torch.randperm(len(x), device=x.device)
        totals: dict[str, float | list[float]] = {}  # batch means of every term, per-layer lists elementwise
        batches = 0
        for begin in range(0, len(x), opt.minibatch_size):
            idx = order[begin : begin + opt.minibatch_size][rank::world]  # this rank's share of the mini-batch
            xb, yb = x[idx], y[idx]
            zs = forward_preactivations(weights, xb)
            self.z_step(weights, zs, xb, yb, classifier, constraint_penalties(weights, zs, xb, mu, opt))
            batch_weights = self.w_step(xb, zs, constraint_penalties(weights, zs, xb, mu, opt))
            weights = [s * w + (1 - s) * nw for w, nw in zip(weights, batch_weights)]
            classifier = s * classifier + (1 - s) * self.classifier(zs[-1], yb)
            for k, v in objective_terms(weights, zs, xb, yb, classifier, mu, opt).items():
                totals[k] = [t + u for t, u in zip(totals[k], v)] if isinstance(v, list) and k in totals else (
                    totals.get(k, 0.0) + v if not isinstance(v, list) else v)
            batches += 1
        return weights, classifier, {k: [t / batches for t in v] if isinstance(v, list) else v / batches for k, v in totals.items()}


def stacked_penalty(penalties: list[Penalty]) -> Penalty:
    """One μ for a stacked group: the common number, or the per-sample weights stacked (layers, N, 1)."""
    return torch.stack(penalties) if isinstance(penalties[0], torch.Tensor) else penalties[0]


@torch.no_grad()
def objective_terms(weights: list[torch.Tensor], zs: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                    classifier: torch.Tensor, mu: float, opt: AltMinOptions) -> dict:
    """Per-sample means of E's terms and the relative constraint residual of every layer (over all ranks' samples)."""
    inputs = layer_inputs(x, zs)
    gaps = [(z - affine(h, w)).norm(dim=1) for z, h, w in zip(zs, inputs, weights)]
    penalty = sum(g.sum() if opt.residual == "l1" else g.pow(2).sum() for g in gaps)
    sums = [(y - zs[-1] @ classifier).pow(2).sum(), (y - sign_codes(zs[-1], zs[-1].dtype) @ classifier).pow(2).sum(), penalty,
            sum(h.sum() for h in inputs[1:]), torch.tensor(float(len(x)), device=x.device)]
    sums += [g.pow(2).sum() for g in gaps] + [z.pow(2).sum() for z in zs]
    loss, code_loss, penalty, l1_sum, n, *squares = [float(t) for t in global_sum([torch.as_tensor(t, dtype=torch.float32) for t in sums])]
    depth = len(zs)
    residuals = [(gap / max(z, 1e-24)) ** 0.5 for gap, z in zip(squares[:depth], squares[depth:])]
    return {
        "loss": loss / n,
        "code_loss": code_loss / n,
        "penalty": mu * penalty / n,
        "l1_penalty": opt.l1 * l1_sum / n,
        "residual_max": max(residuals),
        "residual_mean": sum(residuals) / len(residuals),
        "residuals": residuals,
    }
