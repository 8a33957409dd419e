"""Local (shifted-window) attention blocks over a 2-D token grid: AudioMAE's decoder attention.

AudioMAE found that a decoder whose self-attention is restricted to local windows of the (time, frequency)
token grid reconstructs spectrograms better than global attention; like Swin, every other block shifts
the windows so information crosses window borders. Nothing here is audio-specific: any 2-D grid works.

`WindowedBlock` is a drop-in replacement of timm's ViT `Block` (same parameter names: norm1, attn.qkv,
attn.proj, norm2, mlp.fc1, mlp.fc2) for sequences [B, 1 + N, D] whose first token is a cls token and whose
N = T·F grid tokens come in row-major order. `make_windowed_blocks` builds a stack as the core's
`make_blocks` does; the decoder uses it when `model.decoder_attention` is "local".

Windows: the grid is cut into wt×wf windows (a window wider than an axis is clamped to the axis and never
shifted along it). Shifted blocks roll the grid by (-st, -sf) before cutting and mask pairs that were not
neighbours before the roll, so a shifted window never wraps around the grid: token (t, f) meets (t', f')
exactly when floor((t - st) / wt) == floor((t' - st) / wt) and likewise along f — window borders at
st, st + wt, ... as in Swin.

The cls token attends only to itself and no grid token sees it — equivalent to AudioMAE, which drops the
cls token before its decoder blocks (the core discards the decoder's cls output anyway). A single window
covering the grid is therefore global attention among the grid tokens.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import Tensor, nn


def window_groups(length: int, window: int, shift: int) -> Tensor:
    """[length] long: the window index of each position along one axis, borders at shift + k·window."""
    return torch.div(torch.arange(length) - shift, window, rounding_mode="floor")  # -1 before the first border


def reference_mask(grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]) -> Tensor:
    """[1 + N, 1 + N] bool, True = may attend: the pairs one windowed block lets interact, as a dense mask
    (used to check `WindowedBlock` against plain attention, and to document the semantics)."""
    (t, f), (wt, wf), (st, sf) = grid, window, shift
    gt = window_groups(t, wt, st)[:, None].expand(t, f).reshape(-1)
    gf = window_groups(f, wf, sf)[None, :].expand(t, f).reshape(-1)
    same = (gt[:, None] == gt[None, :]) & (gf[:, None] == gf[None, :])
    mask = torch.zeros(1 + t * f, 1 + t * f, dtype=torch.bool)
    mask[1:, 1:] = same
    mask[0, 0] = True
    return mask


def resolve_window(grid: tuple[int, int], window: tuple[int, int],
                   shift: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """Clamp the window to the grid (no shift along an axis the window covers) and check divisibility."""
    if len(grid) != 2 or len(window) != 2 or len(shift) != 2:
        raise ValueError(f"windowed attention needs a 2-D grid, window and shift; got {grid}, {window}, {shift}")
    out_window, out_shift = [], []
    for axis, n, w, s in zip(("time/rows", "frequency/columns"), grid, window, shift):
        if w <= 0 or s < 0:
            raise ValueError(f"window {window} must be positive and shift {shift} non-negative")
        w = min(w, n)
        s = 0 if w == n else s
        if n % w:
            raise ValueError(f"window {w} does not divide the {axis} grid axis {n} (grid {grid})")
        if s >= w:
            raise ValueError(f"shift {s} must be smaller than the window {w} along {axis}")
        out_window.append(w)
        out_shift.append(s)
    return tuple(out_window), tuple(out_shift)


class WindowedAttention(nn.Module):
    """Multi-head self-attention of [B, 1 + T·F, D] within (shifted) windows of the T×F grid."""

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int], window: tuple[int, int],
                 shift: tuple[int, int] = (0, 0), qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.grid = tuple(grid)
        self.window, self.shift = resolve_window(self.grid, tuple(window), tuple(shift))
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.register_buffer("region_mask", self._region_mask(), persistent=False)  # [nW, W, W] bool or None

    def _region_mask(self) -> Tensor | None:
        """Which pairs inside each window of the rolled grid were neighbours before the roll."""
        if self.shift == (0, 0):
            return None
        (t, f), (wt, wf), (st, sf) = self.grid, self.window, self.shift
        gt = torch.roll(window_groups(t, wt, st), -st)     # original group of each rolled row
        gf = torch.roll(window_groups(f, wf, sf), -sf)
        ids = ((gt[:, None] + 1) * (f + 2) + gf[None, :] + 1).float()[None, :, :, None]  # [1, T, F, 1], unique
        ids = _partition(ids, self.window).squeeze(-1)                         # [nW, W]
        return ids[:, :, None] == ids[:, None, :]

    def _bias(self) -> Tensor | None:
        """Additive [nW, 1, W, W] float mask of the shifted windows (-inf between former non-neighbours), or None."""
        mask = self.region_mask
        if mask is None:
            return None
        bias = torch.zeros(mask.shape, dtype=self.qkv.weight.dtype, device=mask.device)
        return bias.masked_fill(~mask, float("-inf"))[:, None]

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Scaled dot-product attention within each window: q, k, v [B·nW, H, W, hd] (the windows of one sample
        consecutive) -> [B·nW, H, W, hd]; pairs that were not neighbours before the shift are masked out."""
        bias = self._bias()
        if bias is not None:                                                   # [nW, 1, W, W]
            bw, h, w, _ = q.shape
            nw = bias.shape[0]
            bias = bias.to(q.dtype).expand(nw, h, w, w).repeat(bw // nw, 1, 1, 1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        (t, f), (st, sf) = self.grid, self.shift
        if n != 1 + t * f:
            raise ValueError(f"windowed attention over grid {self.grid} expects 1 + {t * f} tokens, got {n}")
        h, hd = self.num_heads, self.head_dim
        qkv = self.qkv(x).view(b, n, 3, h, hd)
        cls, grid = qkv[:, 0], qkv[:, 1:].reshape(b, t, f, 3 * h * hd)
        if st or sf:
            grid = torch.roll(grid, shifts=(-st, -sf), dims=(1, 2))
        windows = _partition(grid, self.window)                                # [B·nW, W, 3·H·hd]
        bw, w, _ = windows.shape
        q, k, v = windows.view(bw, w, 3, h, hd).permute(2, 0, 3, 1, 4)         # each [B·nW, H, W, hd]
        out = self.attend(q, k, v)                                             # [B·nW, H, W, hd]
        out = _unpartition(out.transpose(1, 2).reshape(bw, w, d), self.window, (t, f))  # [B, T, F, D]
        if st or sf:
            out = torch.roll(out, shifts=(st, sf), dims=(1, 2))
        out_cls = cls[:, 2].reshape(b, 1, d)                                   # attends only to itself: its value
        return self.proj(torch.cat([out_cls, out.reshape(b, t * f, d)], dim=1))


def _partition(x: Tensor, window: tuple[int, int]) -> Tensor:
    """[B, T, F, C] -> [B·nW, wt·wf, C], windows in row-major order."""
    b, t, f, c = x.shape
    wt, wf = window
    x = x.view(b, t // wt, wt, f // wf, wf, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wt * wf, c)


def _unpartition(windows: Tensor, window: tuple[int, int], grid: tuple[int, int]) -> Tensor:
    """Inverse of `_partition`: [B·nW, wt·wf, C] -> [B, T, F, C]."""
    (wt, wf), (t, f) = window, grid
    c = windows.shape[-1]
    x = windows.view(-1, t // wt, f // wf, wt, wf, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, t, f, c)


class WindowedBlock(nn.Module):
    """Pre-norm transformer block (timm `Block` layout) with `WindowedAttention`."""

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int], window: tuple[int, int],
                 shift: tuple[int, int] = (0, 0), mlp_ratio: float = 4.0, norm_layer=None):
        super().__init__()
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        self.norm1 = norm_layer(dim)
        self.attn = WindowedAttention(dim, num_heads, grid, window, shift)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def make_windowed_blocks(dim: int, depth: int, heads: int, mlp_ratio: float, grid: tuple[int, int],
                         window: tuple[int, int], shift: tuple[int, int] | None = None,
                         block: str = "vit") -> nn.Sequential:
    """`depth` windowed blocks; odd-indexed ones (the 2nd, 4th, ...) are shifted by `shift` (default half
    the window per axis, Swin; AudioMAE's 64×8 grid uses window (4, 4) and shift (2, 0)). block: "vit"
    (`WindowedBlock`) or "swin_v2" (`CosineWindowedBlock`, AudioMAE's decoder). Same call shape as the
    core's `make_blocks` plus the grid and window."""
    from .cosine_window import CosineWindowedBlock  # it builds on this module

    kind = {"vit": WindowedBlock, "swin_v2": CosineWindowedBlock}[block]
    window = tuple(window)
    shift = tuple(w // 2 for w in window) if shift is None else tuple(shift)
    return nn.Sequential(*[kind(dim, heads, grid, window, shift if i % 2 else (0, 0), mlp_ratio)
                           for i in range(depth)])
