"""Back-prop under DistributedDataParallel on two real processes (gloo on CPU) equals one process on the whole batches."""

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vdsh.training.encoders.mlp import DeepMLP
from vdsh.training.trainers.backprop import BackpropOptions, BackpropTrainer

WORLD = 2
OPTIONS = dict(epochs=2, batch_size=32, lr=0.05, eval_every=0, weight_decay=0.0)  # 128 samples: equal shards


def encoder(seed: int, in_features: int) -> DeepMLP:
    torch.manual_seed(seed)
    return DeepMLP(in_features, depth=3, width=32, bits=16)


def worker(rank: int, init_file: str, out_dir: str, x: torch.Tensor, y: torch.Tensor) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        trained, history = BackpropTrainer(BackpropOptions(**OPTIONS)).fit(encoder(rank, x.shape[1]), x, y)
        torch.save({"state": trained.state_dict(), "history": history}, Path(out_dir) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ddp_ranks_equal_one_process(mnist_sample_features, tmp_path):
    x, y = mnist_sample_features[0][:128], mnist_sample_features[1][:128]
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path), x, y), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"{rank}.pt") for rank in range(WORLD)]
    torch.set_num_threads(1)
    single, _ = BackpropTrainer(BackpropOptions(**OPTIONS)).fit(encoder(0, x.shape[1]), x, y)
    for key, value in single.state_dict().items():
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key
        torch.testing.assert_close(ranks[0]["state"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert ranks[0]["history"][-1]["comm_time"] > 0
