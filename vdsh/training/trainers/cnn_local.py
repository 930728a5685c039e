"""Block-wise local updates for CNN encoders: VDSH's splitting over conv blocks, as a quadratic penalty.

Not ADMM at its defaults: auxiliaries and multipliers live for one mini-batch and `inner_iterations` is 1, so
the multipliers never act (VDSH's ADMM, with persistent auxiliaries and live multipliers, is `admm` on MLPs).

Splitting. The encoder is cut into blocks f_1 … f_M by `ImageEncoder.blocks()` (its conv stages, the
hashing head last; a view sharing the encoder's modules). For a mini-batch every sample i carries an
auxiliary output z_m of every block (feature maps for the conv stages, the real hashing output z_M at
the top) and scaled multipliers u_m; the augmented Lagrangian (sums over the batch)

    μ/2 ||z_M − B||²                                 top: the pull towards the discrete codes B
  + β/2 Σ_m ||z_m − f_m(z_{m−1}) + u_m||²            one constraint per block, z_0 = x the images

couples every auxiliary to the block below (f_m) and the block above (f_{m+1}) only. Per mini-batch:
  0. auxiliaries from a plain forward pass of the current blocks, multipliers at zero;
  1. top (`code_head.target_codes`): codes B ∈ {±1}, by default each class's fixed random codeword
     (`codes='centres'`), or SDH's discrete step near the forward outputs F, argmin ||Y − BC||² + ν||B − F||²
     (`codes='learned'`); the classifier C moves towards the ridge regression on B
     (`code_head.ridge_classifier`) by a running mean across mini-batches;
  2. auxiliaries, top-down: z_M in closed form (`code_head.top_preactivation`), then z_{M−1} … z_1, each by
     `aux_steps` gradient steps on ½||z_m − f_m(z_{m−1}) + u_m||² + ½||z_{m+1} + u_{m+1} − f_{m+1}(z_m)||²
     with its neighbours fixed, the gradient taken through block m+1 to its input only;
  3. weights, every block alone on its input and target (both detached): the linear head by ridge
     regression with a proximal pull ρ (closed form), each conv block by `weight_steps` AdamW steps
     on ||z_m + u_m − f_m(input)||², its optimiser holding only its own parameters. No gradient ever
     crosses a block boundary, and the blocks' problems are independent (they could run in parallel);
  4. multipliers u_m += z_m − f_m(input_m); steps 2–4 repeat for `inner_iterations`.
Codes are sgn(f_M ∘ … ∘ f_1(x)), a plain forward pass, like every encoder's.

Measured figures and the A/B runs behind the defaults: BENCHMARKS.md, "CNN trainers". With forward-initialised
auxiliaries, one auxiliary step of size 1 (the exact minimiser of the local problem with the block above
linearised) leaves z_m − f_m = the back-propagated error of μ/(β+μ)·½||f − B||² at block m, so each conv block's
first local step follows the back-prop gradient of the code loss (tests check it). Two inner iterations with
live multipliers diverged (NaN) on mnist-sample, hence the default of one.

Choices that are ours, not the paper's (which trains plain MLPs, full batch, closed form):
- auxiliaries and multipliers live for one mini-batch (CNN activations of the whole set do not fit),
  so multipliers act only across the `inner_iterations` of a batch; at the default 1 the method is a
  quadratic-penalty splitting;
- conv blocks (BatchNorm, ReLU, pooling) have no closed-form step: a few gradient steps instead;
- auxiliaries are updated top-down (Gauss–Seidel), not odd/even in parallel: with 3–6 blocks one pass
  carries the code pull to the first block, where odd/even rounds would need M of them;
- a block's weight step reads the forward activation of the block below (`fit_inputs='forward'`, what
  it sees at test time), as the MLP trainer does by default;
- with codes='learned', the classifier starts random (SDH starts from random codes): the codes of a
  random CNN are correlated across classes, so ridge on them makes class codes closer (see above);
- BatchNorm normalises by batch statistics in every step, but its running averages (used at test time)
  move only in the weight steps, never while auxiliaries are probed;
- AdamW state and a one-cycle schedule per block persist across mini-batches; the weights kept are those
  of the epoch with the best validation (else training) mAP of forward-pass codes.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from vdsh.training.trainers.base import Trainer
from vdsh.training.code_head import target_codes, top_preactivation
from vdsh.training.validation import Validation, evaluate_encoder
from vdsh.training.trainers.backprop import BackpropOptions, make_schedule
from vdsh.training.encoders.cnn import ImageEncoder
from vdsh.training.code_head import LinearCodeHead, ridge_classifier, squared_loss


@dataclass
class CnnLocalOptions:
    """Block-wise local-update options (see the module docstring for the role of each)."""

    epochs: int = 4
    batch_size: int = 128
    inner_iterations: int = 1  # iterations of steps 2-4 per mini-batch; above 1 the multipliers act (ADMM within a batch)
    aux_steps: int = 1  # gradient steps per auxiliary update
    aux_step_size: float = 1.0  # 1: one step solves the local problem with the block above linearised
    weight_steps: int = 2  # AdamW steps of each conv block's local problem per iteration
    lr: float = 2e-2  # peak AdamW learning rate of those (4e-2 was screened on the sample with 1 weight step)
    schedule: str = "onecycle"  # learning-rate schedule over mini-batches: 'onecycle', 'cosine', 'step' or 'constant'
    weight_decay: float = 5e-4  # AdamW's decoupled decay; also the ridge λ of the head's regression
    beta: float = 1.0  # weight of the block constraints (and of their multipliers)
    code_weight: float = 1.0  # μ: pull of the top auxiliary towards the discrete codes B (margin 1)
    codes: str = "centres"  # top targets B: 'centres' (a fixed random codeword per class) or 'learned' (SDH's B-step)
    nu: float = 0.001  # ν: closeness of the codes B to the forward outputs in the learned B-step
    bit_sweeps: int = 2  # DCC sweeps over the bits in the B-step
    classifier_ridge: float = 1.0  # λ of the classifier's ridge regression on the codes
    classifier_decay: float = 0.99  # running-mean decay of the classifier across mini-batches
    # Proximal pull of the head's closed-form step (of 0.1, 1 and 10, screened with 1 weight step, the smallest did
    # best); None: AdamW steps like the conv blocks.
    linear_rho: float | None = 0.1
    fit_inputs: str = "forward"  # inputs of the weight steps: 'forward' activations or 'auxiliary' z_{m-1}
    multipliers: bool = True  # scaled multipliers (augmented Lagrangian) or a pure quadratic penalty
    keep_best: bool = True
    device: str = "cpu"
    eval_every: int = 1  # epochs between mAP evaluations (0: only at the end)
    eval_size: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.schedule not in ("onecycle", "cosine", "step", "constant"):
            raise ValueError(f"schedule must be onecycle, cosine, step or constant, got {self.schedule!r}")
        if self.codes not in ("centres", "learned"):
            raise ValueError(f"codes must be 'centres' or 'learned', got {self.codes!r}")
        if self.fit_inputs not in ("forward", "auxiliary"):
            raise ValueError(f"fit_inputs must be 'forward' or 'auxiliary', got {self.fit_inputs!r}")
        if min(self.epochs, self.batch_size, self.inner_iterations, self.weight_steps) < 1:
            raise ValueError("epochs, batch_size, inner_iterations and weight_steps must be >= 1")
        if self.aux_steps < 0 or self.bit_sweeps < 0:
            raise ValueError("aux_steps and bit_sweeps must be >= 0")
        if min(self.beta, self.lr, self.aux_step_size, self.classifier_ridge) <= 0 or min(self.code_weight, self.nu) < 0:
            raise ValueError("beta, lr, aux_step_size and classifier_ridge must be > 0; code_weight and nu >= 0")
        if self.linear_rho is not None and self.linear_rho < 0:
            raise ValueError(f"linear_rho must be >= 0 or None, got {self.linear_rho}")
        if not 0.0 <= self.classifier_decay < 1.0:
            raise ValueError(f"classifier_decay must be in [0, 1), got {self.classifier_decay}")


@contextmanager
def frozen_running_stats(module: nn.Module) -> Iterator[None]:
    """BatchNorm still normalises by batch statistics, but its running averages stay where they are."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0  # running = (1 - 0)·running + 0·batch
    try:
        yield
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum


@torch.no_grad()
def block_outputs(blocks: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    """f_1(x), f_2(f_1(x)), …: every block's output of a forward pass (running statistics untouched)."""
    outputs, z = [], x
    with frozen_running_stats(blocks):
        for block in blocks:
            z = block(z)
            outputs.append(z)
    return outputs


def auxiliary_update(z: torch.Tensor, below: torch.Tensor, block_above: nn.Module, above: torch.Tensor,
                     steps: int, step_size: float) -> torch.Tensor:
    """Gradient steps on ½||z − below||² + ½||above − f_{m+1}(z)||² for z alone; returns the new z (detached).

    below = f_m(z_{m−1}) − u_m and above = z_{m+1} + u_{m+1} are fixed; the gradient flows through the
    block above to its input only (torch.autograd.grad w.r.t. z: no parameter gradient is made).
    """
    z = z.detach()
    for _ in range(steps):
        z.requires_grad_(True)
        misfit = 0.5 * (above - block_above(z)).pow(2).sum()
        (grad,) = torch.autograd.grad(misfit, z)
        z = (z - step_size * ((z - below) + grad)).detach()
    return z


def local_weight_step(block: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, target: torch.Tensor,
                      steps: int) -> float:
    """Fit one block to its target from its input, both fixed: ||target − f_m(inputs)||², mean per element."""
    inputs, target = inputs.detach(), target.detach()
    for _ in range(steps):
        loss = nn.functional.mse_loss(block(inputs), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def linear_block_solve(linear: nn.Linear, inputs: torch.Tensor, target: torch.Tensor, ridge: float, rho: float) -> float:
    """The exact local step of a linear block: ridge regression of target on [inputs 1] with a proximal pull ρ.

    [W b]ᵀ = (ZᵀZ/n + (λ + ρ)I)⁻¹ (ZᵀT/n + ρ[W b]ᵀ_prev), Z = [inputs 1]: the MLP trainer's weight step on one batch.
    """
    z = torch.cat([inputs.float(), torch.ones(len(inputs), 1, device=inputs.device)], 1)
    previous = torch.cat([linear.weight, linear.bias[:, None]], 1)
    system = z.T @ z / len(z) + (ridge + rho) * torch.eye(z.shape[1], device=z.device)
    solved = torch.linalg.solve(system, z.T @ target.float() / len(z) + rho * previous.T).T
    linear.weight.copy_(solved[:, :-1])
    linear.bias.copy_(solved[:, -1])
    return float(nn.functional.mse_loss(linear(inputs), target))


@dataclass
class BatchState:
    """A mini-batch's splitting variables: inputs x, auxiliaries z_1..z_M (z_M the top), multipliers u_1..u_M."""

    x: torch.Tensor
    z: list[torch.Tensor]
    u: list[torch.Tensor]

    def block_input(self, m: int) -> torch.Tensor:
        return self.x if m == 0 else self.z[m - 1]


class CnnLocalTrainer(Trainer):
    """Trains an `ImageEncoder` (small_cnn, resnet9, dwsep) by block-wise local updates; `fit` -> (encoder, history)."""

    options_class = CnnLocalOptions
    takes_augmentation = True  # applied to each mini-batch on the device
    classifier: torch.Tensor | None = None  # the code step's classifier C, set by the first mini-batch of a fit

    def fit(self, encoder: ImageEncoder, images: torch.Tensor, labels: torch.Tensor,
            validation: Validation | None = None) -> tuple[ImageEncoder, list[dict]]:
        """images: prepared (normalised) float (N, C, H, W); labels: multi-hot (N, L)."""
        check_image_problem(encoder, images, labels)
        opt = self.options
        torch.manual_seed(opt.seed)
        device = torch.device(opt.device)
        encoder.to(device).train()
        x, y = images.to(device).float(), labels.to(device).float()
        blocks = encoder.blocks()
        optimizers = [None if self.closed_form(block) else torch.optim.AdamW(block.parameters(), lr=opt.lr, weight_decay=opt.weight_decay)
                      for block in blocks]
        steps_per_epoch = math.ceil(len(x) / opt.batch_size)
        schedule_options = BackpropOptions(epochs=opt.epochs, lr=opt.lr, schedule=opt.schedule)
        schedules = [make_schedule(optimizer, schedule_options, steps_per_epoch) for optimizer in optimizers if optimizer]
        self.classifier = None
        history: list[dict] = []
        best: tuple[float, dict | None] = (-1.0, None)
        best_epoch = 0
        start = time.perf_counter()
        for epoch in range(1, opt.epochs + 1):
            terms = self.run_epoch(blocks, optimizers, schedules, x, y)
            record = {"epoch": epoch, "sweep": epoch, "time": time.perf_counter() - start, **terms}
            if (opt.eval_every and epoch % opt.eval_every == 0) or epoch == opt.epochs:
                record.update(evaluate_encoder(encoder, x, y, validation, opt.eval_size, opt.seed))
                encoder.train()
                score = record.get("val_map", record["train_map"])
                if score > best[0]:
                    best, best_epoch = (score, copy.deepcopy(encoder.state_dict())), epoch
                record["best_epoch"] = best_epoch
            self.report(history, record)
        if opt.keep_best and best[1] is not None:
            encoder.load_state_dict(best[1])
        return encoder.eval(), history

    def run_epoch(self, blocks: nn.Sequential, optimizers: list[torch.optim.Optimizer | None],
                  schedules: list[torch.optim.lr_scheduler.LRScheduler], x: torch.Tensor, y: torch.Tensor) -> dict:
        """One pass over shuffled mini-batches; the batch terms averaged, the last batch's residuals per block."""
        totals: dict[str, float] = {}
        batches = 0
        for idx in torch.randperm(len(x), device=x.device).split(self.options.batch_size):
            inputs = self.augment(x[idx]) if self.augment else x[idx]
            terms = self.batch_step(blocks, optimizers, inputs, y[idx])
            for schedule in schedules:
                schedule.step()
            residuals = terms.pop("residuals")
            for key, value in terms.items():
                totals[key] = totals.get(key, 0.0) + value
            batches += 1
        record = {**{k: v / batches for k, v in totals.items()}, "residuals": residuals}
        if not math.isfinite(record["block_fit"]):
            record["diverged"] = True
        return record

    def batch_step(self, blocks: nn.Sequential, optimizers: list[torch.optim.Optimizer | None], x: torch.Tensor,
                   y: torch.Tensor) -> dict:
        """Steps 0-4 of the module docstring on one mini-batch; returns its objective terms."""
        opt = self.options
        forward = block_outputs(blocks, x)
        codes = self.code_step(forward[-1].float(), y)
        terms = {"code_loss": float(squared_loss(codes, y, ridge_classifier(codes, y, opt.classifier_ridge))),
                 "forward_code_loss": LinearCodeHead(opt.classifier_ridge).fit(forward[-1].float(), y)[1]}
        state = BatchState(x, [z.clone() for z in forward], [torch.zeros_like(z) for z in forward])
        for iteration in range(opt.inner_iterations):
            if iteration > 0 and opt.fit_inputs == "forward":
                forward = block_outputs(blocks, x)
            self.update_auxiliaries(blocks, state, y, codes)
            inputs = [x, *forward[:-1]] if opt.fit_inputs == "forward" else [state.block_input(m) for m in range(len(blocks))]
            fits = [self.weight_step(block, optimizer, inputs[m], state.z[m] + state.u[m])
                    for m, (block, optimizer) in enumerate(zip(blocks, optimizers))]
            residuals = self.update_multipliers(blocks, state, inputs)
        return {**terms, "block_fit": sum(fits) / len(fits), "residual_max": max(residuals),
                "residual_mean": sum(residuals) / len(residuals), "residuals": residuals}

    def closed_form(self, block: nn.Module) -> bool:
        """Whether a block's local problem is solved exactly: a linear block (the head), unless linear_rho is None."""
        return isinstance(block, nn.Linear) and self.options.linear_rho is not None

    def weight_step(self, block: nn.Module, optimizer: torch.optim.Optimizer | None, inputs: torch.Tensor,
                    target: torch.Tensor) -> float:
        """A block's local problem: closed form for a linear block (the head), local AdamW steps otherwise."""
        opt = self.options
        if self.closed_form(block):
            return linear_block_solve(block, inputs, target, opt.weight_decay, opt.linear_rho)
        return local_weight_step(block, optimizer, inputs, target, opt.weight_steps)

    def code_step(self, forward_top: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Discrete codes B near the forward outputs that fit the labels; the classifier C blended towards ridge on B."""
        opt = self.options
        if self.classifier is None:
            generator = torch.Generator().manual_seed(opt.seed)
            self.classifier = torch.randn(forward_top.shape[1], y.shape[1], generator=generator).to(y.device)
        codes = target_codes(opt.codes, forward_top, y, self.classifier, opt.nu, opt.bit_sweeps, opt.seed)
        fitted = ridge_classifier(codes, y, opt.classifier_ridge)
        self.classifier = opt.classifier_decay * self.classifier + (1 - opt.classifier_decay) * fitted
        return codes

    @torch.no_grad()
    def update_auxiliaries(self, blocks: nn.Sequential, state: BatchState, y: torch.Tensor, codes: torch.Tensor) -> None:
        """The top in closed form, then z_{M−1} … z_1 top-down, each from its two neighbours only."""
        opt = self.options
        top = len(blocks) - 1
        with frozen_running_stats(blocks):
            target = blocks[top](state.block_input(top)) - state.u[top]
            state.z[top] = top_preactivation(target, y, self.classifier, opt.beta, opt.code_weight, codes, loss_weight=0.0)
            for m in range(top - 1, -1, -1):
                below = blocks[m](state.block_input(m)) - state.u[m]
                above = state.z[m + 1] + state.u[m + 1]
                with torch.enable_grad():
                    state.z[m] = auxiliary_update(state.z[m], below, blocks[m + 1], above, opt.aux_steps, opt.aux_step_size)

    @torch.no_grad()
    def update_multipliers(self, blocks: nn.Sequential, state: BatchState, inputs: list[torch.Tensor]) -> list[float]:
        """u_m += z_m − f_m(input_m), the constraint as the weight step fitted it (input: forward or auxiliary z_{m−1});
        returns each block's relative residual."""
        residuals = []
        with frozen_running_stats(blocks):
            for m, block in enumerate(blocks):
                gap = state.z[m] - block(inputs[m])
                residuals.append(float(gap.norm() / state.z[m].norm().clamp_min(1e-12)))
                if self.options.multipliers:
                    state.u[m] += gap
        return residuals


def check_image_problem(encoder: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
    """The block-wise trainer's precondition: an ImageEncoder (it has blocks), its image shape, one label row per image."""
    if not isinstance(encoder, ImageEncoder):
        raise ValueError(f"CnnLocalTrainer trains a CNN encoder (small_cnn, resnet9, dwsep), got {type(encoder).__name__}")
    encoder.check_input(images)
    if labels.ndim != 2 or len(labels) != len(images):
        raise ValueError(f"labels must be multi-hot (N, L) with one row per image, got {tuple(labels.shape)} for {len(images)} images")

