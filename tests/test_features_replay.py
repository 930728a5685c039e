"""Features replay: K = 1 is back-propagation exactly; K > 1 uses stale inputs as the paper says, and learns."""

import pytest
import torch
from torch import nn

from sample_problem import CHANCE_MAP, assert_round_trip, lsh_map, sample_problem
from vdsh.training.trainers.backprop import BackpropOptions, BackpropTrainer
from vdsh.training.trainers.features_replay import (FeaturesReplayOptions, FeaturesReplayTrainer, MlpModule, ReplayState, balanced_bounds, module_work,
                                           module_bounds, replay_step)
from vdsh.training.encoders.mlp import DeepMLP


def test_modules_cover_every_layer_once():
    assert module_bounds(5, 1) == [(0, 5)]
    assert module_bounds(5, 2) == [(0, 2), (2, 5)]
    assert module_bounds(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(ValueError):
        module_bounds(3, 4)


@pytest.mark.slow
def test_one_module_equals_backprop_exactly():
    problem = sample_problem()
    x, y = problem.train_x[:600], problem.train_y[:600]
    common = dict(epochs=2, batch_size=128, lr=0.05, eval_every=0)
    torch.manual_seed(0)
    plain, plain_history = BackpropTrainer(BackpropOptions(**common)).fit(DeepMLP(784, 3, 16, 8), x, y)
    torch.manual_seed(0)
    replay, replay_history = FeaturesReplayTrainer(FeaturesReplayOptions(modules=1, **common)).fit(DeepMLP(784, 3, 16, 8), x, y)
    for (name, a), (_, b) in zip(plain.state_dict().items(), replay.state_dict().items()):
        assert torch.equal(a, b), name
    assert [r["loss"] for r in plain_history] == [r["loss"] for r in replay_history]


def test_two_modules_replay_the_previous_batch_with_the_delta_from_above():
    torch.manual_seed(0)
    mlp = DeepMLP(6, 3, 5, 4)
    blocks = [MlpModule(mlp, 0, 1), MlpModule(mlp, 1, 3)]
    classifier = nn.Linear(4, 3)
    state = ReplayState(2)
    x1, x2 = torch.randn(8, 6), torch.randn(8, 6)
    y1, y2 = torch.eye(3)[torch.randint(0, 3, (8,))], torch.eye(3)[torch.randint(0, 3, (8,))]
    replay_step(blocks, classifier, state, x1, y1, "auto", 0.0)
    assert mlp.linears[0].weight.grad is None  # step 1: no δ has reached the lower module yet
    # The δ sent down at step 1 is ∂loss(x1)/∂h1(x1): check it, then that step 2 back-propagates it through x1.
    h1 = blocks[0](x1).detach().requires_grad_()
    loss1 = nn.functional.cross_entropy(classifier(torch.tanh(blocks[1](h1))), y1.argmax(1))
    (delta,) = torch.autograd.grad(loss1, h1)
    torch.testing.assert_close(state.deltas[0], delta)
    for p in list(mlp.parameters()) + list(classifier.parameters()):
        p.grad = None
    replay_step(blocks, classifier, state, x2, y2, "auto", 0.0)
    (expected,) = torch.autograd.grad(blocks[0](x1), mlp.linears[0].weight, delta)
    torch.testing.assert_close(mlp.linears[0].weight.grad, expected)


@pytest.mark.slow
@pytest.mark.parametrize("modules", [2, 3])
def test_features_replay_learns_on_the_mnist_sample(modules, tmp_path):
    problem = sample_problem()
    torch.manual_seed(0)
    options = FeaturesReplayOptions(modules=modules, epochs=8, batch_size=64, lr=0.05, eval_every=0)
    encoder, history = FeaturesReplayTrainer(options).fit(DeepMLP(784, 3, 64, 16), problem.train_x, problem.train_y,
                                                         problem.validation)
    final = history[-1]["val_map"]
    assert history[-1]["modules"] == modules and history[-1]["loss"] < history[0]["loss"]
    assert final > 2 * CHANCE_MAP and final > lsh_map(problem, 16) + 0.05, (final, lsh_map(problem, 16))
    assert_round_trip(encoder, problem, tmp_path)


def test_work_split_evens_out_the_modules_work():
    sizes = [784] + [1024] * 7 + [32]  # the 8 × 1024 MLP of the parallel benchmark
    assert module_bounds(8, 2) == [(0, 4), (4, 8)]
    bounds = balanced_bounds(sizes, 2)
    assert bounds == [(0, 3), (3, 8)]
    works = [module_work(sizes, a, b, top=k == 1) for k, (a, b) in enumerate(bounds)]
    by_depth = [module_work(sizes, a, b, top=k == 1) for k, (a, b) in enumerate(module_bounds(8, 2))]
    assert max(works) < max(by_depth)
    for k in (1, 3, 8):  # the dynamic programme's answer is the best of every contiguous cut
        import itertools
        best = min(max(module_work(sizes, a, b, top=b == 8) for a, b in zip((0,) + cuts, cuts + (8,)))
                   for cuts in itertools.combinations(range(1, 8), k - 1))
        assert max(module_work(sizes, a, b, top=b == 8) for a, b in balanced_bounds(sizes, k)) == best
