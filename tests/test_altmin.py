"""Alternating minimisation: the closed forms are exact, the z-step is Newton's, and the trainer learns."""

import pytest
import torch

from sample_problem import CHANCE_MAP, assert_round_trip, lsh_map, sample_problem
from vdsh.training.trainers.altmin import (AltMinOptions, AltMinTrainer, damped, hidden_local_objective, hidden_newton_step,
                                  layer_statistics, solve_layer, top_step)
from vdsh.training.encoders.mlp import DeepMLP

torch.set_default_dtype(torch.float32)


def test_w_update_equals_least_squares_on_the_augmented_system():
    gen = torch.Generator().manual_seed(0)
    inputs, targets = torch.randn(200, 7, generator=gen, dtype=torch.float64), torch.randn(200, 5, generator=gen, dtype=torch.float64)
    ridge, mu = 3.0, 0.5
    weight = solve_layer(layer_statistics(inputs, targets), ridge, mu)
    # min ||A [W|b]ᵀ − Z||² + (λ/μ)||[W|b]||²  ==  lstsq of [A; √(λ/μ) I] against [Z; 0]
    a = torch.cat([inputs, torch.ones(200, 1, dtype=torch.float64)], 1)
    a_aug = torch.cat([a, (ridge / mu) ** 0.5 * torch.eye(8, dtype=torch.float64)])
    z_aug = torch.cat([targets, torch.zeros(8, 5, dtype=torch.float64)])
    expected = torch.linalg.lstsq(a_aug, z_aug).solution.T
    torch.testing.assert_close(weight, expected, rtol=1e-10, atol=1e-10)


def test_statistics_of_shards_add_up_to_the_whole():
    inputs, targets = torch.randn(90, 4, dtype=torch.float64), torch.randn(90, 3, dtype=torch.float64)
    whole = layer_statistics(inputs, targets)
    parts = layer_statistics(inputs[:40], targets[:40]) + layer_statistics(inputs[40:], targets[40:])
    torch.testing.assert_close(parts.gram, whole.gram)
    torch.testing.assert_close(parts.cross, whole.cross)


def local_problem(l1: float):
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(1, 6, generator=gen, dtype=torch.float64)
    z = z + 0.3 * z.sign()  # away from ReLU's kink, where the Hessian exists
    target = torch.randn(1, 6, generator=gen, dtype=torch.float64)
    above = torch.randn(1, 4, generator=gen, dtype=torch.float64)
    weight_above = torch.randn(4, 7, generator=gen, dtype=torch.float64)
    return z, target, above, weight_above, 0.7, 1.3, l1


@pytest.mark.parametrize("l1", [0.0, 0.4])
def test_newton_step_uses_autograd_gradient_and_hessian_diagonal(l1):
    z, target, above, weight_above, mu, mu_above, l1 = local_problem(l1)
    objective = lambda v: hidden_local_objective(v, target, above, weight_above, mu, mu_above, l1).sum()  # noqa: E731
    grad = torch.autograd.functional.jacobian(objective, z)
    hess = torch.autograd.functional.hessian(objective, z).reshape(6, 6)
    damping = 1e-3
    step = hidden_newton_step(z, target, above, weight_above, mu, mu_above, l1, damping)
    torch.testing.assert_close(step, -grad / (torch.diagonal(hess) + damping), rtol=1e-10, atol=1e-12)


def test_damped_step_never_raises_the_objective_and_usually_lowers_it():
    gen = torch.Generator().manual_seed(2)
    z, target = torch.randn(500, 8, generator=gen), torch.randn(500, 8, generator=gen)
    above, weight_above = torch.randn(500, 5, generator=gen), torch.randn(5, 9, generator=gen)
    objective = lambda v: hidden_local_objective(v, target, above, weight_above, 1.0, 2.0, 0.1)  # noqa: E731
    new = damped(objective, z, hidden_newton_step(z, target, above, weight_above, 1.0, 2.0, 0.1, 1e-6), 6)
    before, after = objective(z), objective(new)
    assert bool((after <= before).all())
    assert float((after < before).float().mean()) > 0.9


def test_top_step_is_the_exact_minimiser():
    gen = torch.Generator().manual_seed(3)
    target, labels = torch.randn(20, 6, generator=gen, dtype=torch.float64), torch.randn(20, 3, generator=gen, dtype=torch.float64)
    classifier = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    z = top_step(target, labels, classifier, 0.8, 0.0).requires_grad_()
    objective = (labels - z @ classifier).pow(2).sum() + 0.8 * (z - target).pow(2).sum()
    (grad,) = torch.autograd.grad(objective, z)
    assert float(grad.abs().max()) < 1e-9


@pytest.mark.slow
@pytest.mark.parametrize("minibatch_size", [None, 500])
def test_altmin_learns_on_the_mnist_sample(minibatch_size, tmp_path):
    problem = sample_problem()
    torch.manual_seed(0)
    encoder = DeepMLP(784, 3, 32, 16)
    options = AltMinOptions(sweeps=6, minibatch_size=minibatch_size, averaging=0.8, eval_every=0)
    encoder, history = AltMinTrainer(options).fit(encoder, problem.train_x, problem.train_y, problem.validation)
    assert len(history) == 6 and {"loss", "penalty", "residuals", "time"} <= set(history[0])
    assert len(history[-1]["residuals"]) == 3 and 0 < history[-1]["residual_max"] < 1
    final = history[-1]["val_map"]
    assert final > 2 * CHANCE_MAP and final > lsh_map(problem, 16) + 0.05, (final, lsh_map(problem, 16))
    assert_round_trip(encoder, problem, tmp_path)


def test_altmin_refuses_a_batchnorm_network():
    problem = sample_problem()
    with pytest.raises(ValueError, match="plain DeepMLP"):
        AltMinTrainer().fit(DeepMLP(784, 3, 8, 8, batchnorm=True), problem.train_x, problem.train_y)


def test_one_batched_step_equals_the_layer_by_layer_z_steps():
    """Layers of one parity are independent given the others: stacking them changes nothing."""
    torch.manual_seed(4)
    weights = [torch.randn(8, 6), torch.randn(8, 9), torch.randn(8, 9), torch.randn(8, 9), torch.randn(5, 9)]
    x, y = torch.randn(40, 5), torch.eye(3)[torch.randint(0, 3, (40,))]
    from vdsh.training.trainers.altmin import affine, forward_preactivations
    zs = [z + 0.3 * torch.randn_like(z) for z in forward_preactivations(weights, x)]
    classifier = torch.randn(5, 3)
    options = AltMinOptions(l1=0.05)
    batched = list(zs)
    AltMinTrainer(options).z_step(weights, batched, x, y, classifier, [0.7] * 5)
    reference = list(zs)
    for parity in (0, 1):
        for l in range(parity, 4, 2):
            target = affine(x if l == 0 else torch.relu(reference[l - 1]), weights[l])
            objective = lambda z: hidden_local_objective(z, target, reference[l + 1], weights[l + 1], 0.7, 0.7, 0.05)  # noqa: E731
            for _ in range(options.newton_steps):
                step = hidden_newton_step(reference[l], target, reference[l + 1], weights[l + 1], 0.7, 0.7, 0.05, options.damping)
                reference[l] = damped(objective, reference[l], step, options.backtracking)
    reference[-1] = top_step(affine(torch.relu(reference[-2]), weights[-1]), y, classifier, 0.7, 0.0)
    for got, want in zip(batched, reference):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert any(not torch.allclose(a, b) for a, b in zip(batched, zs))  # the step did move the z's


def test_weighted_w_step_is_weighted_least_squares():
    gen = torch.Generator().manual_seed(5)
    inputs, targets = torch.randn(60, 4, generator=gen, dtype=torch.float64), torch.randn(60, 3, generator=gen, dtype=torch.float64)
    weights = torch.rand(60, 1, generator=gen, dtype=torch.float64) + 0.1
    got = solve_layer(layer_statistics(inputs, targets, weights), 2.0, 1.0)
    a = torch.cat([inputs, torch.ones(60, 1, dtype=torch.float64)], 1)
    a_aug = torch.cat([weights.sqrt() * a, 2.0 ** 0.5 * torch.eye(5, dtype=torch.float64)])
    z_aug = torch.cat([weights.sqrt() * targets, torch.zeros(5, 3, dtype=torch.float64)])
    torch.testing.assert_close(got, torch.linalg.lstsq(a_aug, z_aug).solution.T, rtol=1e-10, atol=1e-10)


def test_l1_penalties_majorise_the_residual_norms_and_touch_them_at_the_current_point():
    from vdsh.training.trainers.altmin import affine, constraint_penalties, forward_preactivations
    torch.manual_seed(6)
    weights = [torch.randn(8, 6), torch.randn(4, 9)]
    x = torch.randn(30, 5)
    zs = [z + torch.randn_like(z) for z in forward_preactivations(weights, x)]
    options = AltMinOptions(residual="l1", residual_floor=1e-6)
    penalties = constraint_penalties(weights, zs, x, 0.5, options)
    r0 = (zs[0] - affine(x, weights[0])).norm(dim=1, keepdim=True)
    for r in (r0, r0 * 0.3, r0 + 1.0):  # μ||r|| <= ω||r||² + μ||r₀||/2, with equality at r = r₀
        majoriser = penalties[0] * r.pow(2) + 0.5 * r0 / 2
        assert bool((majoriser >= 0.5 * r - 1e-6).all())
    torch.testing.assert_close(penalties[0] * r0.pow(2) + 0.5 * r0 / 2, 0.5 * r0)


def test_l1_residual_relaxation_learns_on_the_mnist_sample():
    problem = sample_problem()
    torch.manual_seed(0)
    options = AltMinOptions(sweeps=6, residual="l1", eval_every=0)
    encoder, history = AltMinTrainer(options).fit(DeepMLP(784, 3, 32, 16), problem.train_x, problem.train_y, problem.validation)
    final = history[-1]["val_map"]
    assert final > 2 * CHANCE_MAP and final > lsh_map(problem, 16) + 0.05, (final, lsh_map(problem, 16))
