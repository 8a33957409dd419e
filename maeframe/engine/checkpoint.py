"""Checkpoints, written atomically (temp file, fsync, rename) and read with weights_only=True: one file
(`last.pt`, ddp runs) or a DCP directory (`last.dcp/`, fsdp runs); `load_checkpoint` reads either into the
same dict.

Sharded checkpoints of fsdp runs: a directory in `torch.distributed.checkpoint` (DCP) format.

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
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.utils._pytree import tree_leaves, tree_map_only

from ..errors import MaeframeError
from .distributed import World, barrier

FORMAT = "maeframe-checkpoint-1"
HEADROOM = 1.1  # free space required: 110% of the tensors' bytes


def tensor_bytes(obj: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(obj) if isinstance(t, torch.Tensor))


def check_free_space(obj: Any, path: Path) -> None:
    """A clear error, before writing anything, when the disk cannot hold the new file beside the old."""
    need = int(tensor_bytes(obj) * HEADROOM) + 2**20
    free = shutil.disk_usage(path.parent).free
    if free < need:
        raise MaeframeError(f"not enough disk space to write {path}: needs about {need / 2**20:.0f} MiB, "
                            f"{free / 2**20:.0f} MiB free; the previous checkpoint is untouched")


def atomic_save(obj: Any, path: str | Path) -> None:
    """Write `obj` with torch.save so that `path` holds either the old or the complete new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(obj, path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """{"format", "step", "model": {fqn: tensor}, "optimizer", "rng", "components", "recipe", ...} from a
    checkpoint file, or from a DCP directory gathered into full tensors in this process."""
    path = Path(path)
    if path.is_dir():
        return tree_map_only(torch.Tensor, lambda tensor: tensor.to(map_location), read_full_dcp(path))
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a maeframe checkpoint (official MAE weights load with "
                         f"maeframe.interop.load_official_mae)")
    return state


def checkpoint_entry(path: str | Path, key: str) -> Any:
    """One entry of a checkpoint ("recipe", "components", "step", ...; None when absent) without loading its
    tensors: a file is memory-mapped, a DCP directory's run state is read."""
    path = Path(path)
    if path.is_dir():
        if not is_complete(path):
            raise FileNotFoundError(f"checkpoint directory {str(path)!r} is incomplete or not a DCP checkpoint")
        return read_run_state(path).get(key)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # not torch.save's zip format (which mmap needs)
        state = None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a maeframe checkpoint (official MAE weights load with "
                         f"maeframe.interop.load_official_mae)")
    return state.get(key)


def remove_stale_temporaries(folder: Path) -> None:
    """Delete temp files and DCP temp directories a killed process left mid-write, and previous DCP
    checkpoints set aside whose replacement is complete (the checkpoints themselves are intact)."""
    for tmp in folder.glob(".*.tmp"):
        remove(tmp)
    for old in folder.glob(".*.dcp.old"):
        if is_complete(folder / old.name[1:-len(".old")]):
            remove(old)


def remove(path: Path) -> None:
    """Delete a checkpoint file or DCP directory (nothing if absent)."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def prune(paths: list[Path], keep: int | None) -> None:
    """Delete all but the `keep` newest of `paths` (files or DCP directories, sorted oldest first)."""
    if keep is not None:
        for old in paths[:-keep]:
            remove(old)


# --- sharded (DCP) checkpoints of fsdp runs ----------------------------------------------------------

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
