"""Processes and devices: one process, or one of torchrun's (DDP) or Ray Train's (`on_ray.py`) workers.

Beside the group DDP uses (NCCL on GPUs), the ranks share a CPU (gloo) group for what they must agree on
without waiting for a device: whether some rank's data failed this step (`first_error`)."""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..ops import check_device


@dataclass(frozen=True)
class Processes:
    rank: int
    world: int
    device: torch.device
    group: object = None  # the CPU (gloo) process group, when world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: str | None = None) -> Processes:
    """Join the process group that torchrun (env vars) or Ray Train (already initialised) describes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    check_device(device)  # on this process's machine: a torchrun or Ray Train worker checks its own GPUs
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)  # NCCL's and the loader's pinning default: this rank's GPU, also when named
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    group = None
    if world > 1:  # every rank creates it, in the same order
        group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return Processes(rank, world, dev, group)


def first_error(error: Exception | None, procs: Processes) -> Exception | None:
    """The error of the lowest rank that has one, on every rank (None: no rank has one). `error` is this
    rank's. A collective on the CPU group: every rank calls it at the same point, so a rank whose data
    failed stops the others there instead of leaving them waiting for it at the next device collective."""
    if procs.world == 1:
        return error
    flag = torch.tensor([procs.rank if error is not None else procs.world], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=procs.group)
    first = int(flag)
    if first == procs.world:
        return None
    box = [error if procs.rank == first else None]
    dist.broadcast_object_list(box, src=first, group=procs.group)
    return box[0]


def barrier(procs: Processes) -> None:
    """Wait, on the CPU group, until every rank is here."""
    if procs.world > 1:
        dist.barrier(group=procs.group)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
