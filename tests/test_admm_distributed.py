"""Consensus ADMM across two real processes (gloo on CPU) equals one process holding the same two data blocks."""

from functools import partial

import pytest
import torch

from ranks import run_on_ranks, trained
from vdsh.training.trainers.admm import AdmmOptions, AdmmTrainer
from vdsh.training.encoders.mlp import DeepMLP

pytestmark = pytest.mark.slow  # spawns two processes
WORLD = 2
OPTIONS = dict(sweeps=3, eval_every=0, keep_best=False)


def encoder(seed: int, in_features: int) -> DeepMLP:
    torch.manual_seed(seed)
    return DeepMLP(in_features, depth=5, width=32, bits=16)


def rank_fit(x: torch.Tensor, y: torch.Tensor, rank: int) -> dict:
    # Each rank starts from its own random weights: training must broadcast rank 0's.
    return trained(AdmmTrainer(AdmmOptions(blocks=1, **OPTIONS)), encoder(rank, x.shape[1]), x[rank::WORLD], y[rank::WORLD])


def test_two_ranks_equal_one_process_with_two_blocks(mnist_sample_features, tmp_path):
    x, y = mnist_sample_features[0][:400], mnist_sample_features[1][:400]
    ranks = run_on_ranks(partial(rank_fit, x, y), WORLD, tmp_path)
    single, history = AdmmTrainer(AdmmOptions(blocks=WORLD, **OPTIONS)).fit(encoder(0, x.shape[1]), x, y)
    for key, value in single.state_dict().items():
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key  # the ranks agree bit for bit
        assert torch.allclose(ranks[0]["state"][key], value, atol=1e-4), key  # and equal the one-process run
    for key in ("lagrangian", "consensus_gap", "residual_max"):
        assert abs(ranks[0]["history"][-1][key] - history[-1][key]) <= 1e-3 * max(1.0, abs(history[-1][key])), key
    assert history[-1]["consensus_gap"] > 0, "two blocks hold two different copies"
