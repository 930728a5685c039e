"""The code step every trainer shares: codes b = sgn(z_M), a linear classifier W on them, and code targets.

As in Supervised Discrete Hashing (Shen et al. 2015): W solves the ridge regression of the multi-hot
labels Y on the codes in closed form, W = (BᵀB + λI)⁻¹ BᵀY, and the loss is the squared error
||Y − BW||². Multi-label targets need nothing special: every label column is its own regression.
Trainers with a code target (admm, proxprop, cnn-local) pull their top towards codes B chosen by
`target_codes`: SDH's discrete B-step against W ('learned') or a fixed codeword per class ('centres').
"""

from __future__ import annotations

from typing import Callable

import torch

from vdsh.index.codes import sign_codes


def ridge_classifier(codes: torch.Tensor, labels: torch.Tensor, ridge: float = 1.0,
                     reduce: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None) -> torch.Tensor:
    """W (bits, L) minimising ||Y − BW||² + ridge·||W||², solved in float32 on the codes' device.

    `reduce` sums BᵀB and BᵀY over the samples other processes hold (data-parallel training), so every
    process solves the regression of the whole training set.
    """
    if codes.ndim != 2 or labels.ndim != 2 or codes.shape[0] != labels.shape[0]:
        raise ValueError(f"codes (N, bits) and labels (N, L) must share N, got {tuple(codes.shape)} and {tuple(labels.shape)}")
    b = codes.float()
    y = labels.to(b.device).float()
    gram, rhs = b.T @ b, b.T @ y
    if reduce is not None:
        gram, rhs = reduce([gram, rhs])
    return torch.linalg.solve(gram + ridge * torch.eye(b.shape[1], device=b.device), rhs)


def squared_loss(outputs: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """Mean over samples of ||y_i − Wᵀ o_i||² (o: codes or their relaxation)."""
    residual = labels.to(outputs.device).float() - outputs.float() @ classifier
    return residual.pow(2).sum(1).mean()


class LinearCodeHead:
    """Codes from the top layer and the closed-form classifier on them, refitted on demand."""

    def __init__(self, ridge: float = 1.0) -> None:
        if ridge <= 0:
            raise ValueError(f"ridge must be > 0 (it keeps BᵀB + λI invertible), got {ridge}")
        self.ridge = ridge
        self.classifier: torch.Tensor | None = None

    def fit(self, top: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Codes b = sgn(top), W by ridge regression; returns (codes, loss of the codes)."""
        codes = sign_codes(top, top.dtype)
        self.classifier = ridge_classifier(codes, labels, self.ridge)
        return codes, float(squared_loss(codes, labels, self.classifier))


def discrete_codes(forward_top: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor, nu: float, bit_sweeps: int) -> torch.Tensor:
    """SDH's B-step: argmin_{B ∈ {±1}} ||Y − BW||² + ν||B − F||² by discrete cyclic coordinate descent.

    F are the network's real outputs, so the codes stay close to what the network computes while fitting
    the labels; bit k given the others is b_k = sgn(q_k − B_{−k} W_{−k} w_kᵀ), q = YWᵀ + νF.
    """
    q = labels.float() @ classifier.T + nu * forward_top.float()
    codes = sign_codes(q, q.dtype)
    cct = classifier @ classifier.T
    for _ in range(bit_sweeps):
        for k in range(codes.shape[1]):
            cross = codes @ cct[:, k] - codes[:, k] * cct[k, k]
            codes[:, k] = sign_codes(q[:, k] - cross, q.dtype)
    return codes


def class_codewords(labels: torch.Tensor, bits: int, seed: int) -> torch.Tensor:
    """Codes of a random ±1 codeword per class (multi-label: the sign of the sum of its classes' codewords).

    The 'centres' targets (hash centres, as in CSQ, Yuan et al. CVPR 2020), and the start of the 'learned'
    B-step's classifier, so that classes start about bits/2 bits apart: fitted to a random network's codes
    instead, most bits come out the same for every class, since random layers' signs follow the input's
    mean image (BENCHMARKS.md, "Training", records the effect).
    """
    generator = torch.Generator().manual_seed(seed)
    codewords = (torch.randint(0, 2, (labels.shape[1], bits), generator=generator) * 2 - 1).float()
    return sign_codes(labels.float() @ codewords.to(labels.device), torch.float32)


CODE_TARGETS = ("learned", "centres")


def target_codes(kind: str, forward_top: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor, nu: float,
                 bit_sweeps: int, seed: int) -> torch.Tensor:
    """The codes B a top is pulled to: 'learned' (`discrete_codes`, against W) or 'centres' (`class_codewords`)."""
    if kind not in CODE_TARGETS:
        raise ValueError(f"codes must be one of {CODE_TARGETS}, got {kind!r}")
    if kind == "centres":
        return class_codewords(labels, forward_top.shape[1], seed)
    return discrete_codes(forward_top, labels, classifier, nu, bit_sweeps)


def top_preactivation(target: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor, beta: float, mu: float,
                      codes: torch.Tensor, loss_weight: float = 1.0) -> torch.Tensor:
    """argmin_a ℓ/2||y − aW||² + β/2||a − p||² + μ/2||a − b||² for the top's real output, p = target, b = codes.

    Normal equations: a (ℓWWᵀ + (β+μ)I) = ℓ YWᵀ + βp + μb, one bits×bits system shared by all samples.
    """
    bits = classifier.shape[0]
    system = loss_weight * classifier @ classifier.T + (beta + mu) * torch.eye(bits, device=classifier.device)
    rhs = loss_weight * labels.float() @ classifier.T + beta * target.float() + mu * codes.float()
    chol = torch.linalg.cholesky(system)
    return torch.cholesky_solve(rhs.T, chol).T
