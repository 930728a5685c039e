"""Semantic hashing (Salakhutdinov & Hinton, 2009; the autoencoder of Hinton & Salakhutdinov, 2006): stacked
RBMs, unrolled into a deep autoencoder.

Unsupervised: labels are only used to score validation codes.
  1. pretraining, layer by layer, by contrastive divergence (CD-1): a Gaussian–Bernoulli RBM on the
     real-valued input, standardised pixel by pixel (each input unit has mean 0 and variance 1 on the
     training set, what the RBM's unit-variance visibles assume), then Bernoulli–Bernoulli RBMs on the hidden
     probabilities of the layer below, the last one with `bits` hidden units;
  2. unrolling: encoder = the RBMs' up-passes, decoder = their transposes, sigmoid everywhere except
     the Gaussian (linear) reconstruction of the input;
  3. fine-tuning the autoencoder on squared reconstruction error, with Gaussian noise added to the code
     layer's input so that its logistic units are pushed to 0 or 1 (the paper's "deterministic noise": drawn
     once per mini-batch), by `finetune`: 'lbfgs' is the published recipe in torch.optim's form (a batch
     line-search method on mini-batches of 1,000, 3 iterations each); 'adam', the default, takes mini-batch
     Adam steps, which cost a fraction of L-BFGS's line searches per epoch on a CPU;
  4. codes: the code layer thresholded at ½, i.e. the sign of its pre-activation. With `balance`,
     the threshold is moved to each unit's training median (every bit splits the data in half), a
     common fix for codes whose units are mostly on or mostly off.
The result is a `SigmoidEncoder` (registered kind "sigmoid-mlp") on raw input: the standardisation is folded
into its first layer. Sigmoid hidden layers, a linear top.
Deviations from the papers: L-BFGS stands in for the conjugate gradients of Rasmussen's `minimize` (torch.optim
has no CG); the per-pixel std is floored (`pixel_std_floor`) so that near-constant pixels are not blown up;
Adam is the default (above); `balance` is ours; an RBM whose reconstruction error blows up (`DIVERGED`: the
Gaussian layer on 1,280 backbone features at the default step) starts again at a tenth of its step, at most
`RBM_RESTARTS` times, and its history records the step it kept; the papers' word-count (constrained Poisson)
input layer is not implemented: the inputs here are image features, hence the Gaussian visibles.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from vdsh.training.trainers.base import Trainer
from vdsh.training.encoders.sigmoid_mlp import SigmoidEncoder
from vdsh.training.validation import Validation, evaluate_encoder


RBM_RESTARTS = 2  # restarts of a diverged RBM, each at a tenth of the previous step
DIVERGED = 10.0  # an RBM has diverged when its reconstruction error exceeds this many times that of zeros


@dataclass
class SemanticHashingOptions:
    rbm_epochs: int = 10
    rbm_lr: float = 0.05  # Bernoulli–Bernoulli layers
    gaussian_lr: float = 0.01  # the Gaussian–Bernoulli first layer needs a smaller step (unbounded visibles)
    momentum: float = 0.9
    weight_decay: float = 2e-4
    batch_size: int = 100
    finetune_epochs: int = 10
    finetune: str = "adam"  # 'adam' (mini-batch Adam) or 'lbfgs' (the paper's batch line-search method; see the module docstring)
    finetune_lr: float = 1e-3  # Adam's step; L-BFGS's first step scale
    lbfgs_batch_size: int = 1000  # the paper's mini-batches of 1,000 for its line-search optimiser
    lbfgs_iterations: int = 3  # L-BFGS iterations (each with a strong-Wolfe line search) per mini-batch, as the paper's 3 line searches
    pixel_std_floor: float = 0.1  # per-pixel std floored at this fraction of the mean std (near-constant pixels)
    code_noise: float = 4.0  # std of the noise added to the code layer's input during fine-tuning (paper: 4)
    balance: bool = True
    device: str = "cpu"
    eval_every: int = 1
    eval_size: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.rbm_epochs, self.finetune_epochs) < 0 or min(self.batch_size, self.lbfgs_batch_size, self.lbfgs_iterations) < 1:
            raise ValueError("epochs must be >= 0, batch sizes and lbfgs_iterations >= 1")
        if self.finetune not in ("adam", "lbfgs"):
            raise ValueError(f"finetune must be 'adam' or 'lbfgs', got {self.finetune!r}")
        if self.pixel_std_floor <= 0:
            raise ValueError(f"pixel_std_floor must be > 0, got {self.pixel_std_floor}")


@dataclass
class Rbm:
    """weight (visible, hidden), visible bias, hidden bias; `gaussian`: real-valued, unit-variance visibles."""

    weight: torch.Tensor
    visible_bias: torch.Tensor
    hidden_bias: torch.Tensor
    gaussian: bool

    @classmethod
    def initial(cls, visible: torch.Tensor, hidden: int, gaussian: bool, generator: torch.Generator) -> "Rbm":
        weight = 0.01 * torch.randn(visible.shape[1], hidden, generator=generator).to(visible)
        # Visible biases at the data's mean (log-odds for Bernoulli units): Hinton's practical guide.
        mean = visible.mean(0)
        vbias = mean if gaussian else torch.logit(mean.clamp(1e-3, 1 - 1e-3))
        return cls(weight, vbias, torch.zeros(hidden, dtype=visible.dtype, device=visible.device), gaussian)

    def hidden_probabilities(self, v: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(v @ self.weight + self.hidden_bias)

    def visible_mean(self, h: torch.Tensor) -> torch.Tensor:
        pre = h @ self.weight.T + self.visible_bias
        return pre if self.gaussian else torch.sigmoid(pre)


def cd1_gradients(rbm: Rbm, v: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """CD-1 estimates of the log-likelihood gradient (weight, visible bias, hidden bias) and the reconstruction error.

    Positive phase on the data, one Gibbs step (sampled hiddens, mean-field visibles, hidden
    probabilities) for the negative phase.
    """
    h_prob = rbm.hidden_probabilities(v)
    h_sample = (torch.rand(h_prob.shape, generator=generator).to(h_prob) < h_prob).to(v.dtype)
    v_model = rbm.visible_mean(h_sample)
    h_model = rbm.hidden_probabilities(v_model)
    n = v.shape[0]
    grad_w = (v.T @ h_prob - v_model.T @ h_model) / n
    return grad_w, (v - v_model).mean(0), (h_prob - h_model).mean(0), float((v - v_model).pow(2).sum(1).mean())


def train_rbm(rbm: Rbm, data: torch.Tensor, epochs: int, lr: float, momentum: float, weight_decay: float,
              batch_size: int, generator: torch.Generator) -> list[float]:
    """Momentum SGD on CD-1 gradients; returns the reconstruction error of each epoch."""
    velocity = [torch.zeros_like(t) for t in (rbm.weight, rbm.visible_bias, rbm.hidden_bias)]
    errors = []
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=generator).to(data.device)
        total = 0.0
        for idx in order.split(batch_size):
            grad_w, grad_v, grad_h, error = cd1_gradients(rbm, data[idx], generator)
            grads = (grad_w - weight_decay * rbm.weight, grad_v, grad_h)
            for vel, grad, param in zip(velocity, grads, (rbm.weight, rbm.visible_bias, rbm.hidden_bias)):
                vel.mul_(momentum).add_(grad, alpha=lr)
                param.add_(vel)
            total += error * len(idx)
        errors.append(total / len(data))
    return errors


class UnrolledAutoencoder(nn.Module):
    """Encoder layers (the RBMs' up-passes) and decoder layers (their transposes, untied), code noise between."""

    def __init__(self, rbms: list[Rbm]) -> None:
        super().__init__()
        self.encoder = SigmoidEncoder([rbms[0].weight.shape[0]] + [r.weight.shape[1] for r in rbms])
        self.decoder = nn.ModuleList(nn.Linear(r.weight.shape[1], r.weight.shape[0]) for r in reversed(rbms))
        with torch.no_grad():
            for linear, rbm in zip(self.encoder.linears, rbms):
                linear.weight.copy_(rbm.weight.T)
                linear.bias.copy_(rbm.hidden_bias)
            for linear, rbm in zip(self.decoder, reversed(rbms)):
                linear.weight.copy_(rbm.weight)
                linear.bias.copy_(rbm.visible_bias)

    def reconstruct(self, x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """The reconstruction of x, with `noise` (N, bits) added to the code layer's input."""
        pre = self.encoder(x)
        h = torch.sigmoid(pre if noise is None else pre + noise)
        for linear in self.decoder[:-1]:
            h = torch.sigmoid(linear(h))
        return self.decoder[-1](h)  # Gaussian visibles: linear reconstruction


@dataclass
class Standardisation:
    """Per-pixel (per-feature) mean and std of the training set: standardised x = (x − mean) / std."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def of(cls, x: torch.Tensor, floor: float) -> "Standardisation":
        """std floored at `floor` × its mean, so that near-constant pixels are not blown up on new images."""
        std = x.std(0)
        return cls(x.mean(0), std.clamp_min(floor * float(std.mean())))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def folded(self, encoder: SigmoidEncoder) -> SigmoidEncoder:
        """A copy of `encoder` (trained on standardised input) that takes raw input: the standardisation
        folded into its first layer, W' = W diag(1/std), b' = b − W (mean/std)."""
        out = copy.deepcopy(encoder)
        first = out.linears[0]
        with torch.no_grad():
            first.bias.sub_(first.weight @ (self.mean / self.std))
            first.weight.div_(self.std)
        return out


class SemanticHashingTrainer(Trainer):
    """Pretrains stacked RBMs of the encoder's sizes, fine-tunes the unrolled autoencoder; `fit` -> (encoder, history)."""

    options_class = SemanticHashingOptions

    def fit(self, encoder: SigmoidEncoder, features: torch.Tensor, labels: torch.Tensor,
            validation: Validation | None = None) -> tuple[SigmoidEncoder, list[dict]]:
        """labels only score the validation codes; the encoder gives the layer sizes and receives the weights."""
        opt = self.options
        if not isinstance(encoder, SigmoidEncoder):
            raise ValueError("SemanticHashingTrainer trains a SigmoidEncoder; got " + type(encoder).__name__)
        if features.ndim != 2 or features.shape[1] != encoder.sizes[0] or len(features) != len(labels):
            raise ValueError(f"features must be (N, {encoder.sizes[0]}) with N labels, got {tuple(features.shape)}, {tuple(labels.shape)}")
        torch.manual_seed(opt.seed)
        generator = torch.Generator().manual_seed(opt.seed)
        device = torch.device(opt.device)
        raw, y = features.to(device).float(), labels.to(device).float()
        pixels = Standardisation.of(raw, opt.pixel_std_floor)
        x = pixels(raw)  # unit-variance Gaussian visibles, pixel by pixel
        history: list[dict] = []
        start = time.perf_counter()
        rbms, visible = [], x
        for layer, hidden in enumerate(encoder.sizes[1:]):
            lr = opt.gaussian_lr if layer == 0 else opt.rbm_lr
            scale = float(visible.pow(2).sum(1).mean())  # the error of reconstructing every input by zero
            for _ in range(RBM_RESTARTS + 1):  # a diverged layer starts again at a tenth of the step
                rbm = Rbm.initial(visible, hidden, gaussian=layer == 0, generator=generator)
                errors = train_rbm(rbm, visible, opt.rbm_epochs, lr, opt.momentum, opt.weight_decay, opt.batch_size, generator)
                if all(math.isfinite(e) and e <= DIVERGED * scale for e in errors):
                    break
                lr /= 10
            else:
                raise ValueError(f"RBM {layer + 1} diverged at every step size down to {lr * 10:g}: lower gaussian_lr/rbm_lr")
            for epoch, error in enumerate(errors, 1):
                self.record(history, {"phase": f"rbm{layer + 1}", "epoch": epoch, "loss": error, "lr": lr,
                                      "time": time.perf_counter() - start})
            rbms.append(rbm)
            visible = rbm.hidden_probabilities(visible)
        autoencoder = UnrolledAutoencoder(rbms).to(device)
        lbfgs = opt.finetune == "lbfgs"
        optimizer = (torch.optim.LBFGS(autoencoder.parameters(), lr=opt.finetune_lr, max_iter=opt.lbfgs_iterations,
                                       line_search_fn="strong_wolfe") if lbfgs
                     else torch.optim.Adam(autoencoder.parameters(), lr=opt.finetune_lr))
        for epoch in range(1, opt.finetune_epochs + 1):
            total = 0.0
            for idx in torch.randperm(len(x), device=device).split(opt.lbfgs_batch_size if lbfgs else opt.batch_size):
                total += finetune_step(autoencoder, optimizer, x[idx], opt.code_noise) * len(idx)
            record = {"phase": "finetune", "epoch": epoch, "loss": total / len(x), "time": time.perf_counter() - start}
            if (opt.eval_every and epoch % opt.eval_every == 0) or epoch == opt.finetune_epochs:
                record.update(self.scored(pixels.folded(autoencoder.encoder), raw, y, validation))
            self.record(history, record)
        encoder.to(device).load_state_dict(pixels.folded(autoencoder.encoder).state_dict())
        encoder.eval()
        if opt.balance:
            balance_codes(encoder, raw)
        if opt.finetune_epochs == 0 or opt.balance:
            history[-1].update(self.scored(encoder, raw, y, validation))
        return encoder, history

    def scored(self, encoder: SigmoidEncoder, x: torch.Tensor, y: torch.Tensor, validation: Validation | None) -> dict:
        """Forward-pass codes' mAP of an encoder that takes raw input."""
        return evaluate_encoder(encoder, x, y, validation, self.options.eval_size, self.options.seed)

    def record(self, history: list[dict], record: dict) -> None:
        history.append({"sweep": len(history) + 1, **record})
        if self.progress:
            self.progress(history[-1])


def finetune_step(autoencoder: UnrolledAutoencoder, optimizer: torch.optim.Optimizer, x: torch.Tensor, code_noise: float) -> float:
    """One optimiser step on a mini-batch's squared reconstruction error; its loss before the step.

    The code noise is drawn once per mini-batch, so that a line-search optimiser (L-BFGS re-evaluates the
    closure) sees one deterministic objective, the paper's "deterministic noise"."""
    noise = code_noise * torch.randn(len(x), autoencoder.encoder.bits, device=x.device) if code_noise else None

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = (autoencoder.reconstruct(x, noise) - x).pow(2).sum(1).mean()
        loss.backward()
        return loss

    return float(optimizer.step(closure).detach())


@torch.no_grad()
def balance_codes(encoder: SigmoidEncoder, x: torch.Tensor) -> None:
    """Shift the top bias so that every code unit's threshold is its training median."""
    encoder.linears[-1].bias.sub_(encoder(x).median(0).values)
