"""Parallel training across processes with torch.distributed: the collectives every parallel trainer shares.

Data parallel: samples are sharded, sums are all-reduced. In the layer-local trainers every per-sample step
(forward pass, codes, targets, auxiliaries) is local to the rank holding the sample; ProxProp's and
alternating minimisation's weight and classifier solves read only sums over samples, and ADMM's consensus
step only the sum of every block's weight copy, so each rank contributes its share, all ranks solve the
same systems and their weights stay identical without ever being sent. Back-prop uses PyTorch's
DistributedDataParallel (`data_parallel`). Model parallel: features replay sends activations and deltas
between the ranks that hold its modules (its own point-to-point messages, features_replay.Pipeline).
Any backend torchrun sets up works: gloo on CPU (what the tests use), NCCL on GPUs. Without an
initialised process group every function here is the identity, so single-process code pays nothing.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when no process group is running."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: str) -> tuple[int, int]:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment); (rank, world size)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank_and_world()


def leave_group() -> None:
    """After the last collective: wait for every rank, then tear the group down. A rank that exits with gloo's
    threads still running aborts (std::terminate) and torchrun reports the whole run failed."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rank_device(device: str) -> torch.device:
    """The device this rank computes on: under a process group, 'cuda' means this rank's own GPU (LOCAL_RANK)."""
    rank, world = rank_and_world()
    if world > 1 and device == "cuda":
        index = int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device(device)


def global_sum(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every rank's tensors summed over all ranks, in one collective call (its time is added to `SUM_CLOCK`)."""
    if rank_and_world()[1] == 1:
        return tensors
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    start = time.perf_counter()
    dist.all_reduce(flat)
    SUM_CLOCK.seconds += time.perf_counter() - start
    sizes = [t.numel() for t in tensors]
    return [part.reshape(t.shape).to(t.dtype) for part, t in zip(flat.split(sizes), tensors)]


@dataclass
class CommClock:
    """Seconds that collective communication was in flight (it may overlap computation)."""

    seconds: float = 0.0


SUM_CLOCK = CommClock()  # this process's time in `global_sum` all-reduces (what a benchmark reads after a fit)


def global_mean(tensors: list[torch.Tensor], count: int) -> list[torch.Tensor]:
    """Per-sample means over all ranks, from each rank's means over its `count` samples (counts may differ)."""
    if rank_and_world()[1] == 1:
        return tensors
    *sums, total = global_sum([t * count for t in tensors] + [torch.tensor(float(count), device=tensors[0].device)])
    return [s / total for s in sums]


def broadcast_(tensors: list[torch.Tensor], source: int = 0) -> None:
    """Overwrite every rank's tensors with the source rank's (the same starting weights everywhere)."""
    if rank_and_world()[1] > 1:
        for t in tensors:
            dist.broadcast(t, source)


def global_min(value: int, device: torch.device | str = "cpu") -> int:
    """The smallest of every rank's value: ranks must agree on how many collective steps they take."""
    if rank_and_world()[1] == 1:
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def rank_zero_value(value: float, device: torch.device | str = "cpu") -> float:
    """Rank 0's value on every rank (a scalar decision all ranks must take alike, e.g. the best sweep)."""
    return rank_value(value, 0, device)


def rank_value(value: float, source: int, device: torch.device | str = "cpu") -> float:
    """The source rank's value on every rank (e.g. a loss that only the pipeline's top rank computes)."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    broadcast_([t], source)
    return float(t[0])


def data_parallel(module: nn.Module, clock: CommClock) -> nn.Module:
    """`module` under DistributedDataParallel (gradients averaged over ranks, rank 0's weights broadcast at
    the start), its all-reduces timed into `clock`; a module without parameters is returned as it is."""
    if not any(p.requires_grad for p in module.parameters()):
        return module
    wrapped = DistributedDataParallel(module)

    def timed_allreduce(state, bucket):  # unannotated: DDP checks annotations, which this module keeps as strings
        start = time.perf_counter()

        def done(future):
            state.seconds += time.perf_counter() - start
            return future.value()

        return default_hooks.allreduce_hook(None, bucket).then(done)

    wrapped.register_comm_hook(clock, timed_allreduce)
    return wrapped
