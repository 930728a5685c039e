"""VDSH's ADMM: exact local steps, locality, live multipliers, consensus, a decreasing Lagrangian, and it learns."""

import pytest
import torch

from vdsh.training.trainers.admm import (
    AdmmOptions, AdmmTrainer, CopyStatistics, forward_outputs, output_step, preactivations, relu_targets, solve_copy, top_step,
    upper_gradient,
)
from vdsh.training.encoders.mlp import DeepMLP
from vdsh.training.stacked_mlp import LayerWeights


def small_net(depth=5, width=12, bits=6, d=9, n=40, seed=0):
    torch.manual_seed(seed)
    weights = LayerWeights.from_mlp(DeepMLP(d, depth, width, bits), torch.device("cpu"))
    x = torch.randn(n, d)
    z, z_top = forward_outputs(weights, x)
    return weights, x, z + 0.2 * torch.randn_like(z), z_top + 0.2 * torch.randn_like(z_top)


def toy_problem(n=240, d=20, classes=4, seed=0):
    """Separable classes around random centres: small enough for many sweeps in a test."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=generator)
    centres = 2 * torch.randn(classes, d, generator=generator)
    x = centres[labels] + torch.randn(n, d, generator=generator)
    return x, torch.nn.functional.one_hot(labels, classes).float()


def fit(x, y, depth=4, width=32, bits=16, **options):
    torch.manual_seed(0)
    trainer = AdmmTrainer(AdmmOptions(**{"eval_every": 0, **options}))
    encoder, history = trainer.fit(DeepMLP(x.shape[1], depth, width, bits), x, y)
    return trainer, encoder, history


def test_forward_outputs_match_the_network():
    torch.manual_seed(0)
    mlp = DeepMLP(9, 5, 12, 6)
    x = torch.randn(30, 9)
    z, z_top = forward_outputs(LayerWeights.from_mlp(mlp, torch.device("cpu")), x)
    assert torch.allclose(z_top, mlp(x), atol=1e-5) and z.shape == (4, 30, 12)


def test_top_step_is_the_exact_minimiser():
    torch.manual_seed(0)
    p, u, b = torch.randn(20, 6), torch.randn(20, 6), torch.sign(torch.randn(20, 6))
    beta, nu = 0.7, 1.9
    z = top_step(p, u, b, beta, nu).requires_grad_(True)
    objective = beta / 2 * (z - p + u).pow(2).sum() + nu / 2 * (z - b).pow(2).sum()
    (grad,) = torch.autograd.grad(objective, z)
    assert grad.abs().max() < 1e-5


def test_output_step_minimises_the_prox_linear_model_of_its_local_objective():
    weights, x, z, z_top = small_net()
    u = 0.1 * torch.randn_like(z)
    p, p_top = preactivations(weights, x, z)
    m, lipschitz = 1, 2.5
    w_above = weights.hidden[m][:, :-1]
    gradient = upper_gradient(z[m + 1], u[m + 1], p[m + 1], w_above, relu=True)
    new = output_step(z[m], torch.relu(p[m]), u[m], gradient, lipschitz).requires_grad_(True)
    model = 0.5 * (new - torch.relu(p[m]) + u[m]).pow(2).sum() + (gradient * (new - z[m])).sum() + lipschitz / 2 * (new - z[m]).pow(2).sum()
    (grad,) = torch.autograd.grad(model, new)
    assert grad.abs().max() < 1e-5
    # The linearised term's gradient is autograd's gradient of ½||z_{m+1} + u_{m+1} − relu(W z_m + b)||² at z_m.
    zm = z[m].clone().requires_grad_(True)
    upper = 0.5 * (z[m + 1] + u[m + 1] - torch.relu(zm @ w_above.T + weights.hidden[m][:, -1])).pow(2).sum()
    (expected,) = torch.autograd.grad(upper, zm)
    assert torch.allclose(gradient, expected, atol=1e-5)


def test_copy_step_is_the_ridge_solve_of_the_inverted_relu_targets_with_the_consensus_pull():
    weights, x, z, z_top = small_net(n=200)
    u, u_top = 0.1 * torch.randn_like(z), 0.1 * torch.randn_like(z_top)
    p, _ = preactivations(weights, x, z)
    targets = relu_targets(p, z + u)
    stats = CopyStatistics.zeros(weights)
    stats.add(x[:120], z[:, :120], targets[:, :120], (z_top + u_top)[:120])  # two chunks add up to the whole block
    stats.add(x[120:], z[:, 120:], targets[:, 120:], (z_top + u_top)[120:])
    anchor = LayerWeights(*(t + 0.1 for t in weights.tensors()))
    beta, gamma = 0.8, 0.3
    new = solve_copy(stats, anchor, beta, gamma)
    inputs = [x, *z[:-1].unbind(0), z[-1]]
    goals = [*targets.unbind(0), z_top + u_top]
    layers = [new.first, *new.hidden.unbind(0), new.top]
    anchors = [anchor.first, *anchor.hidden.unbind(0), anchor.top]
    for m, (inp, goal, w, a) in enumerate(zip(inputs, goals, layers, anchors)):
        z1 = torch.cat([inp, torch.ones(len(inp), 1)], 1).double()
        # argmin β/2 Σ_i ||t_i − W z1_i||² + γ n/2 ||W − A||²
        system = beta * z1.T @ z1 + gamma * len(inp) * torch.eye(z1.shape[1], dtype=torch.float64)
        expected = torch.linalg.solve(system, beta * z1.T @ goal.double() + gamma * len(inp) * a.double().T).T
        assert torch.allclose(w.double(), expected, atol=1e-4), m


def test_relu_targets_fit_units_that_should_be_on_and_keep_units_that_stay_off():
    p = torch.tensor([1.0, -1.0, 2.0, -2.0])
    q = torch.tensor([0.5, 0.7, -0.3, -0.4])
    assert torch.equal(relu_targets(p, q), torch.tensor([0.5, 0.7, -0.3, -2.0]))


def test_every_local_step_reads_only_its_neighbours():
    # z-steps: layer m's update reads z_{m−1} (through p_m), z_{m+1}, u_m, u_{m+1} and W_m, W_{m+1}. Perturbing z_{m−2}
    # and z_{m+2} leaves it unchanged.
    weights, x, z, z_top = small_net(depth=7)
    u = 0.1 * torch.randn_like(z)
    m = 3

    def z_update(z_):
        p, _ = preactivations(weights, x, z_)
        gradient = upper_gradient(z_[m + 1], u[m + 1], p[m + 1], weights.hidden[m][:, :-1], relu=True)
        return output_step(z_[m], torch.relu(p[m]), u[m], gradient, 1.0)

    far = z.clone()
    far[m - 2] += 3.0
    far[m + 2] -= 3.0
    assert torch.equal(z_update(z), z_update(far))
    near = z.clone()
    near[m + 1] += 0.5
    assert not torch.allclose(z_update(z), z_update(near))
    # Weight copies: layer m+1's solve (hidden[m]) reads only z_m (its input) and z_{m+1} + u_{m+1} (its target).
    def copy_update(z_):
        p, _ = preactivations(weights, x, z_)
        stats = CopyStatistics.zeros(weights)
        stats.add(x, z_, relu_targets(p, z_ + u), z_top)
        return solve_copy(stats, weights, 1.0, 0.5).hidden[m]

    assert torch.equal(copy_update(z), copy_update(far))


def test_multipliers_are_live_and_persist_across_sweeps():
    x, y = toy_problem()
    trainer, _, history = fit(x, y, sweeps=1)
    aux = trainer.state["aux"]
    first = aux.u.clone(), aux.u_top.clone()
    assert first[0].abs().sum() > 0 and first[1].abs().sum() > 0, "u += residual after the first sweep"
    trainer.options.sweeps = 1
    trainer.sweep(x, y)
    assert not torch.allclose(aux.u, first[0]) and not torch.allclose(aux.u_top, first[1])
    assert len(history[0]["multiplier_norms"]) == 4 and min(history[0]["multiplier_norms"]) > 0


def test_augmented_lagrangian_decreases_and_residuals_shrink():
    # Sweep 1 starts from forward-pass auxiliaries (every constraint met); from the first multiplier update on, the
    # augmented Lagrangian falls sweep after sweep (fixed penalties) and the residuals shrink.
    x, y = toy_problem()
    _, _, history = fit(x, y, sweeps=12, blocks=2, penalty_growth=1.0)
    lagrangian = [r["lagrangian"] for r in history[1:]]
    assert all(later <= earlier * 1.01 for earlier, later in zip(lagrangian, lagrangian[1:])), lagrangian
    assert lagrangian[-1] < 0.9 * lagrangian[0], lagrangian
    assert history[-1]["residual_max"] < 0.5 * history[1]["residual_max"]
    assert 0 < history[-1]["consensus_gap"] < history[1]["consensus_gap"], "two blocks' copies meet θ"


def test_the_classifier_shapes_the_learned_codes():
    x, y = toy_problem()
    permuted = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    codes = [fit(x, labels, sweeps=3)[0].state["codes"] for labels in (y, permuted)]
    assert (codes[0] != codes[1]).float().mean() > 0.1


def test_admm_learns_a_toy_problem_and_its_forward_and_auxiliary_codes_agree():
    x, y = toy_problem()
    trainer, encoder, history = fit(x, y, sweeps=10, eval_every=1)
    assert history[-1]["train_map"] > 0.9, history[-1]["train_map"]  # chance 0.25
    assert history[-1]["train_map_auxiliary"] > 0.9


@pytest.mark.parametrize("order", ["backward", "backward-forward", "odd-even"])
def test_admm_learns_on_the_embedded_sample(mnist_sample_features, order):
    x, y = mnist_sample_features
    _, _, history = fit(x, y, depth=6, width=128, bits=32, sweeps=6, order=order)
    assert history[-1]["train_map"] > 0.45, history[-1]["train_map"]  # chance 0.10; still rising after 6 sweeps


def test_bfloat16_auxiliaries_learn_as_float32_ones_do():
    x, y = toy_problem()
    scores = {dtype: fit(x, y, sweeps=6, dtype=dtype)[2][-1]["train_map"] for dtype in ("float32", "bfloat16")}
    assert scores["bfloat16"] > 0.8 and abs(scores["bfloat16"] - scores["float32"]) < 0.05, scores


def test_rejects_bad_options_and_networks():
    with pytest.raises(ValueError, match="order"):
        AdmmOptions(order="random")
    with pytest.raises(ValueError, match="codes"):
        AdmmOptions(codes="random")
    with pytest.raises(ValueError, match="plain"):
        AdmmTrainer().fit(DeepMLP(4, 3, 8, 4, batchnorm=True), torch.randn(5, 4), torch.eye(5))
