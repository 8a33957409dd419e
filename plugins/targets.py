"""Pixel target: the raw patch values, optionally normalised per patch (MAE's norm_pix_loss, or VideoMAE's
per-channel variant)."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from maeframe import Mask, Options, PatchValues, Target, TargetOut, Tokens, hookimpl


class PixelOptions(Options):
    norm_pix: bool = Field(True, description="normalise each patch by its own mean and variance")
    eps: float | tuple[float, ...] = Field(
        1e-6, description="added to the per-patch variance before the square root (or to the standard deviation, "
                          "see eps_after_sqrt); with norm_over channel one value per channel may be given")
    norm_over: Literal["patch", "channel"] = Field(
        "patch", description="norm_pix statistics: one mean and variance over all of a patch's values (MAE), or "
                             "one per channel over the patch's positions (VideoMAE's normalised target)")
    eps_after_sqrt: bool = Field(False, description="norm_pix: divide by sqrt(var) + eps (VideoMAE) instead of "
                                                    "sqrt(var + eps) (MAE)")

    @model_validator(mode="after")
    def _eps_fits(self) -> PixelOptions:
        values = self.eps if isinstance(self.eps, tuple) else (self.eps,)
        if not values or min(values) <= 0:
            raise ValueError(f"eps must be positive, got {self.eps}")
        if isinstance(self.eps, tuple) and self.norm_over != "channel":
            raise ValueError("eps: one value per channel needs norm_over: channel")
        return self


class PixelTarget(Target):
    """values [B, N, patch_dim]: patches, or (patch - mean) / sqrt(var + eps) per patch when norm_pix.

    The variance is the unbiased one over the patch's values, as in the MAE reference. With norm_over
    "channel" each channel of a patch (laid out (*patch_size, C), channels last) has its own mean and
    variance over the patch's positions, and eps_after_sqrt divides by sqrt(var) + eps: VideoMAE's target.
    """

    reconstructs_pixels = True  # the input's own pixels (norm_pix undone with the true patch statistics)

    Options = PixelOptions

    def __init__(self, options: PixelOptions, tokenizer):
        super().__init__(options, tokenizer)
        channels = tokenizer.spec.channels
        if isinstance(options.eps, tuple) and len(options.eps) != channels:
            raise ValueError(f"eps has {len(options.eps)} values but the tokenizer has {channels} channels")

    def _eps(self, like: Tensor) -> Tensor | float:
        """eps as a float, or per channel [C, 1] (broadcast over the grouped [..., C, positions] values)."""
        if isinstance(self.options.eps, tuple):
            return torch.tensor(self.options.eps, dtype=like.dtype, device=like.device)[:, None]
        return self.options.eps

    @property
    def out_dim(self) -> int:
        return self.tokenizer.spec.patch_dim

    @property
    def patch_values(self) -> PatchValues | None:
        """MAE's form only (per-patch statistics, eps inside the square root): HF's ViTMAE computes no other."""
        if self.options.norm_pix and (self.options.norm_over != "patch" or self.options.eps_after_sqrt):
            return None
        return PatchValues(self.options.norm_pix, self.options.eps)

    def _grouped(self, patches: Tensor) -> Tensor:
        """[B, N, patch_dim] -> the values each statistic is taken over, along the last axis: [B, N, patch_dim]
        (norm_over patch) or [B, N, C, prod(patch_size)] (channel)."""
        if self.options.norm_over == "patch":
            return patches
        channels = self.tokenizer.spec.channels
        return patches.unflatten(-1, (-1, channels)).transpose(-1, -2)

    def _ungrouped(self, values: Tensor) -> Tensor:
        return values if self.options.norm_over == "patch" else values.transpose(-1, -2).flatten(-2)

    def _stats(self, grouped: Tensor) -> tuple[Tensor, Tensor]:
        mean = grouped.mean(dim=-1, keepdim=True)
        if self.options.eps_after_sqrt:
            return mean, grouped.var(dim=-1, keepdim=True).sqrt() + self._eps(grouped)
        std = (grouped.var(dim=-1, keepdim=True) + self._eps(grouped)).sqrt()
        return mean, std

    def __call__(self, tokens: Tokens, mask: Mask) -> TargetOut:
        patches = tokens.patches.float()
        if not self.options.norm_pix:
            return TargetOut(patches)
        grouped = self._grouped(patches)
        mean, std = self._stats(grouped)
        return TargetOut(self._ungrouped((grouped - mean) / std))

    def reconstruct(self, prediction: Tensor, tokens: Tokens) -> Tensor:
        """Undo the per-patch normalisation with the true patch statistics (as the MAE demo does)."""
        if not self.options.norm_pix:
            return prediction
        mean, std = self._stats(self._grouped(tokens.patches.float()))
        return self._ungrouped(self._grouped(prediction) * std + mean)


@hookimpl
def register_targets(register):
    register("pixel", PixelTarget)
