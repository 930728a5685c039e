"""Alternating minimisation on two real processes (gloo on CPU) equals the one-process run, full batch and stochastic."""

from functools import partial

import pytest
import torch

from ranks import run_on_ranks, trained
from vdsh.training.encoders.mlp import DeepMLP
from vdsh.training.trainers.altmin import AltMinOptions, AltMinTrainer

WORLD = 2


def options(minibatch_size, residual):
    return AltMinOptions(sweeps=3, eval_every=0, minibatch_size=minibatch_size, residual=residual, averaging=0.5)


def encoder(seed: int, in_features: int) -> DeepMLP:
    torch.manual_seed(seed)
    return DeepMLP(in_features, depth=4, width=32, bits=16)


def rank_fit(x: torch.Tensor, y: torch.Tensor, minibatch_size, residual, rank: int) -> dict:
    # Each rank starts from its own random weights: training must broadcast rank 0's.
    return trained(AltMinTrainer(options(minibatch_size, residual)), encoder(rank, x.shape[1]), x, y)


@pytest.mark.parametrize("minibatch_size,residual", [(None, "squared"), (100, "squared"), (None, "l1")])
def test_two_ranks_equal_one_process(mnist_sample_features, tmp_path, minibatch_size, residual):
    x, y = mnist_sample_features[0][:400], mnist_sample_features[1][:400]
    ranks = run_on_ranks(partial(rank_fit, x, y, minibatch_size, residual), WORLD, tmp_path)
    single, history = AltMinTrainer(options(minibatch_size, residual)).fit(encoder(0, x.shape[1]), x, y)
    for key, value in single.state_dict().items():
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key  # the ranks agree bit for bit
        torch.testing.assert_close(ranks[0]["state"][key], value, rtol=1e-3, atol=1e-4, msg=key)  # and equal one process
    for key in ("loss", "penalty", "residual_max"):
        assert ranks[0]["history"][-1][key] == pytest.approx(history[-1][key], rel=1e-3, abs=1e-6), key
