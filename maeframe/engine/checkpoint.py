"""Checkpoints written atomically (temp file, fsync, rename) and read with weights_only=True."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

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
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a maeframe checkpoint (official MAE weights load with "
                         f"maeframe.interop.load_official_mae)")
    return state


def remove_stale_temporaries(folder: Path) -> None:
    """Delete temp files a killed process left mid-write (the checkpoints themselves are intact)."""
    for tmp in folder.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def prune(paths: list[Path], keep: int | None) -> None:
    """Delete all but the `keep` newest of `paths` (sorted oldest first)."""
    if keep is not None:
        for old in paths[:-keep]:
            old.unlink(missing_ok=True)
