"""``torch.distributed`` for :func:`fxcapture.extract`: one shard of the data per process.

Under ``torchrun --nproc-per-node N`` (``WORLD_SIZE > 1`` in the environment) the
process group is initialised from the environment (``gloo`` on CPU, ``nccl`` on
CUDA, each process on ``cuda:LOCAL_RANK``), unless the caller already did. Each rank
computes a contiguous range of rows, aligned to whole batches so that every rank
sees the batches a single process would, and writes its own chunks; rank 0 finishes
the output after a barrier.

Example::

    >>> group = Group.from_env(torch.device("cpu"))
    >>> group.shard(total=1000, align=64)        # rank 1 of 2 -> (512, 1000)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Group:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we initialised it, so we destroy it
    backend: str | None = None

    @property
    def primary(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: torch.device) -> "Group":
        """The current process group, initialised from torchrun's variables if needed."""
        if not dist.is_available():
            return cls()
        if dist.is_initialized():
            world = dist.get_world_size()
            if world == 1:
                return cls()
            local = int(os.environ.get("LOCAL_RANK", dist.get_rank() % max(1, torch.cuda.device_count() or 1)))
            return cls(dist.get_rank(), world, local, False, dist.get_backend())
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise RuntimeError(
                f"WORLD_SIZE={world} but {', '.join(missing)} not set: start the processes with "
                "torchrun (python -m torch.distributed.run --nproc-per-node N ...)"
            )
        backend = "nccl" if device.type == "cuda" else "gloo"
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
        return cls(dist.get_rank(), dist.get_world_size(), local, True, backend)

    def device(self, device: torch.device) -> torch.device:
        """``cuda`` without an index means this process's GPU (``cuda:LOCAL_RANK``)."""
        if self.world_size > 1 and device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device

    def shard(self, total: int, align: int = 1) -> tuple[int, int]:
        """This rank's rows ``[lo, hi)`` of ``total``: contiguous, split at multiples of ``align``."""
        units = -(-total // align)
        lo = units * self.rank // self.world_size * align
        hi = units * (self.rank + 1) // self.world_size * align
        return min(lo, total), min(hi, total)

    def barrier(self) -> None:
        if self.world_size <= 1:
            return
        if self.backend == "nccl":
            dist.barrier(device_ids=[self.local_rank])
        else:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            dist.destroy_process_group()
            self.owns_group = False
