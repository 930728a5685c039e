"""ADMM training of very deep plain ReLU MLPs for supervised hashing (VDSH; Zhang, Chen, Saligrama, CVPR 2016).

Splitting. For a DeepMLP of M weight layers, every sample i carries auxiliary variables for every
layer: pre-activations a_m = W_m z_{m-1} + b_m (m = 1..M) and outputs z_m = relu(a_m) (m < M); the top
a_M is the real-valued hashing output, codes b = sgn(a_M). The augmented Lagrangian (per-sample means)

    μ/2 ||a_M − B||² + ℓ/2 ||Y − a_M C||²              top: discrete codes B, classifier loss (ℓ = 0 by default)
  + β/2 Σ_m ||a_m − W_m z_{m−1} − b_m + u_m||²        linear constraints, scaled multipliers u_m
  + γ/2 Σ_{m<M} ||z_m − relu(a_m)||²                   activation constraints (quadratic penalty)
  + λ/2 Σ_m ||W_m||² + ρ/2 Σ_m ||W_m − W_m^prev||²     ridge + proximal weight consensus

couples each variable only to its neighbours in the chain x, a_1, z_1, a_2, …, z_{M−1}, a_M. Two orders of the
auxiliary updates are implemented (`order`):

'backward' (default): per mini-batch, auxiliaries start at a forward pass (multipliers zero), the top's codes B are
  set (`codes`, below), and one top→bottom pass of local steps sets every layer's target: a_M moves a fraction
  `step` towards B; each lower a_m changes by W_{m+1}ᵀ δa_{m+1}, masked to the units that are on (the z- and a-steps
  linearised in the limit of a small penalty ratio). Each hidden layer's change is scaled to step·||a_m|| (adaptive
  per-layer penalties). Then every W_m is, independently and at once, the proximal ridge regression of its target
  on the forward input it sees. `step` (scaled by √(8/M)) decays on a cosine over the run; hidden layers start at
  the identity (`init`).
  Note what this order is: the one pass carries the top's pull through the whole depth, and its direction is
  exactly the back-propagated gradient of ½||a_M − B||² (a test checks this against autograd). What differs from
  back-prop is everything else: discrete code targets, equal relative target steps for every layer, and weights
  solved in closed form (an input-covariance-preconditioned, proximal least-squares step) instead of a gradient step.
  Measured on mnist-5k (48 bits, width 256, CPU): see BENCHMARKS.md, "Training". Back-prop from the same identity
  start does as well or better: the identity start, not the ADMM order, is what makes depth trainable here.

'odd-even' (the DESIGN's parallel order, full batch or mini-batches), one sweep:
  0. auxiliaries re-initialised from a plain forward pass of the current weights (every
     `reinit_every` sweeps; multipliers zeroed or kept), so every sweep starts forward-consistent.
  1. top: codes B ∈ {±1} (`codes`, below); the classifier C by ridge regression on B (`code_head`). B is
     the margin-1 target the top auxiliary is pulled to: forward codes then need margin, not a
     sub-margin nudge of a free real a_M, to flip.
  2. auxiliaries, `aux_iterations` odd/even rounds: all a_m in parallel (elementwise closed form of
     the ReLU coupling; the top a_M: one bits×bits system with the code pull), then all z_m in
     parallel (one width×width system per layer, batched). Each round carries the top's pull one
     layer further down, so the targets become a proximal step from the forward values.
  3. weights: every W_m is a ridge regression (with proximal term ρ) of its target a_m + u_m on its
     input, independent of the other layers; all hidden layers solved at once with one batched
     Cholesky factorisation. With `fit_inputs='forward'` the input is the forward activation z_{m−1}
     the layer actually sees at test time (a target-propagation style fit: W moves by a
     ρ-damped, input-covariance-preconditioned step towards its target); 'auxiliary' is the ADMM z.
  4. multipliers: u_m += a_m − W_m z_{m−1} − b_m.
In this order nothing crosses more than one layer per round; every step is closed form. Cost per sweep is linear in depth
(aux_iterations + 2 GEMM passes, plus batched w×w solves). The weights kept are those of the sweep with
the best validation mAP of forward-pass codes (`keep_best`), optionally with early stopping (`patience`).

Why 'backward' is the default: with fixed penalties each odd/even round carries the top's pull one layer down and
shrinks it (by about γ/(β+γ) · βs²/(γ+βs²) ≤ 1/4 per layer for β = γ and singular values s ≈ 1), so deep layers
barely learn: 0.48 mAP at depth 8 on mnist-5k and near chance at depth 32, against 0.89 and 0.86 for 'backward'.

Target codes (`codes`). 'centres' (default): each sample's B is its class's fixed random ±1 codeword (multi-label:
the sign of the sum of its classes' codewords), so classes are pulled to codes about bits/2 apart, as hash centres
(Yuan et al., CSQ, CVPR 2020) are. 'learned': SDH's B-step, codes minimising ||Y − BC||² + ν||B − F||² near the
forward outputs F by a few DCC bit sweeps; the squared loss rewards no margin, so the classes end only 2–6 bits
apart and test points fall between them. Measured (48 bits, width 256, 'backward'): cifar10-5k GIST, depth 8,
20 sweeps: mAP@all 0.254 'learned', 0.340 'centres' (with feature noise 0.5: 0.291 and 0.367); mnist-5k, depth 8,
30 sweeps, seeds 0/1/2: 0.928/0.933/0.914 and 0.941/0.933/0.928; depth 32 (`vdsh bench train`): 0.910 and 0.912.

Stochastic variant of 'odd-even' (minibatch_size): auxiliaries exist for one mini-batch at a time (initialised by a
forward pass, multipliers at zero), codes B as above, `aux_iterations` odd/even
rounds are run on it, and the weight step (inputs chosen by `fit_inputs`) uses Gram statistics
accumulated across mini-batches (an exponential running mean).

Deviations from the paper, and why: the per-sample weight copies θ̃ with their own multipliers v are
replaced by the proximal term ρ/2||W − W^prev||² (the same consensus pull, without storing N copies of
every weight matrix); the activation constraint z = relu(a) is a penalty without multiplier (as in
Taylor et al. 2016, whose splitting this uses to make every step closed form); the top couples a_M to
fixed class codewords or SDH-style discrete codes (and optionally the squared classifier loss) rather than
the paper's loss on sgn(z_M); auxiliaries are re-initialised from the forward pass each sweep and, by
default, the weight regressions read forward activations: without that the auxiliaries fit the labels
(train mAP ~0.99) while forward-pass codes stayed near chance (~0.2 mAP), each layer's auxiliary
differing 2–5% from what the layer computes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from vdsh.index.metrics import mean_average_precision
from vdsh.training.code_head import LinearCodeHead, binary_codes, ridge_classifier, squared_loss
from vdsh.training.distributed import broadcast_, global_mean, global_min, global_sum, rank_and_world
from vdsh.training.mlp import DeepMLP, check_plain_mlp_problem, identity_hidden_layers


@dataclass
class AdmmOptions:
    """ADMM options (see the module docstring for the role of each).

    Defaults ('backward' order): from prototype runs on mnist-5k, depth 8 × 256, 48 bits, 10–15 sweeps (step 0.03/0.1/0.3,
    rho 0.1/0.3/1/3, mini-batches 50/100/250/500/1000, nu 0.1/1, stat_decay 0/0.9, identity/MSRA start), then at depths 8
    and 32 (step 0.06/0.15, rho 0.5/2, nu 0.03/0.3, ridge 0/1e-3/1e-2, classifier_decay 0.97, width 512, 15/30 sweeps,
    a running average of the weights): within seed noise (±0.007 mAP) of these, except ridge and, over 30 sweeps,
    step (see their comments). Those screens ran with codes='learned'. What did pay is input augmentation (the
    trainer's `augment`) and class-codeword targets (`codes`). The odd-even settings that were best for that order
    are rho 0.1, nu 0.01, minibatch_size None, stat_decay 0.9, init 'msra'. Not a converged tuning."""

    order: str = "backward"  # auxiliary update order: 'backward' (one top→bottom pass per mini-batch) or 'odd-even'
    init: str = "identity"  # hidden layers start as 'identity' (W = I, b = 0) or keep the encoder's 'msra' init
    # 'backward': every layer's target moves by step·√(8/M)·||a_m|| per mini-batch (M layers). Over 30 sweeps at
    # depth 8 (mnist-5k, 48 bits, 2-px shifts, seeds 0/1/2, codes='learned'), mAP@all 0.909/0.912/0.901 with 0.1,
    # 0.928/0.933/0.914 with 0.05; with 'centres' at depth 32: 0.893 with 0.1, 0.912 with 0.05.
    step: float = 0.05
    step_schedule: str = "cosine"  # 'cosine' decay of step over the run, or 'constant'
    beta: float = 1.0  # weight of the linear constraints a = Wz + b (and of their multipliers)
    gamma: float = 1.0  # weight of the activation constraints z = relu(a)
    rho: float = 1.0  # proximal pull of W towards its previous value (the θ̃ consensus)
    # λ of the weight ridge regression (per-sample scale). 0: ridge shrinks every layer a little at every mini-batch
    # while the targets' pull decays with the step, and the shrinkage compounds over depth: with 1e-3, depth 32 on
    # mnist-5k fell from val mAP 0.88 to 0.63 in the last sweep (0.01 did the same at depth 8). ρ keeps the solves SPD.
    ridge: float = 0.0
    classifier_ridge: float = 1.0  # λ of the classifier ridge regression on the codes
    code_weight: float = 1.0  # μ: pull of the top a_M towards the discrete codes B (margin 1)
    loss_weight: float = 0.0  # ℓ: weight of the classifier loss ½||y − a_M C||² on the top auxiliary
    codes: str = "centres"  # top targets B: 'centres' (a fixed random codeword per class) or 'learned' (SDH's B-step)
    nu: float = 0.1  # ν: closeness of the discrete codes B to the forward-pass outputs in the learned B-step
    bit_sweeps: int = 2  # DCC sweeps over the bits in the B-step
    aux_iterations: int = 8  # odd/even auxiliary updates per sweep
    reinit_every: int = 1  # sweeps between re-initialisations of the auxiliaries from a forward pass (0: never)
    reset_multipliers: bool = True  # zero the multipliers at a re-initialisation
    fit_inputs: str = "forward"  # inputs of the weight regressions: 'auxiliary' z or 'forward' activations
    penalty_growth: float = 1.0  # β and γ are multiplied by this after every sweep (>1 tightens constraints)
    multipliers: str = "all"  # 'all' layers, 'top' layer only, or 'none' (pure quadratic penalty)
    sweeps: int = 15
    keep_best: bool = True  # return the weights of the evaluation with the best validation (else train) mAP
    patience: int = 0  # stop after this many evaluations without improvement (0: never)
    minibatch_size: int | None = 100  # None: full batch (every auxiliary variable in memory)
    stat_decay: float = 0.0  # running-mean decay of the weight statistics across mini-batches (0: this batch's only)
    classifier_decay: float = 0.9  # running-mean decay of the classifier across mini-batches
    device: str = "cpu"
    dtype: str = "float32"  # storage/GEMM dtype of the auxiliaries: 'float32' or 'bfloat16'; solves stay float32
    eval_every: int = 1  # sweeps between mAP evaluations (0: only at the end)
    eval_size: int = 1000  # training samples scored as queries against the training set
    seed: int = 0

    def __post_init__(self) -> None:
        if self.order not in ("backward", "odd-even"):
            raise ValueError(f"order must be 'backward' or 'odd-even', got {self.order!r}")
        if self.init not in ("identity", "msra"):
            raise ValueError(f"init must be 'identity' or 'msra', got {self.init!r}")
        if self.step_schedule not in ("cosine", "constant") or not 0 < self.step <= 1:
            raise ValueError(f"step must be in (0, 1] and step_schedule 'cosine' or 'constant', got {self.step}, {self.step_schedule!r}")
        if self.codes not in ("centres", "learned"):
            raise ValueError(f"codes must be 'centres' or 'learned', got {self.codes!r}")
        if self.multipliers not in ("all", "top", "none"):
            raise ValueError(f"multipliers must be 'all', 'top' or 'none', got {self.multipliers!r}")
        if self.fit_inputs not in ("auxiliary", "forward"):
            raise ValueError(f"fit_inputs must be 'auxiliary' or 'forward', got {self.fit_inputs!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if min(self.beta, self.gamma) <= 0 or min(self.rho, self.ridge) < 0 or self.sweeps < 1:
            raise ValueError("beta and gamma must be > 0, rho and ridge >= 0, sweeps >= 1")
        if self.rho + self.ridge <= 0:
            raise ValueError("rho + ridge must be > 0: a mini-batch's Gram matrix is singular without them")
        if min(self.code_weight, self.loss_weight, self.nu) < 0 or self.code_weight + self.loss_weight <= 0:
            raise ValueError("code_weight, loss_weight and nu must be >= 0, code_weight + loss_weight > 0")
        if self.aux_iterations < 1 or self.bit_sweeps < 0 or self.reinit_every < 0 or self.patience < 0:
            raise ValueError("aux_iterations >= 1; bit_sweeps, reinit_every and patience >= 0")


@dataclass
class Validation:
    """A small held-out retrieval problem scored after sweeps: features and multi-hot labels."""

    query: torch.Tensor
    query_labels: torch.Tensor
    database: torch.Tensor
    database_labels: torch.Tensor


@dataclass
class LayerWeights:
    """The network's weights in stacked form, bias as the last column ([W | b]) so ridge includes it.

    first: (w, D+1); hidden: (M−2, w, w+1) for the width→width layers; top: (bits, w+1).
    """

    first: torch.Tensor
    hidden: torch.Tensor
    top: torch.Tensor

    @classmethod
    def from_mlp(cls, mlp: DeepMLP, device: torch.device) -> "LayerWeights":
        def aug(linear: torch.nn.Linear) -> torch.Tensor:
            return torch.cat([linear.weight, linear.bias[:, None]], 1).detach().float().to(device)

        hidden = [aug(l) for l in mlp.linears[1:-1]]
        width = mlp.width
        stacked = torch.stack(hidden) if hidden else torch.empty(0, width, width + 1, device=device)
        return cls(aug(mlp.linears[0]), stacked, aug(mlp.linears[-1]))

    def clone(self) -> "LayerWeights":
        return LayerWeights(self.first.clone(), self.hidden.clone(), self.top.clone())

    def write_to(self, mlp: DeepMLP) -> None:
        mats = [self.first, *self.hidden.unbind(0), self.top]
        with torch.no_grad():
            for linear, w in zip(mlp.linears, mats):
                linear.weight.copy_(w[:, :-1])
                linear.bias.copy_(w[:, -1])


@dataclass
class Auxiliaries:
    """Per-sample variables: a, z, u of the M−1 hidden layers stacked (M−1, N, w); the top a_M, u_M (N, bits)."""

    a: torch.Tensor
    z: torch.Tensor
    u: torch.Tensor
    a_top: torch.Tensor
    u_top: torch.Tensor


def affine(x: torch.Tensor, w_aug: torch.Tensor) -> torch.Tensor:
    """x Wᵀ + b for [W | b]; batched over a leading layer axis when both are 3-D."""
    w = w_aug.to(x.dtype)
    if x.ndim == 3:
        return torch.baddbmm(w[:, None, :, -1], x, w[:, :, :-1].transpose(1, 2))
    return torch.addmm(w[:, -1], x, w[:, :-1].T)


def preactivation_targets(weights: LayerWeights, x: torch.Tensor, aux: Auxiliaries) -> tuple[torch.Tensor, torch.Tensor]:
    """W_m z_{m−1} + b_m for every hidden layer (M−1, N, w) and for the top (N, bits)."""
    first = affine(x, weights.first)[None]
    rest = affine(aux.z[:-1], weights.hidden) if len(weights.hidden) else first[:0]
    return torch.cat([first, rest]), affine(aux.z[-1], weights.top)


def forward_init(weights: LayerWeights, x: torch.Tensor, dtype: torch.dtype) -> Auxiliaries:
    """Auxiliaries of a plain forward pass (all constraints satisfied) with zero multipliers."""
    a_list, z_list = [], []
    z = x
    for m in range(1 + len(weights.hidden)):
        w = weights.first if m == 0 else weights.hidden[m - 1]
        a = affine(z, w)
        z = torch.relu(a)
        a_list.append(a)
        z_list.append(z)
    a_top = affine(z, weights.top)
    a, zs = torch.stack(a_list).to(dtype), torch.stack(z_list).to(dtype)
    return Auxiliaries(a, zs, torch.zeros_like(a), a_top.to(dtype), torch.zeros_like(a_top, dtype=dtype))


def solve_spd_right(system: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """X with X·S = R for symmetric positive definite S (batched): Cholesky, S X^T = R^T."""
    chol = torch.linalg.cholesky(system)
    return torch.cholesky_solve(rhs.transpose(-1, -2), chol).transpose(-1, -2)


# ---------------------------------------------------------------- step 1: weights (independent per layer)


@dataclass
class WeightStatistics:
    """Per-sample means of the ridge normal equations: Gram [z 1]ᵀ[z 1] and right side [z 1]ᵀ(a + u).

    gram_first (D+1, D+1), rhs_first (D+1, w); gram_rest (M−1, w+1, w+1) for W_2..W_M;
    rhs_hidden (M−2, w+1, w); rhs_top (w+1, bits).
    """

    gram_first: torch.Tensor
    rhs_first: torch.Tensor
    gram_rest: torch.Tensor
    rhs_hidden: torch.Tensor
    rhs_top: torch.Tensor

    def blend(self, other: "WeightStatistics", decay: float) -> "WeightStatistics":
        """decay·self + (1 − decay)·other: the running mean of the stochastic variant."""
        return WeightStatistics(*(decay * s + (1 - decay) * o for s, o in zip(asdict_tensors(self), asdict_tensors(other))))


def asdict_tensors(stats: WeightStatistics) -> list[torch.Tensor]:
    return [stats.gram_first, stats.rhs_first, stats.gram_rest, stats.rhs_hidden, stats.rhs_top]


def with_ones(z: torch.Tensor) -> torch.Tensor:
    """[z 1] in float32: the bias column of the ridge regression."""
    return torch.cat([z.float(), torch.ones(*z.shape[:-1], 1, device=z.device)], -1)


def weight_statistics(x: torch.Tensor, aux: Auxiliaries) -> WeightStatistics:
    """Normal-equation statistics of every layer: layer m reads only z_{m−1} and a_m + u_m."""
    n = x.shape[0]
    x1 = with_ones(x)
    z1 = with_ones(aux.z)  # (M−1, N, w+1): inputs of W_2..W_M
    target = (aux.a + aux.u).float()
    return WeightStatistics(
        gram_first=x1.T @ x1 / n,
        rhs_first=x1.T @ target[0] / n,
        gram_rest=torch.bmm(z1.transpose(1, 2), z1) / n,
        rhs_hidden=torch.bmm(z1[:-1].transpose(1, 2), target[1:]) / n,
        rhs_top=z1[-1].T @ (aux.a_top + aux.u_top).float() / n,
    )


def solve_weights(stats: WeightStatistics, previous: LayerWeights, ridge: float, rho: float) -> LayerWeights:
    """All layers' ridge regressions with proximal term, at once.

    W_mᵀ = (G_m + (λ + ρ)I)⁻¹ (R_m + ρ W_m^prevᵀ); one batched Cholesky factorisation for W_2..W_M.
    """

    def regularised(gram: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(gram.shape[-1], device=gram.device)
        return gram + (ridge + rho) * eye

    first = torch.linalg.solve(regularised(stats.gram_first), stats.rhs_first + rho * previous.first.T).T
    chol = torch.linalg.cholesky(regularised(stats.gram_rest))  # (M−1, w+1, w+1), batched over layers
    hidden = torch.cholesky_solve(stats.rhs_hidden + rho * previous.hidden.transpose(1, 2), chol[:-1]).transpose(1, 2)
    top = torch.cholesky_solve(stats.rhs_top + rho * previous.top.T, chol[-1]).T
    return LayerWeights(first.contiguous(), hidden.contiguous(), top.contiguous())


# ---------------------------------------------------------------- step 2: auxiliaries (odd/even blocks)


def relu_coupled_preactivation(target: torch.Tensor, z: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """Elementwise argmin_a β(a − p)² + γ(z − relu(a))², p = target: best of the branches a ≥ 0 and a ≤ 0."""
    a_pos = ((beta * target + gamma * z) / (beta + gamma)).clamp_min(0)
    a_neg = target.clamp_max(0)
    cost_pos = beta * (a_pos - target) ** 2 + gamma * (z - a_pos) ** 2
    cost_neg = beta * (a_neg - target) ** 2 + gamma * z**2
    return torch.where(cost_pos <= cost_neg, a_pos, a_neg)


def top_preactivation(target: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor, beta: float, mu: float,
                      codes: torch.Tensor | None = None, loss_weight: float = 1.0) -> torch.Tensor:
    """argmin_a ℓ/2||y − aC||² + β/2||a − p||² + μ/2||a − b||², b the discrete codes (default sgn(p)).

    Normal equations: a (ℓCCᵀ + (β+μ)I) = ℓ Y Cᵀ + βp + μb, one bits×bits system shared by all samples.
    """
    bits = classifier.shape[0]
    system = loss_weight * classifier @ classifier.T + (beta + mu) * torch.eye(bits, device=classifier.device)
    rhs = loss_weight * labels.float() @ classifier.T + beta * target.float()
    if mu > 0:
        rhs = rhs + mu * (binary_codes(target.float()) if codes is None else codes.float())
    return solve_spd_right(system, rhs)


def discrete_codes(forward_top: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor, nu: float, bit_sweeps: int) -> torch.Tensor:
    """SDH's B-step: argmin_{B ∈ {±1}} ||Y − BC||² + ν||B − F||² by discrete cyclic coordinate descent.

    F are the forward-pass outputs, so the codes stay close to what the network computes while fitting
    the labels; bit k given the others is b_k = sgn(q_k − B_{−k} C_{−k} c_kᵀ), q = YCᵀ + νF.
    """
    q = labels.float() @ classifier.T + nu * forward_top.float()
    codes = binary_codes(q)
    cct = classifier @ classifier.T
    for _ in range(bit_sweeps):
        for k in range(codes.shape[1]):
            cross = codes @ cct[:, k] - codes[:, k] * cct[k, k]
            codes[:, k] = binary_codes(q[:, k] - cross)
    return codes


def class_codewords(labels: torch.Tensor, bits: int, seed: int) -> torch.Tensor:
    """Codes of a random ±1 codeword per class (multi-label: the sign of the sum of its classes' codewords).

    The 'centres' targets, and the start of the 'learned' B-step's classifier, so classes start ~bits/2 bits apart.
    Fitted to the forward codes instead (SDH starts from random B), most bits came out the same for every class,
    since random layers' signs follow the input's mean image. On mnist-5k (8 × 256, 48 bits, 30 sweeps, seeds 0/1/2,
    'learned') mAP@all was 0.828/0.932/0.924 without codewords, 0.928/0.933/0.914 with; the 0.828 run ended with two
    classes on one code.
    """
    generator = torch.Generator().manual_seed(seed)
    codewords = (torch.randint(0, 2, (labels.shape[1], bits), generator=generator) * 2 - 1).float()
    return binary_codes(labels.float() @ codewords.to(labels.device))


def target_codes(kind: str, forward_top: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor, nu: float,
                 bit_sweeps: int, seed: int) -> torch.Tensor:
    """The codes B the top is pulled to: 'centres' (`class_codewords`) or 'learned' (`discrete_codes`)."""
    if kind == "centres":
        return class_codewords(labels, forward_top.shape[1], seed)
    return discrete_codes(forward_top, labels, classifier, nu, bit_sweeps)


def solve_outputs(aux: Auxiliaries, weights: LayerWeights, beta: float, gamma: float, dtype: torch.dtype) -> torch.Tensor:
    """All z_m (m < M) at once: argmin_z γ/2||z − relu(a_m)||² + β/2||a_{m+1} + u_{m+1} − W_{m+1} z − b_{m+1}||².

    z (γI + β WᵀW) = γ relu(a_m) + β (a_{m+1} + u_{m+1} − b_{m+1}) W, one (w, w) system per layer, batched.
    """
    above = list(weights.hidden.unbind(0)) + [weights.top]  # W_{m+1} for m = 1..M−1 (the top is bits × w)
    width = weights.top.shape[1] - 1
    top_w = weights.top[:, :-1]
    gram_hidden = torch.bmm(weights.hidden[:, :, :-1].transpose(1, 2), weights.hidden[:, :, :-1])
    system = gamma * torch.eye(width, device=top_w.device) + beta * torch.cat([gram_hidden, (top_w.T @ top_w)[None]])
    targets_above = list((aux.a[1:] + aux.u[1:]).float().unbind(0)) + [(aux.a_top + aux.u_top).float()]
    # Right sides are built per layer (the top has another width; cheap GEMMs); the solve is batched.
    rhs = torch.stack([(t - w[:, -1]) @ w[:, :-1] for t, w in zip(targets_above, above)])
    rhs = gamma * torch.relu(aux.a.float()) + beta * rhs
    return solve_spd_right(system, rhs).to(dtype)


def backward_targets(weights: LayerWeights, forward: Auxiliaries, codes: torch.Tensor, step: float) -> Auxiliaries:
    """Every layer's pre-activation target from one top→bottom pass in which each step reads only its neighbour.

    Top: a_M moves the fraction `step` of the way to its discrete codes. Below it, the change δa_m of layer m sets
    δz_{m−1} = W_mᵀ δa_m (the z-step's minimiser in the limit of a small penalty ratio, linearised) and
    δa_{m−1} = 1[a_{m−1} > 0] ⊙ δz_{m−1} (the a-step: a unit that is off stays off). Each hidden δa_m is then scaled to
    step·||a_m|| (an adaptive per-layer penalty: every layer is asked for the same relative change, so the deep
    layers are not starved by the attenuation that fixed penalties cause). Multipliers are zero: the auxiliaries
    of a mini-batch live for one step. Returns auxiliaries whose a are the targets and z the forward inputs.
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
    zeros = torch.zeros_like(forward.a)
    return Auxiliaries(targets.to(dtype), forward.z, zeros, (forward.a_top.float() + top_delta).to(dtype), torch.zeros_like(forward.a_top))


# ---------------------------------------------------------------- the trainer


class AdmmTrainer:
    """Trains a plain DeepMLP by ADMM; `fit` returns the encoder (weights for a plain forward pass) and its history."""

    def __init__(self, options: AdmmOptions | None = None, progress: Callable[[dict], None] | None = None,
                 augment: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """augment: applied to each mini-batch of input (e.g. `augment.FlatImageAugmentation`); mini-batch orders only."""
        self.options = options or AdmmOptions()
        self.progress = progress
        self.augment = augment

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.options.dtype == "bfloat16" else torch.float32

    def fit(self, encoder: DeepMLP, features: torch.Tensor, labels: torch.Tensor, validation: Validation | None = None) -> tuple[DeepMLP, list[dict]]:
        check_plain_mlp_problem(encoder, features, labels, "AdmmTrainer")
        opt = self.options
        device = torch.device(opt.device)
        torch.manual_seed(opt.seed)
        encoder.to(device)
        if opt.init == "identity":
            identity_hidden_layers(encoder)
        x = features.to(device, self.dtype)
        y = labels.to(device).float()
        weights = LayerWeights.from_mlp(encoder, device)
        if rank_and_world()[1] > 1 and opt.order != "backward":
            raise ValueError("data-parallel ADMM (several processes) runs the 'backward' order only")
        broadcast_([weights.first, weights.hidden, weights.top])  # every rank starts from rank 0's weights
        head = LinearCodeHead(opt.classifier_ridge)
        history: list[dict] = []
        start = time.perf_counter()
        full_batch = opt.minibatch_size is None or opt.minibatch_size >= len(x)
        if self.augment is not None and full_batch and opt.order != "backward":
            raise ValueError("augmentation needs mini-batches: full-batch auxiliaries belong to fixed samples")
        batches = global_min(1 if full_batch else -(-len(x) // opt.minibatch_size), device)  # ranks step together
        state: dict = {"beta": opt.beta, "gamma": opt.gamma, "stats": None, "aux": None, "step": 0, "steps": opt.sweeps * batches,
                       "batches": batches, "depth_scale": math.sqrt(8 / encoder.depth)}
        best: tuple[float, LayerWeights | None] = (-1.0, None)
        since_best, best_sweep = 0, 0
        for sweep in range(1, opt.sweeps + 1):
            if opt.order == "backward":
                weights, terms = self.target_sweep(weights, x, y, head, state)
            elif full_batch:
                weights, terms = self.full_batch_sweep(weights, x, y, head, state, sweep)
            else:
                weights, terms = self.stochastic_sweep(weights, x, y, head, state)
            state["beta"] *= opt.penalty_growth
            state["gamma"] *= opt.penalty_growth
            record = {"sweep": sweep, "time": time.perf_counter() - start, **terms}
            if (opt.eval_every and sweep % opt.eval_every == 0) or sweep == opt.sweeps:
                weights.write_to(encoder)
                record.update(self.evaluate(encoder, x, y, validation))
                if state["aux"] is not None:
                    record["train_map_auxiliary"] = auxiliary_map(state["aux"].a_top, y, opt.eval_size, opt.seed)
                score = float(rank_zero_value(record.get("val_map", record["train_map"]), device))  # ranks keep the same sweep
                if score > best[0]:
                    best, since_best, best_sweep = (score, weights.clone()), 0, sweep
                else:
                    since_best += 1
                record["best_sweep"] = best_sweep
            history.append(record)
            if self.progress:
                self.progress(record)
            if opt.patience and since_best >= opt.patience:
                break
        if opt.keep_best and best[1] is not None:
            weights = best[1]
        weights.write_to(encoder)
        return encoder, history

    def full_batch_sweep(self, weights: LayerWeights, x: torch.Tensor, y: torch.Tensor, head: LinearCodeHead, state: dict, sweep: int) -> tuple[LayerWeights, dict]:
        """Forward (re-)initialisation, the B-step and classifier, odd/even auxiliary updates, weights, multipliers."""
        opt = self.options
        forward = forward_init(weights, x, self.dtype)
        aux = state["aux"]
        if aux is None or (opt.reinit_every and (sweep - 1) % opt.reinit_every == 0):
            if aux is not None and not opt.reset_multipliers:
                forward.u, forward.u_top = aux.u, aux.u_top
            aux = state["aux"] = forward
            forward = Auxiliaries(aux.a.clone(), aux.z.clone(), aux.u, aux.a_top.clone(), aux.u_top)
        codes = self.code_step(forward.a_top.float(), y, head)  # (3) top: B and C
        for _ in range(opt.aux_iterations):
            self.update_auxiliaries(aux, weights, x, y, head, state, codes)  # (2)
        inputs = aux if opt.fit_inputs == "auxiliary" else Auxiliaries(aux.a, forward.z, aux.u, aux.a_top, aux.u_top)
        weights = solve_weights(weight_statistics(x, inputs), weights, opt.ridge, opt.rho)  # (1)
        terms = self.objective_terms(aux, weights, x, y, head, state)
        self.update_multipliers(aux, weights, x)  # (4)
        forward_codes_loss = float(squared_loss(binary_codes(forward.a_top.float()), y, head.classifier))
        return weights, {**terms, "code_loss": float(squared_loss(codes, y, head.classifier)), "forward_code_loss": forward_codes_loss}

    def code_step(self, forward_top: torch.Tensor, y: torch.Tensor, head: LinearCodeHead) -> torch.Tensor:
        """Discrete codes B near the forward outputs that fit the labels, then the classifier C on B."""
        opt = self.options
        if head.classifier is None:
            head.fit(forward_top, y)
        codes = target_codes(opt.codes, forward_top, y, head.classifier, opt.nu, opt.bit_sweeps, opt.seed)
        head.classifier = ridge_classifier(codes, y, opt.classifier_ridge)
        return codes

    def stochastic_sweep(self, weights: LayerWeights, x: torch.Tensor, y: torch.Tensor, head: LinearCodeHead, state: dict) -> tuple[LayerWeights, dict]:
        """One pass over shuffled mini-batches; auxiliaries live for one mini-batch only."""
        opt = self.options
        order = torch.randperm(len(x), device=x.device)
        totals: dict[str, float] = {}
        batches = 0
        for start in range(0, len(x), opt.minibatch_size):
            idx = order[start : start + opt.minibatch_size]
            xb, yb = self.batch(x, idx), y[idx]
            aux = forward_init(weights, xb, self.dtype)
            forward_z = aux.z.clone()
            codes = self.minibatch_codes(aux.a_top.float(), yb, head)
            for _ in range(opt.aux_iterations):
                self.update_auxiliaries(aux, weights, xb, yb, head, state, codes)
            inputs = aux if opt.fit_inputs == "auxiliary" else Auxiliaries(aux.a, forward_z, aux.u, aux.a_top, aux.u_top)
            stats = weight_statistics(xb, inputs)
            state["stats"] = stats if state["stats"] is None else state["stats"].blend(stats, opt.stat_decay)
            weights = solve_weights(state["stats"], weights, opt.ridge, opt.rho)
            terms = self.objective_terms(aux, weights, xb, yb, head, state)
            residuals = terms.pop("residuals")  # per layer: the last mini-batch's
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + v
            batches += 1
        return weights, {**{k: v / batches for k, v in totals.items()}, "residuals": residuals}

    def target_sweep(self, weights: LayerWeights, x: torch.Tensor, y: torch.Tensor, head: LinearCodeHead, state: dict) -> tuple[LayerWeights, dict]:
        """'backward' order, one pass over shuffled mini-batches: forward, codes, backward targets, all weights at once."""
        opt = self.options
        size = opt.minibatch_size or len(x)
        totals = {"loss": 0.0, "residual_max": 0.0, "residual_mean": 0.0, "step": 0.0}
        residuals = torch.zeros(0)
        batches = 0
        for idx in torch.randperm(len(x), device=x.device).split(size)[: state["batches"]]:
            xb, yb = self.batch(x, idx), y[idx]
            forward = forward_init(weights, xb, self.dtype)
            codes = self.minibatch_codes(forward.a_top.float(), yb, head)
            step = self.step_size(state)
            targets = backward_targets(weights, forward, codes, step)
            stats = WeightStatistics(*global_mean(asdict_tensors(weight_statistics(xb, targets)), len(xb)))
            state["stats"] = stats if state["stats"] is None or opt.stat_decay == 0 else state["stats"].blend(stats, opt.stat_decay)
            weights = solve_weights(state["stats"], weights, opt.ridge, opt.rho)
            residuals = target_residuals(weights, xb, targets)
            totals["loss"] += float(squared_loss(binary_codes(forward.a_top.float()), yb, head.classifier))
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
        one (independent directions), so the network as a whole moves alike at every depth. Measured on
        mnist-5k at depth 32: per-layer step 0.1 gave mAP 0.826, 0.05 gave 0.864, 0.03 gave 0.868.
        """
        opt = self.options
        fraction = min(state["step"] / max(state["steps"], 1), 1.0)
        state["step"] += 1
        step = opt.step * state["depth_scale"]
        return step if opt.step_schedule == "constant" else step * 0.5 * (1 + math.cos(math.pi * fraction))

    def minibatch_codes(self, forward_top: torch.Tensor, y: torch.Tensor, head: LinearCodeHead) -> torch.Tensor:
        """The B-step on a mini-batch; the classifier is refitted on its codes and blended, so over a sweep it sees all."""
        opt = self.options
        if head.classifier is None:
            start = class_codewords(y, forward_top.shape[1], opt.seed)
            head.classifier = ridge_classifier(start, y, opt.classifier_ridge, reduce=global_sum)
        codes = target_codes(opt.codes, forward_top, y, head.classifier, opt.nu, opt.bit_sweeps, opt.seed)
        new_classifier = ridge_classifier(codes, y, opt.classifier_ridge, reduce=global_sum)
        head.classifier = opt.classifier_decay * head.classifier + (1 - opt.classifier_decay) * new_classifier
        return codes

    def update_auxiliaries(self, aux: Auxiliaries, weights: LayerWeights, x: torch.Tensor, y: torch.Tensor, head: LinearCodeHead, state: dict, codes: torch.Tensor) -> None:
        """Odd block (all a_m, in parallel) then even block (all z_m, in parallel)."""
        opt = self.options
        beta, gamma = state["beta"], state["gamma"]
        hidden_target, top_target = preactivation_targets(weights, x, aux)
        aux.a = relu_coupled_preactivation(hidden_target.float() - aux.u.float(), aux.z.float(), beta, gamma).to(self.dtype)
        aux.a_top = top_preactivation(top_target.float() - aux.u_top.float(), y, head.classifier, beta, opt.code_weight, codes, opt.loss_weight).to(self.dtype)
        aux.z = solve_outputs(aux, weights, beta, gamma, self.dtype)

    def update_multipliers(self, aux: Auxiliaries, weights: LayerWeights, x: torch.Tensor) -> None:
        """Scaled dual ascent u_m += a_m − W_m z_{m−1} − b_m on the layers that carry multipliers."""
        if self.options.multipliers == "none":
            return
        hidden_target, top_target = preactivation_targets(weights, x, aux)
        aux.u_top = aux.u_top + (aux.a_top - top_target.to(self.dtype))
        if self.options.multipliers == "all":
            aux.u = aux.u + (aux.a - hidden_target.to(self.dtype))

    def objective_terms(self, aux: Auxiliaries, weights: LayerWeights, x: torch.Tensor, y: torch.Tensor, head: LinearCodeHead, state: dict) -> dict:
        """Terms of the augmented Lagrangian (per-sample means) and the constraint residuals."""
        beta, gamma = state["beta"], state["gamma"]
        hidden_target, top_target = preactivation_targets(weights, x, aux)
        lin_hidden = (aux.a.float() - hidden_target.float()).pow(2).sum(2).mean(1)  # per layer
        lin_top = (aux.a_top.float() - top_target.float()).pow(2).sum(1).mean()
        act = (aux.z.float() - torch.relu(aux.a.float())).pow(2).sum(2).mean(1)
        loss = (y - aux.a_top.float() @ head.classifier).pow(2).sum(1).mean()
        # ||z_m − f(z_{m−1})||: the network constraint itself, per layer (relative to ||z_m||).
        net_res = (aux.z.float() - torch.relu(hidden_target.float())).norm(dim=(1, 2)) / aux.z.float().norm(dim=(1, 2)).clamp_min(1e-12)
        top_res = (aux.a_top.float() - top_target.float()).norm() / aux.a_top.float().norm().clamp_min(1e-12)
        residuals = net_res.tolist() + [float(top_res)]
        ridge = sum(float(w.pow(2).sum()) for w in [weights.first, weights.hidden, weights.top])
        return {
            "loss": float(loss),
            "linear_penalty": float(beta / 2 * (lin_hidden.sum() + lin_top)),
            "activation_penalty": float(gamma / 2 * act.sum()),
            "ridge_penalty": self.options.ridge / 2 * ridge,
            "residual_max": max(residuals),
            "residual_mean": sum(residuals) / len(residuals),
            "residuals": residuals,
        }

    @torch.no_grad()
    def evaluate(self, encoder: DeepMLP, x: torch.Tensor, y: torch.Tensor, validation: Validation | None) -> dict:
        """mAP@all of plain forward-pass codes: training queries vs the training set, and the validation slice."""
        return evaluate_encoder(encoder, x, y, validation, self.options.eval_size, self.options.seed)


def rank_zero_value(value: float, device: torch.device) -> torch.Tensor:
    """Rank 0's value on every rank (a scalar decision all ranks must take alike)."""
    t = torch.tensor([value], device=device)
    broadcast_([t])
    return t[0]


def target_residuals(weights: LayerWeights, x: torch.Tensor, targets: Auxiliaries) -> torch.Tensor:
    """Per layer, ||target − (W z + b)|| / ||target|| after the weight step: how far each layer is from its target."""
    hidden, top = preactivation_targets(weights, x, targets)
    hidden_res = (targets.a.float() - hidden.float()).norm(dim=(1, 2)) / targets.a.float().norm(dim=(1, 2)).clamp_min(1e-12)
    top_res = (targets.a_top.float() - top.float()).norm() / targets.a_top.float().norm().clamp_min(1e-12)
    return torch.cat([hidden_res, top_res[None]])


def forward_codes(encoder: torch.nn.Module, features: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """±1 float codes of a plain forward pass, in batches, on the encoder's device."""
    tensor = next(iter([*encoder.parameters(), *encoder.buffers()]), torch.empty(0))  # shallow hashers hold buffers only
    device, dtype = tensor.device, tensor.dtype
    was_training = encoder.training
    encoder.eval()
    try:
        outs = [encoder(features[i : i + batch_size].to(device, dtype)) for i in range(0, len(features), batch_size)]
    finally:
        encoder.train(was_training)
    return binary_codes(torch.cat(outs).float())


def auxiliary_map(a_top: torch.Tensor, y: torch.Tensor, eval_size: int, seed: int) -> float:
    """Train mAP of the auxiliary codes sgn(a_M), to compare with the forward pass's (they should agree)."""
    generator = torch.Generator().manual_seed(seed)
    codes = binary_codes(a_top.float())
    pick = torch.randperm(len(codes), generator=generator)[: min(eval_size, len(codes))].to(codes.device)
    return mean_average_precision(codes[pick], y[pick], codes, y)


@torch.no_grad()
def evaluate_encoder(encoder: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, validation: Validation | None, eval_size: int, seed: int) -> dict:
    """Train mAP (eval_size training queries vs the training set) and validation mAP, forward-pass codes."""
    generator = torch.Generator().manual_seed(seed)
    codes = forward_codes(encoder, x)
    pick = torch.randperm(len(x), generator=generator)[: min(eval_size, len(x))].to(codes.device)
    out = {"train_map": mean_average_precision(codes[pick], y[pick], codes, y)}
    if validation is not None:
        q = forward_codes(encoder, validation.query)
        db = forward_codes(encoder, validation.database)
        out["val_map"] = mean_average_precision(q, validation.query_labels, db, validation.database_labels)
    return out
