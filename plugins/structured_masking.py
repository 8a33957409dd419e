"""Structured maskers: block (BEiT), tube (VideoMAE), running cell (VideoMAE v2), time/frequency (AudioMAE).

All four return masks with static shapes (every sample of a batch hides the same number of tokens) as
gather indices, draw their randomness from torch's global generator on the target device, and never
synchronise with the host on an accelerator. Grids are read from `TokenSpec.grid`:

* `block`       2-D (H, W), or 3-D (T, H, W) where one 2-D layout is shared by every time step;
* `tube`        3-D (T, H, W);
* `running_cell` 3-D (T, H, W) with even H and W;
* `time_freq`   2-D (T, F): grid axis 0 is time, axis 1 is frequency (a spectrogram tokenizer that lays
                tokens out time-major, as AudioMAE does for its 1024×128 log-mel input).
"""
from __future__ import annotations

import math

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor

from maeframe import Mask, Masker, OptionError, Options, TokenSpec, hookimpl, visible_count


def mask_from_hidden(hidden: Tensor, num_visible: int) -> Mask:
    """A `Mask` from hidden [B, N] bool whose rows all hide N - num_visible tokens (not checked: no sync).

    Visible tokens keep grid order in `ids_keep`, hidden ones follow in grid order; the sort keys are
    distinct, so the result does not depend on the sort's stability.
    """
    num_tokens = hidden.shape[1]
    order = torch.arange(num_tokens, device=hidden.device, dtype=torch.float32)
    return Mask.from_noise(hidden.float() * num_tokens + order, num_visible)


def _spatial_grid(spec: TokenSpec, masker: str) -> tuple[int, int, int]:
    """(T, H, W) of a 2-D (T = 1) or 3-D grid; ValueError naming the grid otherwise."""
    if len(spec.grid) == 2:
        return (1, *spec.grid)
    if len(spec.grid) == 3:
        return spec.grid
    raise ValueError(f"{masker} masker needs a 2-D (H, W) or 3-D (T, H, W) token grid, got grid {spec.grid}")


# --- block (BEiT) ----------------------------------------------------------------------------------------

class BlockOptions(Options):
    ratio: float = Field(0.4, ge=0, lt=1, description="fraction of tokens hidden from the encoder (per frame "
                                                      "on a 3-D grid); BEiT hides 75 of 196 ≈ 0.4")
    min_block: int = Field(16, ge=1, description="fewest tokens in one rectangle (BEiT: 16); only the last "
                                                 "rectangles may be smaller, when fewer tokens remain to hide")
    max_block: int | None = Field(None, ge=1, description="most new tokens one rectangle may hide; None = as many "
                                                          "as remain to be hidden (BEiT)")
    min_aspect: float = Field(0.3, gt=0, le=1, description="rectangle height/width lies in [min_aspect, "
                                                           "1/min_aspect], drawn log-uniformly (BEiT: 0.3)")
    attempts: int = Field(10, ge=1, description="rectangles proposed per sample in one round; the first that "
                                                "fits is placed (BEiT tries 10)")
    rounds: int = Field(32, ge=1, description="placement rounds per batch (one rectangle per sample per round at "
                                              "most); tokens still missing afterwards are hidden at random")

    @model_validator(mode="after")
    def _block_sizes(self):
        if self.max_block is not None and self.max_block < self.min_block:
            raise ValueError(f"max_block {self.max_block} is smaller than min_block {self.min_block}")
        return self


def block_layout(batch_size: int, height: int, width: int, num_masked: int, *, min_block: int,
                 max_block: int | None, min_aspect: float, attempts: int, rounds: int,
                 device: torch.device) -> Tensor:
    """Union of random rectangles, BEiT's blockwise procedure run for a whole batch at once.

    Returns [B, H, W] bool (True = hidden) with at most `num_masked` hidden tokens per sample.

    Each round proposes `attempts` rectangles per sample: area uniform in [min_block, left] (left = tokens
    still to hide, capped by max_block; when left < min_block the range is [left, min_block]), height/width
    log-uniform in [min_aspect, 1/min_aspect], position uniform. A proposal fits when its rounded size keeps
    the aspect bound and at least min(min_block, left) tokens, and it adds between 1 and `left` (capped by
    max_block) new hidden tokens; the first fitting proposal of each sample is placed. New tokens are
    counted from an integral image of the current mask, so proposals cost [B, attempts] work, not
    [B, attempts, H, W]. All random numbers ([rounds, 4, B, attempts]) are drawn up front, so the
    generator advances the same way whether or not the loop stops early (it does only on the CPU, where
    checking costs no device synchronisation).
    """
    u = torch.rand(rounds, 4, batch_size, attempts, device=device)
    rows = torch.arange(height, device=device).view(1, height, 1)
    cols = torch.arange(width, device=device).view(1, 1, width)
    hidden = torch.zeros(batch_size, height, width, dtype=torch.bool, device=device)
    integral = torch.zeros(batch_size, height + 1, width + 1, dtype=torch.int32, device=device)
    left = torch.full((batch_size, 1), float(num_masked), device=device)
    log_lo, log_hi = math.log(min_aspect), -math.log(min_aspect)
    stride = width + 1
    for r in range(rounds):
        u_area, u_aspect, u_top, u_left = u[r]                          # each [B, A]
        cap = left if max_block is None else left.clamp(max=max_block)  # [B, 1]
        area = min_block + (cap - min_block) * u_area
        aspect = torch.exp(log_lo + (log_hi - log_lo) * u_aspect)
        h = torch.sqrt(area * aspect).round().clamp(1, height)
        w = torch.sqrt(area / aspect).round().clamp(1, width)
        shape = h / w
        fits = (shape >= min_aspect * (1 - 1e-6)) & (shape <= (1 + 1e-6) / min_aspect)
        fits &= h * w >= left.clamp(max=min_block)
        top = torch.floor(u_top * (height - h + 1)).clamp(max=height - h)
        lft = torch.floor(u_left * (width - w + 1)).clamp(max=width - w)
        bottom, right = top + h, lft + w
        corners = torch.stack([bottom * stride + right, top * stride + right,
                               bottom * stride + lft, top * stride + lft], dim=1).long()  # [B, 4, A]
        s = integral.view(batch_size, 1, -1).expand(-1, 4, -1).gather(2, corners).float()
        new = h * w - (s[:, 0] - s[:, 1] - s[:, 2] + s[:, 3])         # tokens the proposal would add
        fits &= (new > 0) & (new <= cap)
        first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)        # first fitting attempt, [B, 1]
        placed = fits.any(dim=1)                                        # [B]
        pick = lambda x: x.gather(1, first).view(-1, 1, 1)              # noqa: E731
        rect = ((rows >= pick(top)) & (rows < pick(bottom)) & (cols >= pick(lft)) & (cols < pick(right))
                & placed.view(-1, 1, 1))
        hidden |= rect
        left = left - torch.where(placed[:, None], new.gather(1, first), 0.0)
        integral[:, 1:, 1:] = hidden.to(torch.int32).cumsum(1).cumsum(2)
        if device.type == "cpu" and not bool((left > 0).any()):
            break
    return hidden


class BlockMasker(Masker):
    """BEiT blockwise masking with an exact count.

    grid (H, W) or (T, H, W); N = prod(grid). Per sample (and per frame on a 3-D grid) it hides exactly
    H·W - visible_count(H·W, ratio) tokens: `block_layout` places random rectangles of at least
    `min_block` tokens with aspect ratio in [min_aspect, 1/min_aspect] until that many are hidden (or the
    rounds run out), then the shortfall is hidden at random among the remaining tokens. On a 3-D grid the
    same 2-D layout is used for every time step (a block tube). Visible tokens are in random order.
    Returns ids_keep [B, T·visible_count(H·W, ratio)], ids_restore [B, N], masked [B, N].
    """

    Options = BlockOptions

    def __init__(self, options: BlockOptions, spec: TokenSpec):
        super().__init__(options, spec)
        self.frames, self.height, self.width = _spatial_grid(spec, "block")
        if options.min_block > self.height * self.width:
            raise ValueError(f"min_block {options.min_block} is larger than the {self.height}×{self.width} "
                             f"token grid {spec.grid}")

    def visible_tokens(self) -> int:
        return self.frames * visible_count(self.height * self.width, self.options.ratio)

    def layout(self, batch_size: int, device: torch.device) -> Tensor:
        """The rectangles alone: [B, H, W] bool, at most the target count per sample (no random fill)."""
        o, hw = self.options, self.height * self.width
        return block_layout(batch_size, self.height, self.width, hw - visible_count(hw, o.ratio),
                            min_block=o.min_block, max_block=o.max_block, min_aspect=o.min_aspect,
                            attempts=o.attempts, rounds=o.rounds, device=device)

    def __call__(self, batch_size: int, device: torch.device) -> Mask:
        hw = self.height * self.width
        keep = visible_count(hw, self.options.ratio)
        blocks = self.layout(batch_size, device).view(batch_size, hw)
        # lowest noise stays visible: tokens outside the rectangles first, so a shortfall is filled (and an
        # excess, which block_layout never produces, trimmed) at random
        noise = blocks.float() + torch.rand(batch_size, hw, device=device)
        frame = Mask.from_noise(noise, keep)
        if self.frames == 1:
            return frame
        hidden = frame.masked.bool()[:, None, :].expand(batch_size, self.frames, hw).reshape(batch_size, -1)
        return mask_from_hidden(hidden, self.frames * keep)


# --- tube (VideoMAE) -------------------------------------------------------------------------------------

class TubeOptions(Options):
    ratio: float = Field(0.9, ge=0, lt=1, description="fraction of each frame's tokens hidden, the same "
                                                      "positions in every frame (VideoMAE: 0.9)")


class TubeMasker(Masker):
    """VideoMAE tube masking: one random spatial mask per sample, repeated along time.

    grid (T, H, W); N = T·H·W. Each sample hides the same H·W - visible_count(H·W, ratio) spatial
    positions in every frame, so masked.view(B, T, H·W)[:, t] is identical for all t. (VideoMAE rounds the
    hidden count down instead of the kept count; the two differ by at most one token per frame.)
    Returns ids_keep [B, T·visible_count(H·W, ratio)] in grid order, ids_restore [B, N], masked [B, N].
    """

    Options = TubeOptions

    def __init__(self, options: TubeOptions, spec: TokenSpec):
        super().__init__(options, spec)
        if len(spec.grid) != 3:
            raise ValueError(f"tube masker needs a 3-D (T, H, W) token grid, got grid {spec.grid}")

    def visible_tokens(self) -> int:
        frames, height, width = self.spec.grid
        return frames * visible_count(height * width, self.options.ratio)

    def __call__(self, batch_size: int, device: torch.device) -> Mask:
        frames, height, width = self.spec.grid
        hw = height * width
        keep = visible_count(hw, self.options.ratio)
        rank = torch.argsort(torch.argsort(torch.rand(batch_size, hw, device=device), dim=1), dim=1)
        hidden = (rank >= keep)[:, None, :].expand(batch_size, frames, hw).reshape(batch_size, -1)
        return mask_from_hidden(hidden, frames * keep)


# --- running cell (VideoMAE v2) ----------------------------------------------------------------------------

class RunningCellOptions(Options):
    ratio: float = Field(0.5, gt=0, lt=1, description="fraction hidden in every 2×2 cell of every frame: 0.25, "
                                                      "0.5 or 0.75 (1, 2 or 3 of the 4 cell positions)")

    @field_validator("ratio")
    @classmethod
    def _quarter(cls, value: float) -> float:
        if abs(4 * value - round(4 * value)) > 1e-6:
            raise ValueError(f"running_cell hides whole quarters of a 2×2 cell: ratio must be 0.25, 0.5 or 0.75, "
                             f"got {value}")
        return value


class RunningCellMasker(Masker):
    """VideoMAE v2's running-cell pattern (its decoder mask), here as a general masker.

    grid (T, H, W) with even H and W; N = T·H·W. Number the positions of each 2×2 spatial cell
    k = 2·(h mod 2) + (w mod 2) (raster order) and let m = 4·ratio. With a per-sample offset s drawn
    uniformly from {0, 1, 2, 3}, token (t, h, w) is hidden iff (k + t + s) mod 4 < m: the same pattern
    in every cell of a frame, m of 4 positions hidden, and from one frame to the next the hidden set moves
    one position back in raster order (what frame t hides at k + 1, frame t + 1 hides at k). VideoMAE v2
    builds the same four sequences by advancing a cyclic pointer over [1]*m + [0]*(4-m) before each frame.
    Returns ids_keep [B, N·(4-m)/4] in grid order, ids_restore [B, N], masked [B, N].
    """

    Options = RunningCellOptions

    def __init__(self, options: RunningCellOptions, spec: TokenSpec):
        super().__init__(options, spec)
        if len(spec.grid) != 3:
            raise ValueError(f"running_cell masker needs a 3-D (T, H, W) token grid, got grid {spec.grid}")
        _, height, width = spec.grid
        if height % 2 or width % 2:
            raise ValueError(f"running_cell masker tiles 2×2 cells: H and W of grid {spec.grid} must be even")

    def visible_tokens(self) -> int:
        return self.spec.num_tokens * (4 - round(4 * self.options.ratio)) // 4

    def pattern(self, offset: Tensor) -> Tensor:
        """offset [B] long in 0..3 -> hidden [B, T, H, W] bool."""
        frames, height, width = self.spec.grid
        device = offset.device
        t = torch.arange(frames, device=device).view(1, frames, 1, 1)
        k = (2 * (torch.arange(height, device=device) % 2)).view(1, 1, height, 1) \
            + (torch.arange(width, device=device) % 2).view(1, 1, 1, width)
        return (k + t + offset.view(-1, 1, 1, 1)) % 4 < round(4 * self.options.ratio)

    def __call__(self, batch_size: int, device: torch.device) -> Mask:
        hidden_per_cell = round(4 * self.options.ratio)
        offset = torch.randint(0, 4, (batch_size,), device=device)
        hidden = self.pattern(offset).reshape(batch_size, -1)
        return mask_from_hidden(hidden, self.spec.num_tokens * (4 - hidden_per_cell) // 4)


# --- time / frequency (AudioMAE) -------------------------------------------------------------------------

class TimeFreqOptions(Options):
    time_ratio: float = Field(0.7, ge=0, lt=1, description="fraction of time steps (grid axis 0) hidden whole: "
                                                           "int(T·time_ratio) columns across all frequencies")
    freq_ratio: float = Field(0.3, ge=0, lt=1, description="fraction of frequency bands (grid axis 1) hidden "
                                                           "whole: int(F·freq_ratio) rows across all time steps")


class TimeFreqMasker(Masker):
    """AudioMAE-style 2-D spectrogram masking: whole time columns and whole frequency rows.

    grid (T, F): axis 0 is time, axis 1 frequency (token t·F + f). Per sample, kt = int(T·time_ratio)
    time steps and kf = int(F·freq_ratio) frequency bands are chosen uniformly; a token is hidden when its
    time step or its band is chosen. Every sample hides kt·F + kf·T - kt·kf tokens and keeps
    (T - kt)·(F - kf). (AudioMAE rounds the kept counts down instead; they can differ by one column/row.)
    Returns ids_keep [B, (T-kt)·(F-kf)] in grid order, ids_restore [B, T·F], masked [B, T·F].
    """

    Options = TimeFreqOptions

    def __init__(self, options: TimeFreqOptions, spec: TokenSpec):
        super().__init__(options, spec)
        if len(spec.grid) != 2:
            raise ValueError(f"time_freq masker needs a 2-D (time, freq) token grid, got grid {spec.grid}")

    def counts(self) -> tuple[int, int]:
        """(hidden time steps, hidden frequency bands)."""
        time, freq = self.spec.grid
        return int(time * self.options.time_ratio), int(freq * self.options.freq_ratio)

    def visible_tokens(self) -> int:
        (time, freq), (hide_t, hide_f) = self.spec.grid, self.counts()
        return (time - hide_t) * (freq - hide_f)

    def check_counts(self, field: str = "time_ratio") -> None:
        """Both ratios are below 1, so a token always stays visible; refuse ratios that hide no whole column
        and no whole row of this grid."""
        if self.visible_tokens() == self.spec.num_tokens:
            (time, freq), o = self.spec.grid, self.options
            raise OptionError(field, f"time_ratio {o.time_ratio} hides int({time} × {o.time_ratio}) = 0 of {time} "
                                     f"time steps and freq_ratio {o.freq_ratio} hides int({freq} × {o.freq_ratio}) = 0 of "
                                     f"{freq} bands: no token of grid {self.spec.grid} is hidden, so there is nothing "
                                     f"to reconstruct (the loss would be NaN); raise either ratio")

    def __call__(self, batch_size: int, device: torch.device) -> Mask:
        time, freq = self.spec.grid
        hide_t, hide_f = self.counts()
        rank_t = torch.argsort(torch.argsort(torch.rand(batch_size, time, device=device), dim=1), dim=1)
        rank_f = torch.argsort(torch.argsort(torch.rand(batch_size, freq, device=device), dim=1), dim=1)
        hidden = (rank_t < hide_t)[:, :, None] | (rank_f < hide_f)[:, None, :]   # [B, T, F]
        return mask_from_hidden(hidden.reshape(batch_size, -1), (time - hide_t) * (freq - hide_f))


@hookimpl
def register_maskers(register):
    register("block", BlockMasker)
    register("tube", TubeMasker)
    register("running_cell", RunningCellMasker)
    register("time_freq", TimeFreqMasker)
