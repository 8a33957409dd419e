"""Pixel target: the raw patch values, optionally normalised per patch (MAE's norm_pix_loss)."""
from __future__ import annotations

from pydantic import Field
from torch import Tensor

from maeframe import Mask, Options, PatchValues, Target, TargetOut, Tokens, hookimpl


class PixelOptions(Options):
    norm_pix: bool = Field(True, description="normalise each patch by its own mean and variance")
    eps: float = Field(1e-6, gt=0, description="added to the per-patch variance before the square root")


class PixelTarget(Target):
    """values [B, N, patch_dim]: patches, or (patch - mean) / sqrt(var + eps) per patch when norm_pix.

    The variance is the unbiased one over the patch's values, as in the MAE reference.
    """

    reconstructs_pixels = True  # the input's own pixels (norm_pix undone with the true patch statistics)

    Options = PixelOptions

    @property
    def out_dim(self) -> int:
        return self.tokenizer.spec.patch_dim

    @property
    def patch_values(self) -> PatchValues:
        return PatchValues(self.options.norm_pix, self.options.eps)

    def _stats(self, patches: Tensor) -> tuple[Tensor, Tensor]:
        mean = patches.mean(dim=-1, keepdim=True)
        std = (patches.var(dim=-1, keepdim=True) + self.options.eps).sqrt()
        return mean, std

    def __call__(self, tokens: Tokens, mask: Mask) -> TargetOut:
        patches = tokens.patches.float()
        if not self.options.norm_pix:
            return TargetOut(patches)
        mean, std = self._stats(patches)
        return TargetOut((patches - mean) / std)

    def reconstruct(self, prediction: Tensor, tokens: Tokens) -> Tensor:
        """Undo the per-patch normalisation with the true patch statistics (as the MAE demo does)."""
        if not self.options.norm_pix:
            return prediction
        mean, std = self._stats(tokens.patches.float())
        return prediction * std + mean


@hookimpl
def register_targets(register):
    register("pixel", PixelTarget)
