"""Features replay with its K modules on K real processes (gloo on CPU) equals the one-process reference."""

from functools import partial

import pytest
import torch

from ranks import run_on_ranks, trained
from vdsh.training.encoders.mlp import DeepMLP
from vdsh.training.trainers.features_replay import FeaturesReplayOptions, FeaturesReplayTrainer

# 130 samples in batches of 32: a short last batch, and the pipeline's state crosses epoch boundaries.
OPTIONS = dict(epochs=3, batch_size=32, lr=0.05, eval_every=2)


def encoder(seed: int, in_features: int) -> DeepMLP:
    torch.manual_seed(seed)
    return DeepMLP(in_features, depth=4, width=32, bits=16)


def rank_fit(world: int, x: torch.Tensor, y: torch.Tensor, split: str, rank: int) -> dict:
    # Each rank starts from its own random weights: training must broadcast rank 0's.
    trainer = FeaturesReplayTrainer(FeaturesReplayOptions(modules=world, split=split, **OPTIONS))
    return trained(trainer, encoder(rank, x.shape[1]), x, y)


@pytest.mark.parametrize("world,split", [(2, "depth"), (2, "work"), (3, "depth")])
def test_k_ranks_give_the_serial_weights(mnist_sample_features, tmp_path, world, split):
    x, y = mnist_sample_features[0][:130], mnist_sample_features[1][:130]
    ranks = run_on_ranks(partial(rank_fit, world, x, y, split), world, tmp_path)
    serial, history = FeaturesReplayTrainer(FeaturesReplayOptions(modules=world, split=split, **OPTIONS)).fit(encoder(0, x.shape[1]), x, y)
    for key, value in serial.state_dict().items():
        for other in ranks[1:]:
            assert torch.equal(ranks[0]["state"][key], other["state"][key]), key  # every rank holds every module's weights
        torch.testing.assert_close(ranks[0]["state"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    for got, want in zip(ranks[0]["history"], history):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["comm_time"] >= 0 and ("train_map" in got) == ("train_map" in want)
    assert ranks[0]["history"][-1]["train_map"] == pytest.approx(history[-1]["train_map"], abs=1e-6)
