"""VDSH: ADMM training of very deep plain ReLU MLPs for supervised hashing (Zhang, Chen & Saligrama, CVPR 2016).

Variables: the network's weights θ; a copy θ̃_k of them per data block k (the samples are cut into `blocks`
strided shards per process; under torch.distributed every rank holds its own blocks, which makes the θ-step
consensus ADMM); the classifier W; per sample i and layer m the auxiliary output z_{i,m} (z_{i,M} the real
top output) and its scaled multiplier u_{i,m}; a scaled multiplier v_k per copy; discrete codes b_i.
Augmented Lagrangian (all data terms summed over samples, the consensus term weighted by the block's size n_k):

    λ/2||θ||² + ω(Σ_i ½||y_i − Wᵀb_i||² + λ_W N/2 ||W||²) + ν/2 Σ_i ||b_i − z_{i,M}||²
  + β/2 Σ_{i,m} (||z_{i,m} − f_m(z_{i,m−1}; θ̃_k) + u_{i,m}||² − ||u_{i,m}||²)          z_{i,0} = x_i
  + γ/2 Σ_k n_k (||θ − θ̃_k + v_k||² − ||v_k||²)

f_m = relu(W_m z + b_m) for m < M, linear at the top; codes are b = sgn(F(x; θ)), a plain forward pass. The
hashing constraint b_i = sgn(z_{i,M}) is relaxed by the ν term, as SDH does; ℓ is SDH's squared loss.
One sweep (every update reads only its neighbours: z_m sees layers m−1, m, m+1; θ̃_{k,m} sees z_{m−1}, z_m):
  1. per block k, per chunk of its samples: the B-step (SDH's DCC on ||y − Wᵀb||² + ν||b − z_M||², or fixed
     class codewords with `codes='centres'`); then the z-steps: z_M exactly, z_m (m < M) by a prox-linear step
     (the upper constraint linearised, step 1/(β(1 + ||W_{m+1}||²))), in `order` 'odd-even' (all odd layers at
     once, then all even ones: the DESIGN's parallel order), 'backward' (Gauss–Seidel from the top down, which
     carries the top's pull through the whole depth in one sweep) or 'backward-forward' (then bottom-up, dlADMM's);
  2. θ̃_k, every layer independently and at once: the exact minimiser of its block's constraint terms plus the
     consensus term, with the ReLU inverted on the target (units that should be on are fitted to z + u; units
     that are off and should be off keep their pre-activation): a ridge solve per layer, one batched Cholesky;
  3. u_{i,m} += z_{i,m} − f_m(z_{i,m−1}; θ̃_k)  (every layer, every sweep; u and z persist across sweeps);
  4. θ = argmin λ/2||θ||² + γ/2 Σ_k n_k ||θ − θ̃_k + v_k||² (an all-reduce across ranks); W by ridge on all b;
     v_k += θ − θ̃_k; β and γ grow by `penalty_growth` (scaled multipliers shrink by it), so that the residuals
     go to zero and the forward network and the auxiliary network meet.
β and γ may differ per layer (`penalty_ratio`: β_{m+1} = r·β_m, γ likewise), one of the variants in the table.
Memory: z and u of every hidden layer for every training sample, 2·N·(M−1)·w numbers (bf16 with dtype).

Deviations from the paper, and why:
- The paper's local subproblems are solved by gradient steps; here z_M and θ̃ are exact (θ̃ on the inverted
  ReLU target, a least-squares surrogate) and z_m is one prox-linear step: every step is closed form.
- Data blocks, not single samples, carry weight copies: a copy per sample would need N copies of θ.
- The top's loss is SDH's squared loss with its DCC B-step (`codes='learned'`); `codes='centres'` (fixed
  codewords, CSQ-style) is our option, not the paper's. The loss weight ω and a classifier ridge per sample are
  ours too: with the plain squared loss Wᵀb overshoots y and classes end a few bits apart (thin margins).
- Hidden layers may start at the identity (`init`, the default), as ProxProp's and back-prop's rows do.
Measured figures, the variants tried and their residuals: BENCHMARKS.md, "ADMM variants" and "Training: … depth sweep".
The module is over 400 lines because it holds the whole algorithm, every step beside the next, to be read in one place.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from vdsh.index.metrics import mean_average_precision
from vdsh.training.trainers.base import Trainer
from vdsh.index.codes import sign_codes
from vdsh.training.code_head import CODE_TARGETS, class_codewords, ridge_classifier, target_codes
from vdsh.training.distributed import global_sum, rank_and_world, rank_zero_value
from vdsh.training.encoders.mlp import DeepMLP
from vdsh.training.stacked_mlp import LayerWeights, affine, start_plain_mlp, with_ones
from vdsh.training.validation import Validation, evaluate_encoder


@dataclass
class AdmmOptions:
    """VDSH ADMM options (see the module docstring for the role of each)."""

    sweeps: int = 20
    order: str = "backward"  # z-steps: 'backward' (top-down Gauss–Seidel), 'backward-forward' (then bottom-up), 'odd-even
    aux_iterations: int = 1  # rounds of z-steps per chunk and sweep
    nonnegative: bool = False  # project hidden z_m onto z ≥ 0 (ReLU outputs are never negative) in every z-step
    # β_{m+1}/β_m (and γ likewise): penalties growing towards the top let a lower z_m follow the layer above it
    # rather than its own constraint, so the top's pull is less attenuated on its way down (1: uniform β).
    penalty_ratio: float = 1.0
    blocks: int = 1  # data blocks per process, each with its own weight copy θ̃_k
    beta: float = 3.0  # β: weight of the layer constraints z_m = f_m(z_{m−1}; θ̃) (screened 1 and 3 at depth 8, mnist-5k)
    gamma: float = 1.0  # γ: weight of the consensus θ = θ̃_k (per sample of the block); also how far θ̃ moves per sweep
    nu: float = 1.0  # ν: coupling of the codes b to the real top output z_M
    # ω: weight of the classifier loss. A label fit's pull on a bit is the size of W's entries, ~1/(10·λ_W) of ν's
    # pull towards z_M; with ω = 1 the B-step returns sgn(z_M) and the labels never reach the network.
    loss_weight: float = 300.0
    penalty_growth: float = 1.05  # β and γ are multiplied by this after every sweep (continuation)
    ridge: float = 0.0  # λ: Ω(θ) = λ/2||θ||²
    # λ_W per sample (λ_W·N in all). Large, so that W stays small and the squared loss asks every code bit to agree
    # with its class: with a weak ridge Wᵀb overshoots y and classes end a few bits apart (thin margins).
    classifier_ridge: float = 10.0
    codes: str = "learned"  # 'learned' (SDH's B-step against W) or 'centres' (a fixed random codeword per class)
    bit_sweeps: int = 2  # DCC sweeps over the bits in the B-step
    init: str = "identity"  # hidden layers start as 'identity' (W = I, b = 0) or keep the encoder's 'msra' init
    chunk_size: int = 2000  # samples per z-step call (memory of the temporaries only; the maths is per sample)
    dtype: str = "float32"  # storage of z and u: 'float32' or 'bfloat16'; solves and statistics stay float32
    keep_best: bool = True  # return the consensus weights of the sweep with the best validation (else train) mAP
    device: str = "cpu"
    eval_every: int = 1  # sweeps between mAP evaluations (0: only at the end)
    eval_size: int = 1000  # training samples scored as queries against the training set
    seed: int = 0

    def __post_init__(self) -> None:
        if self.order not in ("backward", "backward-forward", "odd-even"):
            raise ValueError(f"order must be 'backward', 'backward-forward' or 'odd-even', got {self.order!r}")
        if self.codes not in CODE_TARGETS:
            raise ValueError(f"codes must be one of {CODE_TARGETS}, got {self.codes!r}")
        if self.init not in ("identity", "msra"):
            raise ValueError(f"init must be 'identity' or 'msra', got {self.init!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if min(self.beta, self.gamma, self.nu, self.loss_weight, self.classifier_ridge, self.penalty_ratio) <= 0 or self.ridge < 0 or self.penalty_growth < 1:
            raise ValueError("beta, gamma, nu, loss_weight, classifier_ridge and penalty_ratio must be > 0, ridge >= 0, penalty_growth >= 1")
        if min(self.sweeps, self.aux_iterations, self.blocks, self.chunk_size) < 1 or self.bit_sweeps < 0:
            raise ValueError("sweeps, aux_iterations, blocks and chunk_size must be >= 1, bit_sweeps >= 0")


@dataclass
class Auxiliaries:
    """Per-sample variables that persist across sweeps: z, u of the M−1 hidden layers (M−1, N, w); top z_M, u_M (N, bits)."""

    z: torch.Tensor
    u: torch.Tensor
    z_top: torch.Tensor
    u_top: torch.Tensor


@dataclass
class Block:
    """One data block: its samples (indices into the process's training set), weight copy θ̃_k and multiplier v_k."""

    index: torch.Tensor
    copy: LayerWeights
    v: LayerWeights = field(init=False)

    def __post_init__(self) -> None:
        self.v = LayerWeights(*(torch.zeros_like(t) for t in self.copy.tensors()))


def forward_outputs(weights: LayerWeights, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden outputs z_1..z_{M−1} stacked (M−1, N, w) and the top z_M of a plain forward pass."""
    zs, z = [], x
    for m in range(1 + len(weights.hidden)):
        z = torch.relu(affine(z, weights.first if m == 0 else weights.hidden[m - 1]))
        zs.append(z)
    return torch.stack(zs), affine(z, weights.top)


def preactivations(weights: LayerWeights, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """p_m = W_m z_{m−1} + b_m of every layer on the auxiliary inputs: hidden (M−1, n, w) and top (n, bits)."""
    first = affine(x, weights.first)[None]
    rest = affine(z[:-1], weights.hidden) if len(weights.hidden) else first[:0]
    return torch.cat([first, rest]), affine(z[-1], weights.top)


def upper_weights(weights: LayerWeights) -> list[torch.Tensor]:
    """W_{m+1} (without bias) for every hidden layer m: the weight reading z_m."""
    return [*weights.hidden[:, :, :-1].unbind(0), weights.top[:, :-1]]


def lipschitz_constants(weights: LayerWeights, iterations: int = 20) -> torch.Tensor:
    """||W_{m+1}||₂² for every hidden layer m, the Lipschitz constant of the upper constraint's gradient in z_m, by
    batched power iteration on W_{m+1}ᵀW_{m+1} (an SVD per layer cost a noticeable share of every sweep)."""
    def largest_eigenvalue(w: torch.Tensor) -> torch.Tensor:
        gram = w.transpose(-1, -2) @ w
        v = torch.ones(*gram.shape[:-1], 1, device=w.device)
        for _ in range(iterations):
            v = gram @ v
            v = v / v.norm(dim=-2, keepdim=True).clamp_min(1e-30)
        return (v.transpose(-1, -2) @ gram @ v)[..., 0, 0]

    return torch.cat([largest_eigenvalue(weights.hidden[:, :, :-1]), largest_eigenvalue(weights.top[:, :-1])[None]])


def upper_gradient(z_above: torch.Tensor, u_above: torch.Tensor, p_above: torch.Tensor, w_above: torch.Tensor, relu: bool) -> torch.Tensor:
    """∂/∂z_m of ½||z_{m+1} + u_{m+1} − f_{m+1}(z_m)||² at the current z_m (p_above = its pre-activation)."""
    residual = z_above + u_above - (torch.relu(p_above) if relu else p_above)
    if relu:
        residual = residual * (p_above > 0)
    return -residual @ w_above


def output_step(z: torch.Tensor, below: torch.Tensor, u: torch.Tensor, gradient: torch.Tensor, lipschitz: torch.Tensor | float,
                ratio: float = 1.0, nonnegative: bool = False) -> torch.Tensor:
    """Prox-linear z-step: argmin_z ½||z − (f_m(z_{m−1}) − u_m)||² + r(⟨g, z − z₀⟩ + L/2||z − z₀||²), r = β_{m+1}/β_m,
    over z ≥ 0 when `nonnegative` (a separable quadratic: the projection is exact)."""
    step = (below - u + ratio * (lipschitz * z - gradient)) / (1 + ratio * lipschitz)
    return step.clamp_min(0) if nonnegative else step


def top_step(p_top: torch.Tensor, u_top: torch.Tensor, codes: torch.Tensor, beta: float, nu: float) -> torch.Tensor:
    """z_M exactly: argmin β/2||z − p_M + u_M||² + ν/2||z − b||²."""
    return (beta * (p_top - u_top) + nu * codes) / (beta + nu)


def relu_targets(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Pre-activation targets whose ReLU is q = z + u: q where the unit should be on or is on; else keep p."""
    return torch.where((q > 0) | (p > 0), q, p)


@dataclass
class CopyStatistics:
    """Per-block sums of every layer's normal equations: Gram [z 1]ᵀ[z 1] and right side [z 1]ᵀT (float32)."""

    gram_first: torch.Tensor
    rhs_first: torch.Tensor
    gram_rest: torch.Tensor  # (M−1, w+1, w+1): inputs of W_2..W_M
    rhs_hidden: torch.Tensor  # (M−2, w+1, w)
    rhs_top: torch.Tensor
    count: int = 0

    def add(self, x: torch.Tensor, z: torch.Tensor, targets: torch.Tensor, top_target: torch.Tensor) -> None:
        x1, z1 = with_ones(x.float()), with_ones(z.float())
        self.gram_first += x1.T @ x1
        self.rhs_first += x1.T @ targets[0]
        self.gram_rest += torch.bmm(z1.transpose(1, 2), z1)
        self.rhs_hidden += torch.bmm(z1[:-1].transpose(1, 2), targets[1:].float())
        self.rhs_top += z1[-1].T @ top_target.float()
        self.count += len(x)

    @classmethod
    def zeros(cls, weights: LayerWeights) -> "CopyStatistics":
        d, w, bits = weights.first.shape[1], weights.first.shape[0], weights.top.shape[0]
        dev = weights.first.device
        return cls(torch.zeros(d, d, device=dev), torch.zeros(d, w, device=dev), torch.zeros(len(weights.hidden) + 1, w + 1, w + 1, device=dev),
                   torch.zeros(len(weights.hidden), w + 1, w, device=dev), torch.zeros(w + 1, bits, device=dev))


def solve_copy(stats: CopyStatistics, anchor: LayerWeights, beta: float, gamma: float) -> LayerWeights:
    """θ̃_k = argmin β/2 Σ_i ||T_i − θ̃[z_i 1]||² + γ n_k/2 ||θ̃ − anchor||², anchor = θ + v_k; all layers at once."""
    n = max(stats.count, 1)

    def system(gram: torch.Tensor) -> torch.Tensor:
        return beta * gram / n + gamma * torch.eye(gram.shape[-1], device=gram.device)

    first = torch.linalg.solve(system(stats.gram_first), beta * stats.rhs_first / n + gamma * anchor.first.T).T
    chol = torch.linalg.cholesky(system(stats.gram_rest))
    hidden = torch.cholesky_solve(beta * stats.rhs_hidden / n + gamma * anchor.hidden.transpose(1, 2), chol[:-1]).transpose(1, 2)
    top = torch.cholesky_solve(beta * stats.rhs_top / n + gamma * anchor.top.T, chol[-1]).T
    return LayerWeights(first.contiguous(), hidden.contiguous(), top.contiguous())


def auxiliary_map(z_top: torch.Tensor, y: torch.Tensor, eval_size: int, seed: int) -> float:
    """Train mAP of the auxiliary codes sgn(z_M), scored like the forward codes: the two agree when ADMM has converged."""
    generator = torch.Generator().manual_seed(seed)
    codes = sign_codes(z_top, z_top.dtype)
    pick = torch.randperm(len(codes), generator=generator)[: min(eval_size, len(codes))].to(codes.device)
    return mean_average_precision(codes[pick], y[pick], codes, y)


def combine(*terms: tuple[float, LayerWeights]) -> LayerWeights:
    """Σ c·θ over (c, θ) pairs, layer by layer."""
    return LayerWeights(*(sum(c * w.tensors()[i] for c, w in terms) for i in range(3)))


def squared_norm(weights: LayerWeights, layer_scale: torch.Tensor | None = None) -> float:
    """Σ_m c_m ||θ_m||² (c = 1 without `layer_scale`, one weight per layer m = 1..M)."""
    if layer_scale is None:
        return sum(float(t.pow(2).sum()) for t in weights.tensors())
    hidden = (layer_scale[1:-1] * weights.hidden.pow(2).sum((1, 2))).sum()
    return float(layer_scale[0] * weights.first.pow(2).sum() + hidden + layer_scale[-1] * weights.top.pow(2).sum())


class AdmmTrainer(Trainer):
    """Trains a plain DeepMLP by VDSH's ADMM; `fit` returns the encoder (consensus weights θ) and its history."""

    options_class = AdmmOptions
    takes_augmentation = True  # fresh each z-step: z_1 = f_1(x) then holds for shifted copies of a sample

    def fit(self, encoder: DeepMLP, features: torch.Tensor, labels: torch.Tensor, validation: Validation | None = None) -> tuple[DeepMLP, list[dict]]:
        opt = self.options
        device = torch.device(opt.device)
        x, y, theta = start_plain_mlp(encoder, features, labels, "AdmmTrainer", device, opt.seed, opt.init, torch.float32)
        self.state = self.initial_state(theta, x, y)
        history: list[dict] = []
        start = time.perf_counter()
        best: tuple[float, LayerWeights | None] = (-1.0, None)
        for sweep in range(1, opt.sweeps + 1):
            terms = self.sweep(x, y)
            record = {"sweep": sweep, "time": time.perf_counter() - start, **terms}
            if (opt.eval_every and sweep % opt.eval_every == 0) or sweep == opt.sweeps:
                self.state["theta"].write_to(encoder)
                record.update(evaluate_encoder(encoder, x, y, validation, opt.eval_size, opt.seed))
                record["train_map_auxiliary"] = auxiliary_map(self.state["aux"].z_top, y, opt.eval_size, opt.seed)
                score = rank_zero_value(record.get("val_map", record["train_map"]), device)  # ranks keep the same sweep
                if score > best[0]:
                    best = (score, self.state["theta"].clone())
            self.report(history, record)
        final = best[1] if opt.keep_best and best[1] is not None else self.state["theta"]
        final.write_to(encoder)
        return encoder, history

    def initial_state(self, theta: LayerWeights, x: torch.Tensor, y: torch.Tensor) -> dict:
        """Auxiliaries from a forward pass (every constraint met), zero multipliers, copies θ̃_k = θ, W on class codewords."""
        opt = self.options
        z, z_top = forward_outputs(theta, x)
        aux = Auxiliaries(z.to(self.dtype), torch.zeros_like(z, dtype=self.dtype), z_top, torch.zeros_like(z_top))
        blocks = [Block(torch.arange(k, len(x), opt.blocks, device=x.device), theta.clone()) for k in range(opt.blocks)]
        start_codes = class_codewords(y, z_top.shape[1], opt.seed)  # SDH starts from random codes
        samples = float(global_sum([torch.tensor(float(len(x)), device=x.device)])[0])
        state = {"theta": theta, "aux": aux, "blocks": blocks, "codes": start_codes.clone(), "beta": opt.beta, "gamma": opt.gamma,
                 "classifier_ridge": opt.classifier_ridge * samples, "samples": samples}
        state["classifier"] = ridge_classifier(start_codes, y, state["classifier_ridge"], reduce=global_sum)
        depth = len(theta.hidden) + 2
        state["layer_scale"] = opt.penalty_ratio ** -torch.arange(depth - 1, -1, -1.0, device=x.device)  # β_m / β_M, m = 1..M
        return state

    def sweep(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        """Steps 1–4 of the module docstring; returns the sweep's objective terms, residuals and multiplier norms."""
        opt, state = self.options, self.state
        beta, gamma, theta = state["beta"], state["gamma"], state["theta"]
        totals = {"penalty": 0.0, "code_term": 0.0}
        residual_sq = torch.zeros(len(theta.hidden) + 2, device=x.device)
        target_sq = torch.zeros_like(residual_sq)
        for block in state["blocks"]:
            stats = CopyStatistics.zeros(theta)
            lipschitz = lipschitz_constants(block.copy)
            chunks = [(idx, self.augment(x[idx]) if self.augment is not None else x[idx]) for idx in block.index.split(opt.chunk_size)]
            for idx, inputs in chunks:  # the same (augmented) inputs for the z-steps and the dual step of this sweep
                self.local_steps(block.copy, inputs, y[idx], idx, lipschitz, stats)
            block.copy = solve_copy(stats, combine((1, theta), (1, block.v)), beta, gamma)
            for idx, inputs in chunks:
                self.dual_step(block.copy, inputs, idx, totals, residual_sq, target_sq)
        state["theta"] = self.consensus()
        state["classifier"] = ridge_classifier(state["codes"], y, state["classifier_ridge"], reduce=global_sum)
        return self.close_sweep(y, totals, residual_sq, target_sq)

    def local_steps(self, copy: LayerWeights, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, lipschitz: torch.Tensor,
                    stats: CopyStatistics) -> None:
        """B-step and z-steps for one chunk of a block's samples, then its share of the θ̃_k statistics."""
        opt, state, aux = self.options, self.state, self.state["aux"]
        z, u = aux.z[:, idx].float(), aux.u[:, idx].float()
        z_top, u_top = aux.z_top[idx], aux.u_top[idx]
        codes = target_codes(opt.codes, z_top, y, state["classifier"], opt.nu / opt.loss_weight, opt.bit_sweeps, opt.seed)
        state["codes"][idx] = codes
        for _ in range(opt.aux_iterations):
            p, p_top = preactivations(copy, x, z)
            z_top = top_step(p_top, u_top, codes, state["beta"], opt.nu)
            if opt.order == "odd-even":
                self.odd_even_z_steps(copy, x, z, u, z_top, u_top, p, p_top, lipschitz)
            else:
                self.backward_z_steps(copy, z, u, z_top, u_top, p, p_top, lipschitz)
            if opt.order == "backward-forward":
                z_top = self.forward_z_steps(copy, x, z, u, z_top, u_top, codes, lipschitz)
        p, p_top = preactivations(copy, x, z)
        stats.add(x, z, relu_targets(p, z + u), z_top + u_top)
        aux.z[:, idx], aux.z_top[idx] = z.to(self.dtype), z_top

    def backward_z_steps(self, copy: LayerWeights, z: torch.Tensor, u: torch.Tensor, z_top: torch.Tensor, u_top: torch.Tensor,
                         p: torch.Tensor, p_top: torch.Tensor, lipschitz: torch.Tensor) -> None:
        """z_{M−1}, …, z_1 in turn, each reading its freshly updated upper neighbour (in place).

        The pre-activations p stay valid through the pass: p_{m+1} depends on z_m, which is updated only after it is read.
        """
        w_above = upper_weights(copy)
        above, u_above, p_above, relu = z_top, u_top, p_top, False
        for m in range(len(z) - 1, -1, -1):
            gradient = upper_gradient(above, u_above, p_above, w_above[m], relu)
            z[m] = output_step(z[m], torch.relu(p[m]), u[m], gradient, lipschitz[m], self.options.penalty_ratio, self.options.nonnegative)
            above, u_above, p_above, relu = z[m], u[m], p[m], True

    def forward_z_steps(self, copy: LayerWeights, x: torch.Tensor, z: torch.Tensor, u: torch.Tensor, z_top: torch.Tensor,
                        u_top: torch.Tensor, codes: torch.Tensor, lipschitz: torch.Tensor) -> torch.Tensor:
        """z_1, …, z_{M−1}, then z_M, each reading its freshly updated lower neighbour (dlADMM's forward pass; in place)."""
        opt = self.options
        w_above = upper_weights(copy)
        below = x
        for m in range(len(z)):
            p = affine(below, copy.first if m == 0 else copy.hidden[m - 1])
            last = m == len(z) - 1
            p_above = affine(z[m], copy.top if last else copy.hidden[m])
            above, u_above = (z_top, u_top) if last else (z[m + 1], u[m + 1])
            gradient = upper_gradient(above, u_above, p_above, w_above[m], relu=not last)
            z[m] = output_step(z[m], torch.relu(p), u[m], gradient, lipschitz[m], opt.penalty_ratio, opt.nonnegative)
            below = z[m]
        return top_step(affine(below, copy.top), u_top, codes, self.state["beta"], opt.nu)

    def odd_even_z_steps(self, copy: LayerWeights, x: torch.Tensor, z: torch.Tensor, u: torch.Tensor, z_top: torch.Tensor,
                         u_top: torch.Tensor, p: torch.Tensor, p_top: torch.Tensor, lipschitz: torch.Tensor) -> None:
        """All hidden layers of one parity at once (they share no neighbour), then the other parity (in place)."""
        hidden = copy.hidden[:, :, :-1]
        for parity in (len(z) - 1) % 2, len(z) % 2:  # the parity next to the top first
            if parity != (len(z) - 1) % 2:
                p, p_top = preactivations(copy, x, z)
            chosen = torch.arange(parity, len(z), 2, device=z.device)
            inner = chosen[chosen < len(z) - 1]  # layers whose upper neighbour is hidden
            gradient = torch.empty_like(z[chosen])
            if len(inner):
                gradient[: len(inner)] = torch.bmm(
                    -((z[inner + 1] + u[inner + 1] - torch.relu(p[inner + 1])) * (p[inner + 1] > 0)), hidden[inner])
            if len(inner) < len(chosen):  # the last hidden layer reads the top
                gradient[-1] = upper_gradient(z_top, u_top, p_top, copy.top[:, :-1], relu=False)
            z[chosen] = output_step(z[chosen], torch.relu(p[chosen]), u[chosen], gradient, lipschitz[chosen, None, None],
                                    self.options.penalty_ratio, self.options.nonnegative)

    def dual_step(self, copy: LayerWeights, x: torch.Tensor, idx: torch.Tensor, totals: dict, residual_sq: torch.Tensor,
                  target_sq: torch.Tensor) -> None:
        """u += z − f(z_{m−1}; θ̃_k) for a chunk; accumulates the penalty terms and per-layer residuals for the record."""
        aux, state = self.state["aux"], self.state
        z, u = aux.z[:, idx].float(), aux.u[:, idx].float()
        p, p_top = preactivations(copy, x, z)
        r, r_top = z - torch.relu(p), aux.z_top[idx] - p_top
        u, u_top = u + r, aux.u_top[idx] + r_top
        aux.u[:, idx], aux.u_top[idx] = u.to(self.dtype), u_top
        hidden_terms = ((r + u).pow(2) - u.pow(2)).sum((1, 2))
        totals["penalty"] += state["beta"] / 2 * float((state["layer_scale"][:-1] * hidden_terms).sum() + (r_top + u_top).pow(2).sum() - u_top.pow(2).sum())
        totals["code_term"] += self.options.nu / 2 * float((state["codes"][idx] - aux.z_top[idx]).pow(2).sum())
        residual_sq += torch.cat([r.pow(2).sum((1, 2)), r_top.pow(2).sum()[None]])
        target_sq += torch.cat([z.pow(2).sum((1, 2)), aux.z_top[idx].pow(2).sum()[None]])

    def consensus(self) -> LayerWeights:
        """θ_m = γ_m Σ_k n_k (θ̃_k − v_k) / (λ + γ_m Σ_k n_k), summed over every rank's blocks; then v_k += θ − θ̃_k."""
        opt, state = self.options, self.state
        gamma = state["gamma"]
        blocks = state["blocks"]
        local = combine(*((len(b.index), combine((1, b.copy), (-1, b.v))) for b in blocks))
        count = torch.tensor(float(sum(len(b.index) for b in blocks)), device=local.first.device)
        *sums, total = global_sum([*local.tensors(), count])
        scale = state["layer_scale"]  # γ_m = γ·c_m: the ridge λ weighs alike on every layer
        gammas = (gamma * scale[0], gamma * scale[1:-1, None, None], gamma * scale[-1])
        theta = LayerWeights(*(g * s / (opt.ridge + g * total) for g, s in zip(gammas, sums)))
        for b in blocks:
            b.v = combine((1, b.v), (1, theta), (-1, b.copy))
        return theta

    def close_sweep(self, y: torch.Tensor, totals: dict, residual_sq: torch.Tensor, target_sq: torch.Tensor) -> dict:
        """The augmented Lagrangian (per sample) and its parts at the sweep's end, residuals, multiplier norms; then continuation."""
        opt, state = self.options, self.state
        theta, gamma = state["theta"], state["gamma"]
        residual_sq, target_sq = global_sum([residual_sq, target_sq])
        n = state["samples"]
        loss_sum = opt.loss_weight / 2 * float((y - state["codes"] @ state["classifier"]).pow(2).sum())
        consensus, copy_gap, v_norm = 0.0, 0.0, 0.0
        for b in state["blocks"]:
            scale = state["layer_scale"]
            consensus += gamma / 2 * len(b.index) * (squared_norm(combine((1, theta), (-1, b.copy), (1, b.v)), scale) - squared_norm(b.v, scale))
            copy_gap += squared_norm(combine((1, theta), (-1, b.copy)))
            v_norm += squared_norm(b.v)
        sums = global_sum([torch.tensor([loss_sum, consensus, copy_gap, v_norm, totals["penalty"], totals["code_term"]], device=y.device)])[0]
        loss_sum, consensus, copy_gap, v_norm, penalty, code_term = sums.tolist()
        blocks = opt.blocks * rank_and_world()[1]
        regulariser = opt.ridge / 2 * squared_norm(theta) + opt.loss_weight * state["classifier_ridge"] / 2 * float(state["classifier"].pow(2).sum())
        lagrangian = (loss_sum + code_term + penalty + consensus + regulariser) / n
        aux = state["aux"]
        u_norms = torch.cat([aux.u.float().pow(2).sum((1, 2)), aux.u_top.pow(2).sum()[None]])
        u_norms = (global_sum([u_norms])[0] / n).sqrt()
        residuals = (residual_sq / target_sq.clamp_min(1e-12)).sqrt()
        active = (aux.z.float() > 0).float().mean((1, 2))
        record = {
            "loss": loss_sum / n, "lagrangian": lagrangian, "penalty": penalty / n, "code_term": code_term / n,
            "residuals": residuals.tolist(), "residual_max": float(residuals.max()), "residual_mean": float(residuals.mean()),
            "multiplier_norms": u_norms.tolist(), "consensus_gap": (copy_gap / max(blocks, 1)) ** 0.5 / max(squared_norm(theta) ** 0.5, 1e-12),
            "consensus_multiplier_norm": (v_norm / max(blocks, 1)) ** 0.5, "beta": state["beta"], "gamma": gamma,
            "active_fraction": active.tolist(), "mean_output": aux.z.float().mean((1, 2)).tolist(),
        }
        growth = opt.penalty_growth
        state["beta"], state["gamma"] = state["beta"] * growth, gamma * growth
        if growth != 1:  # scaled multipliers u = y/β: the same unscaled multipliers under the larger penalty
            aux.u /= growth
            aux.u_top /= growth
            for b in state["blocks"]:
                b.v = combine((1 / growth, b.v))
        return record
