"""Targets compute what the decoder must predict for each token."""
from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from .component import Component, Options
from .masker import Mask
from .tokenizer import Tokenizer, Tokens


@dataclass
class TargetOut:
    """values: [B, N, out_dim] the regression target for every token (losses pick the masked ones)."""

    values: Tensor


@dataclass(frozen=True)
class PatchValues:
    """A target whose values are the input's own flat patches [B, N, patch_dim]: as they are (norm_pix False),
    or each patch normalised as (patch - mean) / sqrt(unbiased var + eps) (MAE's norm_pix_loss)."""

    norm_pix: bool
    eps: float = 1e-6


class Target(Component):
    """Builds per-token targets; tells the decoder head its output size through `out_dim`."""

    kind = "target"
    # True when `reconstruct` maps predictions back to the input itself (pixels, spectrogram values, ...):
    # pictures paste it into the sample and `maeframe compare` scores masked PSNR and high-frequency error.
    # False (the default): `reconstruct`, if any, draws the target's own space (edges, frequencies, ...):
    # pictures show the true target beside the prediction, and pixel metrics are n/a.
    reconstructs_pixels: ClassVar[bool] = False

    def __init__(self, options: Options, tokenizer: Tokenizer):
        super().__init__(options)
        self.tokenizer = tokenizer

    @property
    @abstractmethod
    def out_dim(self) -> int: ...

    @abstractmethod
    def __call__(self, tokens: Tokens, mask: Mask) -> TargetOut:
        """Called under torch.no_grad() and the step's autocast (a teacher runs in the step's precision);
        targets that need fp32 arithmetic disable autocast locally."""

    @property
    def patch_values(self) -> PatchValues | None:
        """What the values are when they are the input patches themselves (see `PatchValues`); None (the
        default): anything else. Exporters read it, e.g. to set Hugging Face ViTMAE's `norm_pix_loss`."""
        return None

    def reconstruct(self, prediction: Tensor, tokens: Tokens) -> Tensor | None:
        """Map per-token values [B, N, out_dim] (a prediction, or this target's own values) to patch space
        [B, N, patch_dim] for pictures, if possible: the input itself when `reconstructs_pixels`, else a
        drawing of the target's space. None: the target has no picture."""
        return None
