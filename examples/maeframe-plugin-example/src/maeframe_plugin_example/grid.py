"""Grid-wise sampling (MAE paper, Fig. 6 ablation): keep one token of every stride×stride cell.

With stride 2 a quarter of the tokens stay visible (mask ratio 0.75) in a regular lattice. The masks are
precomputed once per possible offset, so a call is a table lookup: static shapes, no host sync.
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from maeframe import Mask, Masker, Options, TokenSpec


class GridOptions(Options):
    stride: int = Field(2, ge=2, description="cell side in tokens; one token of every stride×stride cell stays "
                                             "visible, so the mask ratio is 1 - 1/stride²")
    random_offset: bool = Field(False, description="draw the kept position inside the cell per sample "
                                                   "(same for every cell of that sample) instead of the top-left")


class GridMasker(Masker):
    """Keeps tokens (r, c) with r % stride == dy and c % stride == dx; (dy, dx) = (0, 0) unless random_offset.

    Needs a 2-D token grid whose sides are multiples of `stride`; anything else is a ValueError here, which
    `maeframe validate` reports under the recipe field `masker`.
    """

    Options = GridOptions

    def __init__(self, options: GridOptions, spec: TokenSpec):
        super().__init__(options, spec)
        if len(spec.grid) != 2:
            raise ValueError(f"grid masker needs a 2-D token grid, got grid {spec.grid}")
        stride = options.stride
        height, width = spec.grid
        if height % stride or width % stride:
            raise ValueError(f"token grid {height}×{width} is not divisible by stride {stride}")
        self.num_visible = (height // stride) * (width // stride)
        rows = torch.arange(height).repeat_interleave(width)  # row of each token in row-major order
        cols = torch.arange(width).repeat(height)
        shuffles = []  # one [visible..., hidden...] order per offset (dy, dx), offset index dy * stride + dx
        for dy in range(stride):
            for dx in range(stride):
                kept = (rows % stride == dy) & (cols % stride == dx)
                # stable sort on the hidden flag: kept tokens first, both groups in grid order
                shuffles.append(torch.argsort(~kept, stable=True))
        self._shuffle = torch.stack(shuffles)  # [stride², N]
        self._restore = torch.argsort(self._shuffle, dim=1)  # [stride², N]
        self._tables: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def _on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._tables:
            self._tables[device] = (self._shuffle.to(device), self._restore.to(device))
        return self._tables[device]

    def __call__(self, batch_size: int, device: torch.device) -> Mask:
        device = torch.device(device)
        shuffle, restore = self._on(device)
        if self.options.random_offset:
            offset = torch.randint(len(shuffle), (batch_size,), device=device)
        else:
            offset = torch.zeros(batch_size, dtype=torch.long, device=device)
        ids_shuffle, ids_restore = shuffle[offset], restore[offset]  # [B, N] each
        masked = (ids_restore >= self.num_visible).float()
        return Mask(ids_keep=ids_shuffle[:, : self.num_visible], ids_restore=ids_restore, masked=masked)
