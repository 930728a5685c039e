"""SDH: supervised discrete hashing (Shen, Shen, Liu & Shen, CVPR 2015), the shallow supervised baseline.

Codes B in {-1,+1}^{N x bits} should (a) predict the labels linearly and (b) be reproducible from the
features by a kernel projection F(x) = phi(x) P + c:

    min_{B, W, P} ||Y - B W||^2 + lam ||W||^2 + nu ||B - phi(X) P||^2 + nu * ridge * ||P||^2

with Y the (N, L) multi-hot label matrix and phi(x) the RBF similarities of x to m anchors drawn from
the training set (width sigma = mean distance of training points to anchors). The W- and P-steps are
exact minimisers of their blocks and the B-step is exact for each bit in turn, so the objective never
increases:

- W-step: ridge regression of Y on B, W = (B^T B + lam I)^{-1} B^T Y.
- P-step: ridge regression of B on [phi, 1], P = (phi^T phi + ridge I)^{-1} phi^T B.
- B-step: discrete cyclic coordinate descent. With Q = Y W^T + nu phi P the B-terms are
  ||B W||^2 - 2 tr(B^T Q), and one column z of B, the others fixed, is solved exactly by
  z = sgn(q - B' W' w^T): no relaxation, which is the paper's point.

Defaults follow the authors' code: m = 1000 anchors, lam = 1, nu = 1e-5, ridge = 1e-2, 5 outer
iterations, at most 10 coordinate sweeps per B-step. Unlike that code, P is refitted once to the
final codes (theirs is one B-step behind).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from vdsh.training.trainers.shallow.inputs import check_bits, feature_matrix, label_matrix
from vdsh.training.encoders.shallow import SdhEncoder, squared_distances


def ridge_factor(x: torch.Tensor, lam: float) -> torch.Tensor:
    """Cholesky factor of x^T x + lam I (positive definite for lam > 0)."""
    return torch.linalg.cholesky(x.T @ x + lam * torch.eye(x.shape[1], dtype=x.dtype))


def ridge_regression(x: torch.Tensor, y: torch.Tensor, lam: float, factor: torch.Tensor | None = None) -> torch.Tensor:
    """argmin_W ||y - x W||^2 + lam ||W||^2 = (x^T x + lam I)^{-1} x^T y; pass `factor` to reuse one."""
    return torch.cholesky_solve(x.T @ y, ridge_factor(x, lam) if factor is None else factor)


def discrete_code_step(codes: torch.Tensor, w: torch.Tensor, q: torch.Tensor, max_sweeps: int) -> torch.Tensor:
    """DCC: minimise ||B W||^2 - 2 tr(B^T Q) over B in {-1,+1}, one column (bit) at a time.

    B' W' w_l^T = sum_{k != l} B[:, k] <w_k, w_l>, i.e. B times row l of W W^T with its diagonal
    entry removed. A zero argument keeps the old bit (both signs are optimal there).
    """
    codes = codes.clone()
    coupling = w @ w.T
    coupling.fill_diagonal_(0)
    for _ in range(max_sweeps):
        changed = 0
        for bit in range(codes.shape[1]):
            target = q[:, bit] - codes @ coupling[bit]
            new = torch.where(target > 0, 1.0, torch.where(target < 0, -1.0, codes[:, bit]))
            changed += int((new != codes[:, bit]).sum())
            codes[:, bit] = new
        if changed == 0:
            break
    return codes


@dataclass
class SdhSolution:
    """The fitted blocks and the objective after every B-step (for tests and diagnostics)."""

    codes: torch.Tensor  # (N, bits) in {-1,+1}
    classifier: torch.Tensor  # W, (bits, L)
    projection: torch.Tensor  # P, (m + 1, bits); last row is the bias
    objective: list[float] = field(default_factory=list)


def sdh_objective(
    phi1: torch.Tensor, y: torch.Tensor, codes: torch.Tensor, w: torch.Tensor, p: torch.Tensor,
    lam: float, nu: float, ridge: float,
) -> float:
    """The SDH objective including the P regulariser: the quantity that no step of `solve_sdh` increases."""
    return float(
        ((y - codes @ w) ** 2).sum()
        + lam * (w**2).sum()
        + nu * ((codes - phi1 @ p) ** 2).sum()
        + nu * ridge * (p**2).sum()
    )


def solve_sdh(
    phi1: torch.Tensor,
    y: torch.Tensor,
    bits: int,
    generator: torch.Generator,
    lam: float,
    nu: float,
    ridge: float,
    iterations: int,
    max_sweeps: int,
) -> SdhSolution:
    """Alternate the W-, P- and B-steps from random codes; phi1 is phi(X) with a column of ones appended."""
    codes = torch.where(torch.randn(phi1.shape[0], bits, generator=generator, dtype=phi1.dtype) >= 0, 1.0, -1.0)
    codes = codes.to(phi1.dtype)
    phi_factor = ridge_factor(phi1, ridge)  # phi never changes: factor once, reuse in every P-step
    history = []
    for _ in range(iterations):
        w = ridge_regression(codes, y, lam)
        p = ridge_regression(phi1, codes, ridge, phi_factor)
        q = y @ w.T + nu * (phi1 @ p)
        codes = discrete_code_step(codes, w, q, max_sweeps)
        history.append(sdh_objective(phi1, y, codes, w, p, lam, nu, ridge))
    w = ridge_regression(codes, y, lam)
    p = ridge_regression(phi1, codes, ridge, phi_factor)
    return SdhSolution(codes, w, p, history)


def fit_sdh(
    features: torch.Tensor,
    labels: np.ndarray,
    bits: int,
    seed: int = 0,
    anchors: int = 1000,
    sigma: float | None = None,
    lam: float = 1.0,
    nu: float = 1e-5,
    ridge: float = 1e-2,
    iterations: int = 5,
    max_sweeps: int = 10,
) -> SdhEncoder:
    """Fit SDH on (N, D) features and (N, L) multi-hot labels.

    anchors: RBF anchors sampled (without replacement, from `seed`) from the training rows.
    sigma: RBF width; None = mean Euclidean distance from training rows to anchors.
    lam: ridge on the label classifier W. nu: weight of the fit between codes and the projection.
    ridge: ridge on the projection P. iterations: outer W/P/B rounds. max_sweeps: DCC sweeps per B-step.
    """
    x = feature_matrix(features)
    y = label_matrix(labels, x.shape[0])
    check_bits(bits)
    if not 1 <= anchors <= x.shape[0]:
        raise ValueError(f"anchors must be between 1 and the {x.shape[0]} training rows, got {anchors}")
    if sigma is not None and sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    if min(lam, ridge) <= 0 or nu < 0 or iterations < 1 or max_sweeps < 1:
        raise ValueError(f"need lam, ridge > 0, nu >= 0, iterations, max_sweeps >= 1; got {lam}, {ridge}, {nu}, "
                         f"{iterations}, {max_sweeps}")
    generator = torch.Generator().manual_seed(seed)
    anchor_rows = x[torch.randperm(x.shape[0], generator=generator)[:anchors]]
    d2 = squared_distances(x, anchor_rows)
    width = d2.sqrt().mean() if sigma is None else torch.tensor(float(sigma), dtype=torch.float64)
    phi1 = torch.cat([torch.exp(-d2 / (2 * width**2)), torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    del d2
    solution = solve_sdh(phi1, y, bits, generator, lam, nu, ridge, iterations, max_sweeps)
    encoder = SdhEncoder(x.shape[1], bits, anchors)
    encoder.set_anchors(anchor_rows)
    encoder.sigma.copy_(width)
    encoder.projection.copy_(solution.projection[:-1])
    encoder.bias.copy_(solution.projection[-1])
    return encoder
