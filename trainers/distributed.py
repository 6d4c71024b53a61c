"""Multi-GPU training with torchrun: one process per GPU, gradients averaged across them.

`torchrun --nproc_per_node 2 -m unconfused lora --config job.toml` starts the ranks; each
rank draws the same random numbers (one shared generator) and trains on its own slice of
the world batch, so N GPUs x batch B train exactly like one GPU with batch N*B, and a
checkpoint written by rank 0 resumes every rank exactly. Only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mine(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """This rank's slice of a world-batch tensor drawn identically on every rank."""
        return t[self.rank * n:(self.rank + 1) * n]

    def mean_(self, tensors: list[torch.Tensor]) -> None:
        """Average tensors (gradients, the loss) over the ranks, in place."""
        if self.size == 1:
            return
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t.div_(self.size)

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def world() -> World:
    """The torchrun world (started on first use), or a single process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def device_for(world_: World, device: torch.device) -> torch.device:
    if world_.size > 1 and device.type == "cuda":
        return torch.device("cuda", world_.local_rank)
    return device
