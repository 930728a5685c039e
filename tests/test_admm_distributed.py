"""Consensus ADMM across two real processes (gloo on CPU) equals one process holding the same two data blocks."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vdsh.training.trainers.admm import AdmmOptions, AdmmTrainer
from vdsh.training.encoders.mlp import DeepMLP

pytestmark = pytest.mark.slow  # spawns two processes
WORLD = 2
OPTIONS = dict(sweeps=3, eval_every=0, keep_best=False)


def encoder(seed: int, in_features: int) -> DeepMLP:
    torch.manual_seed(seed)
    return DeepMLP(in_features, depth=5, width=32, bits=16)


def worker(rank: int, init_file: str, out_dir: str, x: torch.Tensor, y: torch.Tensor) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        # Each rank starts from its own random weights: training must broadcast rank 0's.
        trainer = AdmmTrainer(AdmmOptions(blocks=1, **OPTIONS))
        trained, history = trainer.fit(encoder(rank, x.shape[1]), x[rank::WORLD], y[rank::WORLD])
        torch.save({"state": trained.state_dict(), "history": history}, Path(out_dir) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process_with_two_blocks(mnist_sample_features, tmp_path):
    x, y = mnist_sample_features[0][:400], mnist_sample_features[1][:400]
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path), x, y), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"{rank}.pt") for rank in range(WORLD)]
    torch.set_num_threads(1)
    single, history = AdmmTrainer(AdmmOptions(blocks=WORLD, **OPTIONS)).fit(encoder(0, x.shape[1]), x, y)
    for key, value in single.state_dict().items():
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key  # the ranks agree bit for bit
        assert torch.allclose(ranks[0]["state"][key], value, atol=1e-4), key  # and equal the one-process run
    for key in ("lagrangian", "consensus_gap", "residual_max"):
        assert abs(ranks[0]["history"][-1][key] - history[-1][key]) <= 1e-3 * max(1.0, abs(history[-1][key])), key
    assert history[-1]["consensus_gap"] > 0, "two blocks hold two different copies"
