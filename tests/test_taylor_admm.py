"""Taylor et al. ADMM: its closed-form steps are exact minimisers, it records residuals, and it learns."""

import pytest
import torch

from sample_problem import CHANCE_MAP, assert_round_trip, lsh_map, sample_problem
from vdsh.training.encoders.mlp import DeepMLP
from vdsh.training.trainers.taylor_admm import TaylorAdmmOptions, TaylorAdmmTrainer, activation_step, output_step, relu_coupled_preactivation


def gradient_at(objective, point: torch.Tensor) -> torch.Tensor:
    point = point.detach().requires_grad_()
    (grad,) = torch.autograd.grad(objective(point), point)
    return grad


def test_activation_step_is_the_exact_minimiser():
    gen = torch.Generator().manual_seed(0)
    z_above, z = torch.randn(30, 4, generator=gen, dtype=torch.float64), torch.randn(30, 6, generator=gen, dtype=torch.float64)
    weight_above = torch.randn(4, 7, generator=gen, dtype=torch.float64)
    beta, gamma = 0.3, 2.0
    a = activation_step(z_above, weight_above, z, beta, gamma)
    objective = lambda v: (beta * (z_above - v @ weight_above[:, :-1].T - weight_above[:, -1]).pow(2).sum()  # noqa: E731
                           + gamma * (v - torch.relu(z)).pow(2).sum())
    assert float(gradient_at(objective, a).abs().max()) < 1e-9


def test_output_step_is_the_exact_minimiser_with_the_multiplier():
    gen = torch.Generator().manual_seed(1)
    target, labels = torch.randn(30, 6, generator=gen, dtype=torch.float64), torch.randn(30, 3, generator=gen, dtype=torch.float64)
    classifier, multiplier = torch.randn(6, 3, generator=gen, dtype=torch.float64), torch.randn(30, 6, generator=gen, dtype=torch.float64)
    z = output_step(target, labels, classifier, multiplier, 0.5)
    objective = lambda v: ((labels - v @ classifier).pow(2).sum() + (v * multiplier).sum()  # noqa: E731
                           + 0.5 * (v - target).pow(2).sum())
    assert float(gradient_at(objective, z).abs().max()) < 1e-9


@pytest.mark.slow
def test_taylor_admm_learns_and_records_residuals_per_layer(tmp_path):
    problem = sample_problem()
    torch.manual_seed(0)
    encoder = DeepMLP(784, 3, 32, 16)
    options = TaylorAdmmOptions(sweeps=6, eval_every=0)
    encoder, history = TaylorAdmmTrainer(options).fit(encoder, problem.train_x, problem.train_y, problem.validation)
    assert [len(r["residuals"]) for r in history] == [3] * 6
    assert [len(r["activation_residuals"]) for r in history] == [2] * 6
    assert history[2]["multiplier_norm"] == 0 and history[-1]["multiplier_norm"] > 0  # warm start, then λ moves
    final = history[-1]["val_map"]
    assert final > 2 * CHANCE_MAP and final > lsh_map(problem, 16) + 0.05, (final, lsh_map(problem, 16))
    assert_round_trip(encoder, problem, tmp_path)


def test_taylor_admm_rejects_bad_options():
    with pytest.raises(ValueError):
        TaylorAdmmOptions(beta=0)


def test_relu_preactivation_step_is_the_elementwise_minimiser():
    torch.manual_seed(0)
    p, z = torch.randn(2000), torch.randn(2000)
    beta, gamma = 0.7, 1.3
    a = relu_coupled_preactivation(p, z, beta, gamma)
    cost = lambda a_: beta * (a_ - p) ** 2 + gamma * (z - torch.relu(a_)) ** 2
    grid = torch.linspace(-5, 5, 4001)[:, None]
    assert bool((cost(a) <= cost(grid).min(0).values + 1e-5).all())
