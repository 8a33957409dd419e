"""The files `maeframe embed` writes: one safetensors file holding `features` ([N, D] or [N, 1 + L, D]
float32), `labels` ([N], only when the data has labels) and, in the header's `__metadata__`, `paths` (a JSON
list: the source of every row, in row order), `pool`, `weights` and `fingerprint`.

Resumable by chunk: rows [i·C, (i+1)·C) go to `FILE.parts/chunk-<i:05d>.safetensors` (written to a temporary
file, then renamed), each stamped with the run's fingerprint (weights, data, pool, chunk size, rows). A rerun
skips chunks already complete; a chunk with another fingerprint is an error (never a silent mix). The final
file is assembled from the chunks into a temporary file, renamed into place, and the parts are removed.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..errors import MaeframeError


def fingerprint(facts: dict[str, Any]) -> str:
    """A short hash of what the features depend on (JSON of `facts`, keys sorted)."""
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def chunk_path(out: Path, index: int) -> Path:
    return parts_dir(out) / f"chunk-{index:05d}.safetensors"


def atomic_save_file(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors `save_file` into a temporary file beside `path`, then renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_chunk(out: Path, index: int, features: Tensor, labels: Tensor, paths: list[str], stamp: str) -> None:
    atomic_save_file({"features": features, "labels": labels}, chunk_path(out, index),
                     {"fingerprint": stamp, "paths": json.dumps(paths)})


def chunk_done(out: Path, index: int, stamp: str, rows: int) -> bool:
    """True when chunk `index` is complete for this run; False when absent. A chunk written by another run
    (other weights, data, pool or chunk size) is an error naming it."""
    path = chunk_path(out, index)
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata() or {}
            found = handle.get_slice("features").get_shape()[0]
    except Exception as err:  # a damaged chunk: not ours to guess about
        raise MaeframeError(f"{path}: unreadable leftover chunk ({err}); delete {parts_dir(out)} to start over") from None
    if meta.get("fingerprint") != stamp or found != rows:
        raise MaeframeError(f"{path} was written for other weights, data, pool or chunk size (fingerprint "
                            f"{meta.get('fingerprint')!r}, this run {stamp!r}); delete {parts_dir(out)} to start over "
                            f"or write to another file")
    return True


def assemble(out: Path, chunks: int, metadata: dict[str, str]) -> None:
    """Concatenate the chunks into `out` (atomically) and remove the parts folder. `labels` is kept when
    any row has a label (>= 0)."""
    features, labels, paths = [], [], []
    for index in range(chunks):
        path = chunk_path(out, index)
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as handle:
            paths += json.loads(handle.metadata()["paths"])
        features.append(tensors["features"])
        labels.append(tensors["labels"])
    tensors = {"features": torch.cat(features)}
    if bool((torch.cat(labels) >= 0).any()):
        tensors["labels"] = torch.cat(labels)
    atomic_save_file(tensors, out, {**metadata, "paths": json.dumps(paths)})
    shutil.rmtree(parts_dir(out))


def load_embeddings(path: str | Path) -> tuple[Tensor, Tensor | None, list[str]]:
    """(features [N, D] or [N, 1 + L, D], labels [N] or None, the source path of every row) of a file
    `maeframe embed` wrote."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embeddings file {str(path)!r} does not exist")
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata() or {}
    if "features" not in tensors or "paths" not in meta:
        raise MaeframeError(f"{path}: not a file written by `maeframe embed` (no features or paths)")
    return tensors["features"], tensors.get("labels"), json.loads(meta["paths"])
