"""Fixed sin-cos position embeddings: per axis of a token grid of any rank (`sincos_pos_embed`), or one
table over the flattened token order (`flat_sincos_pos_embed`)."""
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


def flat_sincos_pos_embed(num_tokens: int, dim: int) -> Tensor:
    """One sinusoid table over the flattened (row-major) token order: [num_tokens, dim] float32, token n and
    channel j get n / 10000^(2·(j // 2) / dim) through sin on even channels and cos on odd ones (the table of
    "Attention is all you need", interleaved; VideoMAE's fixed positions)."""
    exponent = 2 * (torch.arange(dim, dtype=torch.float64) // 2) / dim
    angles = torch.arange(num_tokens, dtype=torch.float64)[:, None] / 10000.0 ** exponent[None, :]
    table = torch.empty_like(angles)
    table[:, 0::2], table[:, 1::2] = angles[:, 0::2].sin(), angles[:, 1::2].cos()
    return table.float()
