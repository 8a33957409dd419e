"""FSDP2 (`fully_shard`): the model's parameters, gradients and AdamW state split across processes.

`runtime.strategy: fsdp` shards every encoder block, every decoder block, then the root (patch embedding,
cls/mask tokens, norms, prediction head). Each process keeps 1/N of every parameter as a DTensor; a
block's full weights exist only during its forward/backward (all-gather), gradients are reduce-scattered
back to the shards. Numerically it is data parallelism: N processes follow one process with the same
global batch. In a world of one there is nothing to split; the same code runs on a one-process group.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from ..errors import MaeframeError
from .distributed import World


def fully_shard_api():
    """`torch.distributed.fsdp.fully_shard` and `MixedPrecisionPolicy`, or a clear error on torch < 2.6."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:
        raise MaeframeError(f"runtime.strategy=fsdp needs torch>=2.6 (torch.distributed.fsdp.fully_shard); this "
                            f"is torch {torch.__version__}: upgrade torch or use runtime.strategy=ddp") from None
    return fully_shard, MixedPrecisionPolicy


def join_process_group(world: World, device: torch.device) -> None:
    """fully_shard needs a process group; a process started without torchrun gets a group of one."""
    if dist.is_initialized():
        return
    if world.world_size != 1:
        raise MaeframeError("runtime.strategy=fsdp: torchrun started this process but no process group exists")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def shard_model(model: nn.Module, precision: str, world: World, device: torch.device) -> nn.Module:
    """Shard each block of `model.encoder.blocks` and `model.decoder.blocks` (where the model has them: a
    classifier has no decoder), then the root, in place.

    bf16 runs keep fp32 shards (what AdamW updates), compute forward/backward in bf16 and reduce gradients
    in fp32 (`MixedPrecisionPolicy`); fp32 runs stay fp32 throughout."""
    fully_shard, MixedPrecisionPolicy = fully_shard_api()
    if precision == "fp16":
        raise MaeframeError("runtime.strategy=fsdp runs in bf16 or fp32, not fp16 (runtime.precision)")
    join_process_group(world, device)
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if precision == "bf16" else MixedPrecisionPolicy())
    for part in ("encoder", "decoder"):
        for block in getattr(getattr(model, part, None), "blocks", []):
            fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


@contextlib.contextmanager
def root_gathered(model: nn.Module, sharded: bool):
    """Inside, the root unit's parameters (patch embedding, cls/mask tokens, norms, head: everything outside
    the blocks) are whole, so a submodule such as `model.encoder` can run on its own; the blocks gather
    theirs in their own forward hooks. Under fsdp every process must enter (the gather is a collective)."""
    if not sharded:
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor parameter; a plain tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor with the global value of a DTensor (e.g. the replicated gradient norm)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
