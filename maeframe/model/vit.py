"""ViT encoder over visible tokens and the lightweight MAE decoder, built from timm's `Block`."""
from __future__ import annotations

from functools import partial

import torch
from timm.models import checkpoint_seq
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from .drop_path import use_row_drop_path
from .pos_embed import sincos_pos_embed
from .windowed import make_windowed_blocks

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def gather_tokens(x: Tensor, ids: Tensor) -> Tensor:
    """x [B, N, D], ids [B, K] -> [B, K, D]."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def with_mask_tokens(visible: Tensor, mask_token: Tensor, ids_restore: Tensor) -> Tensor:
    """visible [B, V, D] (in the encoder's order), mask_token [1, 1, D], ids_restore [B, N] -> [B, N, D] in grid
    order: each visible token back at its position, the mask token at every hidden one."""
    hidden = ids_restore.shape[1] - visible.shape[1]
    x = torch.cat([visible, mask_token.expand(visible.shape[0], hidden, -1)], dim=1)
    return gather_tokens(x, ids_restore)


def run_blocks(blocks: nn.Sequential, x: Tensor, recompute: bool) -> Tensor:
    """x [B, L, D] through the blocks; with `recompute`, each block's activations are dropped after the
    forward and recomputed in the backward (activation checkpointing: memory for compute)."""
    if recompute and torch.is_grad_enabled():
        return checkpoint_seq(blocks, x, use_reentrant=False)
    return blocks(x)


def make_blocks(dim: int, depth: int, heads: int, mlp_ratio: float, drop_path: float = 0.0) -> nn.Sequential:
    """timm blocks whose stochastic depth rises linearly to `drop_path`, drawn per global sample (RowDropPath)."""
    rates = torch.linspace(0, drop_path, depth).tolist()
    blocks = nn.Sequential(*[
        Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm, drop_path=rate) for rate in rates
    ])
    use_row_drop_path(blocks)
    return blocks


class Encoder(nn.Module):
    """Patch embedding + fixed sin-cos positions + cls token + transformer blocks + final norm.

    The patch embedding is a Linear over flat patches (equal to the stride-p convolution of the reference)
    and runs on visible patches only.
    """

    def __init__(self, grid: tuple[int, ...], patch_dim: int, embed_dim: int, depth: int, num_heads: int,
                 mlp_ratio: float = 4.0, drop_path: float = 0.0, recompute: bool = False):
        super().__init__()
        self.grid, self.recompute = tuple(grid), recompute
        self.embed_dim = embed_dim
        self.patch_embed = nn.Linear(patch_dim, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sincos_pos_embed(self.grid, embed_dim)[None], persistent=False)
        self.blocks = make_blocks(embed_dim, depth, num_heads, mlp_ratio, drop_path)
        self.norm = LayerNorm(embed_dim)

    def embed(self, patches: Tensor, ids_keep: Tensor | None = None) -> Tensor:
        """patches [B, N, patch_dim], ids_keep [B, V] (None = all N tokens) -> the blocks' input [B, 1 + V, D]:
        patch embedding + positions of the kept tokens, the cls token first."""
        pos = self.pos_embed.expand(patches.shape[0], -1, -1)
        if ids_keep is not None:
            patches, pos = gather_tokens(patches, ids_keep), gather_tokens(pos, ids_keep)
        x = self.patch_embed(patches) + pos
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)

    def forward(self, patches: Tensor, ids_keep: Tensor | None = None) -> Tensor:
        """patches [B, N, patch_dim], ids_keep [B, V] (None = all N tokens) -> latent [B, 1 + V, D]."""
        return self.norm(run_blocks(self.blocks, self.embed(patches, ids_keep), self.recompute))

    def forward_intermediates(self, patches: Tensor, indices: list[int], ids_keep: Tensor | None = None) -> list[Tensor]:
        """The outputs [B, 1 + V, D] (cls token first, before the final norm) of the blocks at `indices`, running
        no block after the last of them (timm's `forward_intermediates`, for feature taps)."""
        x, taps = self.embed(patches, ids_keep), []
        for i, block in enumerate(self.blocks[: max(indices) + 1]):
            x = block(x)
            if i in indices:
                taps.append(x)
        return taps


class Decoder(nn.Module):
    """Projects the latent, fills hidden positions with a shared mask token, and predicts every token."""

    def __init__(self, grid: tuple[int, ...], encoder_dim: int, out_dim: int, embed_dim: int, depth: int,
                 num_heads: int, mlp_ratio: float = 4.0, window: tuple[int, int] | None = None,
                 window_shift: tuple[int, int] | None = None, recompute: bool = False):
        """window: None = global attention; (wt, wf) = local shifted-window attention on a 2-D grid.
        recompute: activation checkpointing of the blocks."""
        super().__init__()
        self.recompute = recompute
        self.embed = nn.Linear(encoder_dim, embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sincos_pos_embed(tuple(grid), embed_dim)[None], persistent=False)
        if window is None:
            self.blocks = make_blocks(embed_dim, depth, num_heads, mlp_ratio)
        else:
            self.blocks = make_windowed_blocks(embed_dim, depth, num_heads, mlp_ratio, tuple(grid), window,
                                               window_shift)
        self.norm = LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, out_dim)

    def forward(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """latent [B, 1 + V, D_enc], ids_restore [B, N] -> predictions [B, N, out_dim]."""
        x = self.embed(latent)
        cls, visible = x[:, :1], x[:, 1:]
        x = with_mask_tokens(visible, self.mask_token, ids_restore) + self.pos_embed
        x = self.norm(run_blocks(self.blocks, torch.cat([cls, x], dim=1), self.recompute))
        return self.head(x[:, 1:])
