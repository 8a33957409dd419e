"""Swin V2 style windowed blocks: scaled cosine attention, a continuous relative position bias, post-norm.

AudioMAE's pretrained decoder (`decoder_mode=1`) is built from these blocks (timm's `swin_transformer_v2_cr`
block as AudioMAE patched it), so its weights run in maeframe with `model.decoder_window_block: swin_v2`.
Against `WindowedBlock` (pre-norm ViT attention in windows) three things differ:

* attention logits are cosine similarities of queries and keys, cos(q, k) = q·k / max(|q||k|, 1e-6),
  divided by a learned per-head temperature `tau` (clamped to at least 0.01), not q·k / sqrt(head_dim);
* a relative position bias [H, W, W] is added to the logits: a small MLP (`meta_mlp`: 2 -> 384 -> H,
  ReLU, dropout 0.1 while training) of the log-spaced offsets sign(Δ)·log(1 + |Δ|) between the two tokens'
  (row, column) positions inside the window;
* residual branches are normalised after the operation: x + norm1(attn(x)), then x + norm2(mlp(x)).

Shifted windows mask former non-neighbours with -100 added to the logits (as Swin does), not -inf. The cls
token attends only to itself, as in `WindowedAttention`. Parameter names follow the reference: norm1,
attn.qkv, attn.proj, attn.meta_mlp.fc1 / fc2, attn.tau, norm2, mlp.fc1 / fc2.
"""
from __future__ import annotations

from functools import partial

import torch
from timm.layers import Mlp
from torch import Tensor, nn

from .windowed import WindowedAttention

META_HIDDEN = 384     # hidden width of the position-bias MLP
META_DROPOUT = 0.1    # its dropout while training
SHIFT_PENALTY = -100.0  # added to the logits of pairs that were not neighbours before the shift


def log_relative_offsets(window: tuple[int, int]) -> Tensor:
    """[W·W, 2] float: for every (query, key) pair of a wt×wf window (row-major tokens), the offset
    (Δrow, Δcolumn) = query - key as sign(Δ)·log(1 + |Δ|)."""
    rows, cols = torch.meshgrid(torch.arange(window[0]), torch.arange(window[1]), indexing="ij")
    coords = torch.stack([rows.reshape(-1), cols.reshape(-1)])                 # [2, W]
    offsets = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).reshape(-1, 2).float()
    return torch.sign(offsets) * torch.log1p(offsets.abs())


class CosineWindowedAttention(WindowedAttention):
    """`WindowedAttention` with scaled cosine logits, a per-head temperature and the MLP position bias."""

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int], window: tuple[int, int],
                 shift: tuple[int, int] = (0, 0)):
        super().__init__(dim, num_heads, grid, window, shift)
        self.meta_mlp = Mlp(2, META_HIDDEN, num_heads, act_layer=nn.ReLU, drop=META_DROPOUT)
        self.tau = nn.Parameter(torch.ones(num_heads))
        self.register_buffer("relative_offsets", log_relative_offsets(self.window), persistent=False)

    def position_bias(self) -> Tensor:
        """[1, H, W, W] additive logits from the relative offsets."""
        w = self.window[0] * self.window[1]
        return self.meta_mlp(self.relative_offsets).transpose(0, 1).reshape(1, self.num_heads, w, w)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q, k, v [B·nW, H, W, hd] (the windows of one sample consecutive) -> [B·nW, H, W, hd]."""
        bw, h, w, _ = q.shape
        norms = q.norm(dim=-1, keepdim=True) @ k.norm(dim=-1, keepdim=True).transpose(-2, -1)
        logits = q @ k.transpose(-2, -1) / norms.clamp(min=1e-6)
        logits = logits / self.tau.clamp(min=0.01).reshape(1, h, 1, 1) + self.position_bias()
        if self.region_mask is not None:                                       # [nW, W, W] True = neighbours
            nw = self.region_mask.shape[0]
            penalty = (~self.region_mask).to(logits.dtype) * SHIFT_PENALTY
            logits = (logits.view(bw // nw, nw, h, w, w) + penalty[None, :, None]).view(bw, h, w, w)
        return logits.softmax(dim=-1) @ v


class CosineWindowedBlock(nn.Module):
    """Post-norm block with `CosineWindowedAttention` (same call shape as `WindowedBlock`)."""

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int], window: tuple[int, int],
                 shift: tuple[int, int] = (0, 0), mlp_ratio: float = 4.0, norm_layer=None):
        super().__init__()
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        self.attn = CosineWindowedAttention(dim, num_heads, grid, window, shift)
        self.norm1 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.norm2 = norm_layer(dim)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, 1 + T·F, D] -> [B, 1 + T·F, D]."""
        x = x + self.norm1(self.attn(x))
        return x + self.norm2(self.mlp(x))
