"""Checkpoints written atomically (temp file, fsync, rename) and read with weights_only=True.

A checkpoint is one file (`last.pt`, ddp runs) or a DCP directory (`last.dcp/`, fsdp runs; see
dcp_checkpoint.py); `load_checkpoint` reads either into the same dict."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_leaves, tree_map_only

from ..errors import MaeframeError

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
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """{"format", "step", "model": {fqn: tensor}, "optimizer", "rng", "components", "recipe", ...} from a
    checkpoint file, or from a DCP directory gathered into full tensors in this process."""
    path = Path(path)
    if path.is_dir():
        from .dcp_checkpoint import read_full_dcp

        return tree_map_only(torch.Tensor, lambda tensor: tensor.to(map_location), read_full_dcp(path))
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a maeframe checkpoint (official MAE weights load with "
                         f"maeframe.interop.load_official_mae)")
    return state


def remove_stale_temporaries(folder: Path) -> None:
    """Delete temp files and DCP temp directories a killed process left mid-write, and previous DCP
    checkpoints set aside whose replacement is complete (the checkpoints themselves are intact)."""
    from .dcp_checkpoint import is_complete

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
