"""Run a function on `world` real processes under a gloo process group (CPU) and collect each rank's result.

The distributed tests compare what the ranks trained with one process; this is their shared scaffolding.
`work(rank)` must be picklable (a module-level function, or a functools.partial of one) and return what
`torch.save` can write, e.g. {"state": module.state_dict(), "history": history}.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(rank: int, world: int, folder: str, work: Callable[[int], Any]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world)
    try:
        torch.save(work(rank), Path(folder) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_on_ranks(work: Callable[[int], Any], world: int, folder: Path) -> list[Any]:
    """work(rank) on `world` spawned processes; their results in rank order. This process then uses one thread,
    as the ranks did, so that a one-process reference run computes in the same order."""
    mp.spawn(_rank_main, args=(world, str(folder), work), nprocs=world, join=True)
    torch.set_num_threads(1)
    return [torch.load(folder / f"{rank}.pt") for rank in range(world)]


def trained(trainer, encoder, x: torch.Tensor, y: torch.Tensor) -> dict:
    """A trainer's fit as a rank's result: the trained weights and the history."""
    module, history = trainer.fit(encoder, x, y)
    return {"state": module.state_dict(), "history": history}
