"""Stochastic depth whose draws do not depend on how the global batch is split over processes."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class RowDropPath(nn.Module):
    """Drops the residual branch of whole samples with probability `rate` in training, scaling kept ones by
    1 / (1 - rate), as timm's `DropPath`. The keep/drop draws are made for all `total` samples of the global
    micro-batch (from the current RNG stream) and this process keeps rows `start..start+B`, so N processes
    drop exactly the samples one process with the N× batch drops. `rows = (start, total)`; total None means
    this batch is the whole micro-batch (one process, evaluation)."""

    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = rate
        self.rows: tuple[int, int | None] = (0, None)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, ...] -> x with dropped samples zeroed and kept ones rescaled."""
        if not self.training or self.rate == 0.0:
            return x
        start, total = self.rows
        keep_prob = 1.0 - self.rate
        draws = torch.rand(total or x.shape[0], device=x.device)[start:start + x.shape[0]]
        keep = (draws < keep_prob).to(x.dtype).div_(keep_prob)
        return x * keep.view(-1, *[1] * (x.dim() - 1))

    def extra_repr(self) -> str:
        return f"rate={self.rate:.3f}"


def use_row_drop_path(blocks: nn.Module) -> None:
    """Replace timm's `drop_path1` / `drop_path2` in every block by `RowDropPath` of the same rate."""
    for block in blocks:
        for name in ("drop_path1", "drop_path2"):
            old = getattr(block, name, None)
            if old is not None:
                setattr(block, name, RowDropPath(getattr(old, "drop_prob", 0.0)))


def set_drop_rows(model: nn.Module, start: int, total: int) -> bool:
    """Tell every `RowDropPath` of `model` which rows of a global micro-batch of `total` this process holds;
    returns whether any of them drops at all (then the caller seeds the stream they draw from)."""
    layers = [m for m in model.modules() if isinstance(m, RowDropPath)]
    for layer in layers:
        layer.rows = (start, total)
    return any(layer.rate > 0 for layer in layers)
