"""Where a process stands in a ``torchrun`` job, and the few collective operations training needs.

Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``) the process group uses NCCL on CUDA and gloo
on the CPU; collectives run on the training device (CUDA) or the CPU (gloo). Every helper here is a no-op
when the job has one process, so the single-process path needs no ``if``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in a ``torchrun`` job (``world_size == 1`` when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> DistInfo:
        return cls(
            int(os.environ.get("RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)),
        )


def init_group(dist: DistInfo, device: torch.device) -> bool:
    """Start the process group when this is a distributed job that has none yet; True if it started one
    (the caller then ends it with :func:`end_group`)."""
    if not dist.distributed or tdist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tdist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=1))
    return True


def end_group() -> None:
    tdist.destroy_process_group()


def comm_device(device: torch.device) -> torch.device:
    """Where collective tensors live: the CUDA device (NCCL), else the CPU (gloo)."""
    return device if device.type == "cuda" else torch.device("cpu")


def sum_over_ranks(values: list[float], dist: DistInfo, device: torch.device) -> list[float]:
    """``values`` added element-wise over all ranks (float64); unchanged in a single process."""
    if not dist.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=comm_device(device))
    tdist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, dist: DistInfo, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on some rank."""
    if not dist.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=comm_device(device))
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather_lists(items: list[Any], dist: DistInfo) -> list[Any]:
    """Every rank's ``items`` concatenated in rank order, on every rank."""
    if not dist.distributed:
        return items
    gathered: list[Any] = [None] * dist.world_size
    tdist.all_gather_object(gathered, items)
    return [it for part in gathered for it in part]


def barrier(dist: DistInfo) -> None:
    if dist.distributed:
        tdist.barrier()


def wrap_ddp(module: nn.Module, dist: DistInfo, device: torch.device, find_unused: bool) -> nn.Module:
    """``module`` in ``DistributedDataParallel`` in a distributed job, else ``module`` itself.
    ``find_unused``: some trainable parameters get no gradient (SAM's IoU head is not in the loss)."""
    if not dist.distributed:
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=find_unused)
