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


def _wire(world: World) -> torch.device:
    """Where collectives take their tensors: the GPU under NCCL, the CPU under gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def shard(count: int, world: World) -> tuple[list[int], int]:
    """This rank's contiguous share of `count` items (indices), padded to ceil(count / N) by repeating its
    last index so every rank runs the same number of batches (an fsdp forward is a collective), and how
    many of them are real. Rank order is item order, so `gather_rows` restores it."""
    per = -(-count // world.world_size)
    start = min(world.rank * per, count)
    indices = list(range(start, min(start + per, count)))
    real = len(indices)
    return indices + [indices[-1] if indices else 0] * (per - real), real


def gather_rows(rows: torch.Tensor, world: World) -> torch.Tensor:
    """Every rank's rows [n_r, ...] -> [n_0 + ... + n_{N-1}, ...] in rank order, on every rank (on the CPU).
    Ranks may hold different counts; a world of one returns `rows`."""
    if not world.distributed:
        return rows
    wire = _wire(world)
    counts = [torch.zeros(1, dtype=torch.long, device=wire) for _ in range(world.world_size)]
    dist.all_gather(counts, torch.tensor([len(rows)], device=wire))
    counts = [int(c) for c in counts]
    padded = torch.zeros((max(counts), *rows.shape[1:]), dtype=rows.dtype, device=wire)
    padded[:len(rows)] = rows
    parts = [torch.empty_like(padded) for _ in range(world.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n].cpu() for part, n in zip(parts, counts)])


class _AllRankRows(torch.autograd.Function):
    """all_gather forward; backward sums each row's gradient over the ranks (every rank's loss used it)
    and hands this rank its own rows' share. all_reduce, which gloo and NCCL both have."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.count = dist.get_rank(), len(rows)
        parts = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, rows.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.count:(ctx.rank + 1) * ctx.count]


def all_rank_rows(rows: torch.Tensor) -> torch.Tensor:
    """This process's rows [B, ...] -> the rows of every process [N·B, ...] in rank order (this rank's at
    rank·B), differentiable: a loss over the whole global batch (in-batch negatives of a contrastive loss)
    computed alike on every rank gets, on each rank, N times its rows' gradient, which the data-parallel
    gradient average divides by N: N processes train as one process with the N× batch. Every rank must pass
    the same B (a training micro-batch). Without a process group (or in a group of one) returns `rows`."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return rows
    return _AllRankRows.apply(rows)


def mirrored_rows(rows: torch.Tensor, world: World) -> torch.Tensor:
    """The rows paired with this rank's rows [B, ...] when the global batch (ranks in order) is reversed:
    global row g pairs with row G-1-g, which lives on rank N-1-r. One exchange with that rank; a world of one
    (or the middle rank of an odd world) reverses its own rows."""
    peer = world.world_size - 1 - world.rank
    if peer == world.rank:
        return rows.flip(0)
    wire = _wire(world)
    sent, received = rows.contiguous().to(wire), torch.empty_like(rows, device=wire)
    for request in dist.batch_isend_irecv([dist.P2POp(dist.isend, sent, peer), dist.P2POp(dist.irecv, received, peer)]):
        request.wait()
    return received.to(rows.device).flip(0)


@torch.no_grad()
def map_dataset(fn, dataset, world: World, batch_size: int, num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(outputs [N, ...], labels [N, ...]) of `fn(batch) -> rows` over the whole dataset, in dataset order,
    on every rank: each rank runs its contiguous share (`shard`) and the rows are gathered, so every sample
    counts exactly once whatever the world size. `fn` returns CPU float rows, one per sample."""
    from torch.utils.data import DataLoader, Subset

    indices, real = shard(len(dataset), world)
    outputs, labels = [], []
    # an explicit generator: creating the loader iterator must not consume the global RNG (exact resume)
    for batch, label in DataLoader(Subset(dataset, indices), batch_size=batch_size, num_workers=num_workers,
                                   generator=torch.Generator()):
        outputs.append(fn(batch))
        labels.append(torch.as_tensor(label))
    return gather_rows(torch.cat(outputs)[:real], world), gather_rows(torch.cat(labels)[:real], world)
