"""HOG target (MaskFeat): per-token histograms of oriented gradients of the source image, computed on the fly.

For every frame and channel of `tokens.source`:

1. gradients with the centred [-1, 0, 1] filters along rows and columns, the image reflect-padded by one
   pixel (so the first and last row/column get a zero gradient across the border, as in scikit-image);
2. per pixel the magnitude sqrt(gx² + gy²) and the unsigned orientation atan2(gy, gx) mod π;
3. the magnitude votes into `bins` orientation bins of width π/bins: by default the whole magnitude goes to
   the bin that contains the orientation (no interpolation, as scikit-image and MaskFeat do); with
   `soft_bins` it is split linearly between the two bins whose centres are nearest (circularly);
4. votes are summed over non-overlapping `cell`×`cell` pixel cells;
5. per token the cells inside its patch are concatenated over channels (and, for video tubes, over the
   tubelet's frames) and L2-normalised: v / (‖v‖₂ + eps). With `norm: cell` each cell's histogram is
   normalised on its own instead (MaskFeat's reference implementation does that).

Everything is batched tensor code (no host synchronisation, loops only over the `bins` orientation bins)
and runs in fp32 with autocast disabled.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from maeframe import Mask, Options, Target, TargetOut, Tokenizer, Tokens, hookimpl


class HOGOptions(Options):
    bins: int = Field(9, ge=2, description="orientation bins over the unsigned range [0, π)")
    cell: int = Field(8, ge=1, description="cell side in pixels; must divide the patch height and width")
    soft_bins: bool = Field(False, description="split each pixel's vote linearly between the two nearest bin "
                                               "centres instead of giving it all to the bin containing its "
                                               "orientation")
    norm: Literal["token", "cell"] = Field("token", description="L2-normalise each token's whole histogram "
                                                                "vector (token) or each cell's histogram (cell)")
    eps: float = Field(1e-6, gt=0, description="added to the L2 norm before dividing: v / (‖v‖ + eps)")


def cell_histograms(images: Tensor, bins: int, cell: int, soft_bins: bool = False) -> Tensor:
    """Unnormalised HOG cell histograms.

    images [B, C, H, W] (H and W multiples of `cell`, at least 2) -> [B, C, H/cell, W/cell, bins] float32.
    Orientation bin k covers [k·π/bins, (k+1)·π/bins).
    """
    x = images.float()
    b, c, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    gx = padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2]
    gy = padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1]
    magnitude = torch.hypot(gx, gy)
    # position on the circular bin axis, in [0, bins]; bins itself means an orientation of ~π ≡ 0
    position = torch.remainder(torch.atan2(gy, gx), math.pi) * (bins / math.pi)
    if soft_bins:
        shifted = position - 0.5                       # bin centres sit at k + 0.5
        lower = torch.floor(shifted)
        upper_weight = shifted - lower
        lower_bin = torch.remainder(lower.long(), bins)
        upper_bin = torch.remainder(lower_bin + 1, bins)
        lower_vote, upper_vote = magnitude * (1 - upper_weight), magnitude * upper_weight
    else:
        lower_bin = torch.remainder(torch.floor(position).long(), bins)
    hists = []
    for k in range(bins):
        if soft_bins:
            vote = torch.where(lower_bin == k, lower_vote, 0.0) + torch.where(upper_bin == k, upper_vote, 0.0)
        else:
            vote = torch.where(lower_bin == k, magnitude, 0.0)
        hists.append(vote.view(b, c, h // cell, cell, w // cell, cell).sum(dim=(3, 5)))
    return torch.stack(hists, dim=-1)


def _l2_normalise(values: Tensor, eps: float) -> Tensor:
    return values / (torch.linalg.vector_norm(values, dim=-1, keepdim=True) + eps)


class HOGTarget(Target):
    """values [B, N, out_dim] with out_dim = T·C·(p/cell)·(q/cell)·bins (T = tubelet frames, 1 for images).

    Each token's vector is laid out (T, C, p/cell, q/cell, bins), row-major. Source shapes: images
    [B, C, H, W] with a 2-D grid (gh, gw) and patch (p, q); video [B, C, T_all, H, W] with a 3-D grid
    (gt, gh, gw) and tubelet (t, p, q), HOG computed per frame. The gradients see the whole frame (a patch's
    border pixels use their neighbours in the adjacent patch); only the image border is reflected.
    HOG of a constant brightness shift is unchanged; a positive contrast scale of all channels together is
    cancelled by the L2 normalisation (up to eps).
    """

    Options = HOGOptions

    def __init__(self, options: HOGOptions, tokenizer: Tokenizer):
        super().__init__(options, tokenizer)
        spec = tokenizer.spec
        if len(spec.grid) not in (2, 3):
            raise ValueError(f"hog target needs a 2-D (H, W) or 3-D (T, H, W) token grid, got grid {spec.grid}")
        p, q = spec.patch_size[-2:]
        if p % options.cell or q % options.cell:
            raise ValueError(f"patch size {p}×{q} is not a multiple of the HOG cell {options.cell}")
        if min(spec.grid[-2] * p, spec.grid[-1] * q) < 2:
            raise ValueError(f"hog target needs frames of at least 2×2 pixels, got grid {spec.grid} × patch "
                             f"{spec.patch_size}")

    @property
    def out_dim(self) -> int:
        spec, cell = self.tokenizer.spec, self.options.cell
        p, q = spec.patch_size[-2:]
        frames = spec.patch_size[0] if len(spec.patch_size) == 3 else 1
        return frames * spec.channels * (p // cell) * (q // cell) * self.options.bins

    def _check_source(self, source: Tensor) -> None:
        spec = self.tokenizer.spec
        expected = (spec.channels, *(g * s for g, s in zip(spec.grid, spec.patch_size)))
        if tuple(source.shape[1:]) != expected:
            raise ValueError(f"hog target expects a source of shape [B, {', '.join(map(str, expected))}] "
                             f"for grid {spec.grid} and patch {spec.patch_size}, got {list(source.shape)}")

    def __call__(self, tokens: Tokens, mask: Mask) -> TargetOut:
        """tokens.source [B, C, H, W] or [B, C, T, H, W] -> values [B, N, out_dim] float32 (mask unused)."""
        source = tokens.source
        self._check_source(source)
        spec, o = self.tokenizer.spec, self.options
        with torch.autocast(source.device.type, enabled=False):
            x = source.float()
            b, c = x.shape[:2]
            if len(spec.grid) == 2:
                frames, (gt, t), frames_per_sample = x.unsqueeze(1), (1, 1), 1
            else:
                gt, t = spec.grid[0], spec.patch_size[0]
                frames_per_sample = gt * t
                frames = x.transpose(1, 2)                              # [B, T_all, C, H, W]
            hist = cell_histograms(frames.reshape(b * frames_per_sample, c, *x.shape[-2:]), o.bins, o.cell,
                                   o.soft_bins)                         # [B·T_all, C, Hc, Wc, bins]
            if o.norm == "cell":
                hist = _l2_normalise(hist, o.eps)
            (gh, gw), (p, q) = spec.grid[-2:], spec.patch_size[-2:]
            pc, qc = p // o.cell, q // o.cell
            hist = hist.view(b, gt, t, c, gh, pc, gw, qc, o.bins)
            values = hist.permute(0, 1, 4, 6, 2, 3, 5, 7, 8).reshape(b, gt * gh * gw, -1)
            if o.norm == "token":
                values = _l2_normalise(values, o.eps)
        return TargetOut(values)


@hookimpl
def register_targets(register):
    register("hog", HOGTarget)
