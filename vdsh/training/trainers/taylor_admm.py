"""Taylor et al. ADMM ("Training Neural Networks Without Gradients: A Scalable ADMM Approach", ICML 2016).

Three blocks per hidden layer: weights W_l, pre-activations z_l and activations a_l = h(z_l) (ReLU),
with a_0 = x. Only the last layer's constraint carries a Lagrange multiplier λ; the others are
quadratic penalties:

    ℓ(z_L, y) + <z_L − W_L a_{L−1}, λ> + β_L||z_L − W_L a_{L−1}||²
              + Σ_{l<L} γ_l||a_l − h(z_l)||² + β_l||z_l − W_l a_{l−1}||²

One iteration (Algorithm 1 of the paper), every step a closed form:
  for l = 1..L−1:  W_l ← least squares of z_l on [a_{l−1}; 1]      (the same ridge W-step as `altmin`)
                   a_l ← (β_{l+1}W_{l+1}ᵀW_{l+1} + γ_l I)⁻¹(β_{l+1}W_{l+1}ᵀ(z_{l+1} − b_{l+1}) + γ_l h(z_l))
                   z_l ← argmin_z γ_l||a_l − h(z)||² + β_l||z − W_l a_{l−1}||²  (elementwise, two ReLU branches)
  W_L ← least squares of z_L on [a_{L−1}; 1];  z_L ← argmin ℓ(z) + <z, λ> + β_L||z − W_L a_{L−1}||²
  λ ← λ + β_L(z_L − W_L a_{L−1})   (skipped during the first `warm_start` iterations, as the paper does).

ℓ is the shared code head's squared loss ||y − zC||² (C: ridge classifier on sgn(z_L)), not the
paper's hinge loss, so that every trainer in vdsh optimises the same hashing objective. The paper
trains without biases; here [W | b] is solved jointly, with a ridge (small training sets).

The slides that compare it with VDSH call it unstable; the history records, per iteration, every
layer's relative residual ||z_l − W_l a_{l−1}|| / ||z_l|| and ||a_l − h(z_l)|| / ||a_l||, and ||λ||,
so the plots show whether, and where, it drifts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from vdsh.training.trainers.base import Trainer
from vdsh.training.validation import Validation, evaluate_encoder
from vdsh.training.trainers.altmin import forward_preactivations, layer_statistics, solve_layer, weights_of, write_weights
from vdsh.training.code_head import LinearCodeHead
from vdsh.training.encoders.mlp import DeepMLP, check_plain_mlp_problem
from vdsh.training.stacked_mlp import affine


def relu_coupled_preactivation(target: torch.Tensor, z: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """Elementwise argmin_a β(a − p)² + γ(z − relu(a))², p = target: best of the branches a ≥ 0 and a ≤ 0."""
    a_pos = ((beta * target + gamma * z) / (beta + gamma)).clamp_min(0)
    a_neg = target.clamp_max(0)
    cost_pos = beta * (a_pos - target) ** 2 + gamma * (z - a_pos) ** 2
    cost_neg = beta * (a_neg - target) ** 2 + gamma * z**2
    return torch.where(cost_pos <= cost_neg, a_pos, a_neg)


@dataclass
class TaylorAdmmOptions:
    """Taylor ADMM options. The paper's β = 1, γ = 10 suit its hinge loss; with the squared code loss
    they pin the z's to the forward pass and the codes barely improve (a screen on mnist-sample), so
    β = 0.01, γ = 1. Measured figures of these defaults: BENCHMARKS.md, "Methods: mnist-5k"."""

    beta: float = 0.01  # β_l: weight of the linear constraints z_l = W_l a_{l−1} (all layers)
    gamma: float = 1.0  # γ_l: weight of the activation constraints a_l = h(z_l)
    ridge: float = 10.0  # ridge on [W | b] (sum scale): the first layer has more inputs than a small set has samples
    classifier_ridge: float = 1.0
    warm_start: int = 3  # iterations without multiplier updates
    sweeps: int = 20
    device: str = "cpu"
    eval_every: int = 1
    eval_size: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.beta, self.gamma) <= 0 or self.ridge < 0 or self.sweeps < 1 or self.warm_start < 0:
            raise ValueError("beta and gamma must be > 0, ridge >= 0, sweeps >= 1, warm_start >= 0")


@dataclass
class TaylorState:
    """Per-sample variables: z_1..z_L (pre-activations), a_1..a_{L−1} (activations), λ (N, bits)."""

    z: list[torch.Tensor]
    a: list[torch.Tensor]
    multiplier: torch.Tensor


def activation_step(z_above: torch.Tensor, weight_above: torch.Tensor, z: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """argmin_a β||z_{l+1} − W_{l+1}a − b_{l+1}||² + γ||a − h(z_l)||², one (w, w) system shared by all samples."""
    w = weight_above[:, :-1]
    system = beta * w.T @ w + gamma * torch.eye(w.shape[1], dtype=w.dtype, device=w.device)
    rhs = beta * (z_above - weight_above[:, -1]) @ w + gamma * torch.relu(z)
    return torch.linalg.solve(system, rhs.T).T


def output_step(target: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor, multiplier: torch.Tensor, beta: float) -> torch.Tensor:
    """argmin_z ||y − zC||² + <z, λ> + β||z − t||²:  z (CCᵀ + βI) = yCᵀ + βt − λ/2."""
    system = classifier @ classifier.T + beta * torch.eye(classifier.shape[0], dtype=classifier.dtype, device=classifier.device)
    return torch.linalg.solve(system, (labels @ classifier.T + beta * target - multiplier / 2).T).T


class TaylorAdmmTrainer(Trainer):
    """Trains a plain DeepMLP by Taylor et al.'s ADMM; `fit` -> (encoder, history with per-layer residuals)."""

    options_class = TaylorAdmmOptions

    def fit(self, encoder: DeepMLP, features: torch.Tensor, labels: torch.Tensor,
            validation: Validation | None = None) -> tuple[DeepMLP, list[dict]]:
        check_plain_mlp_problem(encoder, features, labels, "TaylorAdmmTrainer")
        opt = self.options
        device = torch.device(opt.device)
        torch.manual_seed(opt.seed)
        encoder.to(device)
        x, y = features.to(device).float(), labels.to(device).float()
        weights = weights_of(encoder, device)
        zs = forward_preactivations(weights, x)
        state = TaylorState(zs, [torch.relu(z) for z in zs[:-1]], torch.zeros_like(zs[-1]))
        head = LinearCodeHead(opt.classifier_ridge)
        history: list[dict] = []
        start = time.perf_counter()
        for sweep in range(1, opt.sweeps + 1):
            head.fit(state.z[-1], y)
            weights = self.iteration(weights, state, x, y, head.classifier, update_multiplier=sweep > opt.warm_start)
            record = {"sweep": sweep, "time": time.perf_counter() - start,
                      **taylor_terms(weights, state, x, y, head.classifier, opt.beta, opt.gamma)}
            if (opt.eval_every and sweep % opt.eval_every == 0) or sweep == opt.sweeps:
                write_weights(encoder, weights)
                record.update(evaluate_encoder(encoder, x, y, validation, opt.eval_size, opt.seed))
            self.report(history, record)
        write_weights(encoder, weights)
        return encoder, history

    def iteration(self, weights: list[torch.Tensor], state: TaylorState, x: torch.Tensor, y: torch.Tensor,
                  classifier: torch.Tensor, update_multiplier: bool) -> list[torch.Tensor]:
        """Algorithm 1: layers bottom-up (W, a, z), then the top (W_L, z_L) and the multiplier."""
        opt = self.options
        weights = list(weights)
        inputs = lambda l: x if l == 0 else state.a[l - 1]  # noqa: E731  (a_{l−1}, with a_0 = x)
        depth = len(weights)
        for l in range(depth - 1):
            weights[l] = solve_layer(layer_statistics(inputs(l), state.z[l]), opt.ridge, 1.0)
            state.a[l] = activation_step(state.z[l + 1], weights[l + 1], state.z[l], opt.beta, opt.gamma)
            state.z[l] = relu_coupled_preactivation(affine(inputs(l), weights[l]), state.a[l], opt.beta, opt.gamma)
        weights[-1] = solve_layer(layer_statistics(inputs(depth - 1), state.z[-1]), opt.ridge, 1.0)
        target = affine(inputs(depth - 1), weights[-1])
        state.z[-1] = output_step(target, y, classifier, state.multiplier, opt.beta)
        if update_multiplier:
            state.multiplier = state.multiplier + opt.beta * (state.z[-1] - target)
        return weights


@torch.no_grad()
def taylor_terms(weights: list[torch.Tensor], state: TaylorState, x: torch.Tensor, y: torch.Tensor,
                 classifier: torch.Tensor, beta: float, gamma: float) -> dict:
    """Per-sample means of the Lagrangian's terms; relative residuals of every constraint, per layer."""
    inputs = [x] + state.a
    gaps = [z - affine(h, w) for z, h, w in zip(state.z, inputs, weights)]
    act_gaps = [a - torch.relu(z) for a, z in zip(state.a, state.z[:-1])]
    linear = [float(g.norm() / z.norm().clamp_min(1e-12)) for g, z in zip(gaps, state.z)]
    activation = [float(g.norm() / a.norm().clamp_min(1e-12)) for g, a in zip(act_gaps, state.a)]
    n = len(x)
    residuals = linear + activation
    return {
        "loss": float((y - state.z[-1] @ classifier).pow(2).sum() / n),
        "linear_penalty": float(beta * sum(g.pow(2).sum() for g in gaps) / n),
        "activation_penalty": float(gamma * sum(g.pow(2).sum() for g in act_gaps) / n),
        "lagrangian_term": float((gaps[-1] * state.multiplier).sum() / n),
        "multiplier_norm": float(state.multiplier.norm() / n**0.5),
        "residual_max": max(residuals),
        "residual_mean": sum(residuals) / len(residuals),
        "residuals": linear,
        "activation_residuals": activation,
    }
