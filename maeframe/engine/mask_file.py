"""An explicit mask for `maeframe reconstruct --mask-file`: 0/1 per token in grid order (1 = hidden), one
row for every input or one per input; `.npy`, `.pt` (a tensor) or text (`.txt`, `.csv`: numbers separated
by whitespace or commas). Any array shape is flattened, so a mask may also be written in the grid's shape."""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import MaeframeError


def _read(path: Path) -> Tensor:
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return torch.from_numpy(np.load(path, allow_pickle=False)).flatten()
        if suffix == ".pt":
            value = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(value, Tensor):
                raise ValueError(f"holds a {type(value).__name__}, not a tensor")
            return value.flatten()
        words = [w for w in re.split(r"[\s,]+", path.read_text(encoding="utf-8")) if w]
        return torch.tensor([float(w) for w in words])
    except (OSError, ValueError, RuntimeError) as err:
        raise MaeframeError(f"--mask-file {path}: cannot be read as a 0/1 mask ({err})") from None


def read_mask_file(path: str | Path, grid: tuple[int, ...], inputs: int) -> Tensor:
    """[inputs, N] bool (True = hidden) from the file; errors name the file, the expected and the found count."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--mask-file {str(path)!r} does not exist")
    values = _read(path)
    tokens = math.prod(grid)
    if values.numel() not in (tokens, inputs * tokens):
        per_input = f" or {inputs} × {tokens} = {inputs * tokens} (one row per input)" if inputs > 1 else ""
        raise MaeframeError(f"--mask-file {path}: holds {values.numel()} values; the token grid {tuple(grid)} has "
                            f"{tokens} tokens, so expected {tokens}{per_input} values of 0/1 in grid order")
    if not bool(((values == 0) | (values == 1)).all()):
        raise MaeframeError(f"--mask-file {path}: values must be 0 (visible) or 1 (hidden)")
    rows = values.reshape(-1, tokens).bool().expand(inputs, tokens)
    for i, row in enumerate(rows):
        if not 0 < int(row.sum()) < tokens:
            raise MaeframeError(f"--mask-file {path}: row {i} hides {int(row.sum())} of {tokens} tokens; hide at "
                                f"least one and keep at least one visible")
    return rows.clone()
