"""torch.distributed under torchrun: process group, this process's place, and metric reduction.

Launch with `torchrun --nproc_per_node N -m maeframe run RECIPE`; multi-node uses torchrun's usual
rendezvous arguments. A process started without torchrun is a world of one.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """rank / world_size over all processes; local_rank picks the GPU on this node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_world(device_type: str) -> World:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU), or a world of one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return World()
    world = World(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return world


def shutdown_world(world: World) -> None:
    """Leave the process group: torchrun's, or the group of one that fsdp opens in a single process."""
    if dist.is_initialized():
        dist.destroy_process_group()


def average(values: dict[str, float], world: World, device: torch.device) -> dict[str, float]:
    """Mean of each value over ranks (one collective); identity in a world of one."""
    if not world.distributed or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return {k: v / world.world_size for k, v in zip(keys, tensor.tolist())}


def any_rank(flag: bool, world: World, device: torch.device) -> bool:
    """True on every rank when it is true on any (ranks must agree before stopping together)."""
    if not world.distributed:
        return flag
    tensor = torch.tensor([float(flag)], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()
