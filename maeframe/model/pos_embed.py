"""Fixed sin-cos position embeddings for a token grid of any rank (2D images, 3D video)."""
from __future__ import annotations

import torch
from torch import Tensor


def sincos_1d(positions: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """positions [N] -> [N, dim] laid out [sin(p·ω), cos(p·ω)], ω_k = temperature^(-k / (dim/2))."""
    omega = 1.0 / temperature ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_pos_embed(grid: tuple[int, ...], dim: int) -> Tensor:
    """Separable sin-cos embedding of a grid: [prod(grid), dim] float32, rows in row-major grid order.

    The width is split evenly across axes, the last axis first; for a 2D (H, W) grid this is exactly the
    MAE reference layout [sin(w), cos(w), sin(h), cos(h)].
    """
    rank = len(grid)
    if dim % (2 * rank):
        raise ValueError(f"sin-cos position embedding: width {dim} is not divisible by 2 × {rank} grid axes")
    coords = torch.meshgrid(*[torch.arange(n) for n in grid], indexing="ij")
    parts = [sincos_1d(coords[axis].reshape(-1), dim // rank) for axis in reversed(range(rank))]
    return torch.cat(parts, dim=1).float()
