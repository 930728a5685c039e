"""Back-prop under DistributedDataParallel on two real processes (gloo on CPU) equals one process on the whole batches."""

from functools import partial

import torch

from ranks import run_on_ranks, trained
from vdsh.training.encoders.mlp import DeepMLP
from vdsh.training.trainers.backprop import BackpropOptions, BackpropTrainer

WORLD = 2
OPTIONS = dict(epochs=2, batch_size=32, lr=0.05, eval_every=0, weight_decay=0.0)  # 128 samples: equal shards


def encoder(seed: int, in_features: int) -> DeepMLP:
    torch.manual_seed(seed)
    return DeepMLP(in_features, depth=3, width=32, bits=16)


def rank_fit(x: torch.Tensor, y: torch.Tensor, rank: int) -> dict:
    return trained(BackpropTrainer(BackpropOptions(**OPTIONS)), encoder(rank, x.shape[1]), x, y)


def test_two_ddp_ranks_equal_one_process(mnist_sample_features, tmp_path):
    x, y = mnist_sample_features[0][:128], mnist_sample_features[1][:128]
    ranks = run_on_ranks(partial(rank_fit, x, y), WORLD, tmp_path)
    single, _ = BackpropTrainer(BackpropOptions(**OPTIONS)).fit(encoder(0, x.shape[1]), x, y)
    for key, value in single.state_dict().items():
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key
        torch.testing.assert_close(ranks[0]["state"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert ranks[0]["history"][-1]["comm_time"] > 0
