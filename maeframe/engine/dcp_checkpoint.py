"""Sharded checkpoints of fsdp runs: a directory in `torch.distributed.checkpoint` (DCP) format.

`last.dcp/` holds `.metadata` and one `__<rank>_0.distcp` file per writing process with its shards of the
model and AdamW state (FQN-keyed, from `get_state_dict`, so nothing depends on the strategy or world size
that wrote it), plus `run_state.pt`: everything else a resume needs (step, RNG, component states, recipe,
non-finite counter), written by rank 0 with torch.save exactly as in a single-file checkpoint.

Atomicity: every rank writes into `.last.dcp.tmp/`; after DCP's final collective rank 0 adds run_state.pt,
moves the previous `last.dcp/` aside to `.last.dcp.old/`, renames the new directory into place and
deletes the old one. A crash at any point leaves a complete checkpoint under `last.dcp/` or, between the
two renames, under `.last.dcp.old/` (which `complete_dcp` then resumes from).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from .checkpoint import FORMAT, atomic_save, check_free_space
from .distributed import World, barrier

RUN_STATE = "run_state.pt"
TENSOR_KEYS = ("model", "optimizer")  # the parts stored as DCP shards


def is_complete(path: Path) -> bool:
    """A DCP checkpoint directory whose write finished (metadata and run state present)."""
    return (path / ".metadata").is_file() and (path / RUN_STATE).is_file()


def aside(path: Path) -> Path:
    """Where the previous checkpoint waits while its replacement is renamed into place."""
    return path.parent / f".{path.name}.old"


def complete_dcp(path: Path) -> Path | None:
    """`path` if complete, else the previous checkpoint an interrupted swap left aside, else None."""
    for candidate in (path, aside(path)):
        if is_complete(candidate):
            return candidate
    return None


def save_dcp(path: Path, tensors: dict[str, Any], run_state: dict[str, Any], world: World) -> None:
    """Every rank writes its shards of `tensors` ({"model", "optimizer"} state dicts); rank 0 writes
    `run_state` and swaps the directory into place. Returns on every rank once `path` is complete."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp"
    if world.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    barrier(world)
    check_free_space(tensors, path)  # a DTensor counts its global size: the whole checkpoint, on every rank
    dcp.save(tensors, checkpoint_id=tmp)  # returns after rank 0 wrote .metadata, i.e. every rank's shards
    if world.is_main:
        atomic_save({"format": FORMAT, "layout": "dcp", **run_state}, tmp / RUN_STATE)
        old = aside(path)
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(path.parent)
    barrier(world)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_run_state(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The non-tensor part (step, rng, components, recipe, ...) of a DCP checkpoint."""
    state = torch.load(Path(path) / RUN_STATE, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a maeframe checkpoint directory ({RUN_STATE} is missing its format)")
    return state


def load_dcp_into(path: Path, targets: dict[str, Any]) -> None:
    """Fill `targets` ({"model", "optimizer"} state dicts shaped like this run's, sharded or not) in place
    from the checkpoint: DCP reshards, so any world size and strategy can read any other's."""
    dcp.load(targets, checkpoint_id=Path(path))


def read_full_dcp(path: Path) -> dict[str, Any]:
    """The whole checkpoint as one process's dict, the layout of a single-file checkpoint: model and
    optimizer state as full tensors (needs no model; memory: the whole checkpoint)."""
    # what torch.distributed.checkpoint.format_utils.dcp_to_torch_save does, without the detour via a file
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"checkpoint directory {str(path)!r} is incomplete or not a DCP checkpoint "
                                f"(.metadata and {RUN_STATE} are needed)")
    state = read_run_state(path)
    tensors: dict[str, Any] = {}
    _load_state_dict(tensors, storage_reader=dcp.FileSystemReader(path), planner=_EmptyStateDictLoadPlanner(),
                     no_dist=True)
    state.pop("layout")
    return {**state, **{key: tensors[key] for key in TENSOR_KEYS}}
