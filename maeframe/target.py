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

    def reconstruct(self, prediction: Tensor, tokens: Tokens) -> Tensor | None:
        """Map per-token values [B, N, out_dim] (a prediction, or this target's own values) to patch space
        [B, N, patch_dim] for pictures, if possible: the input itself when `reconstructs_pixels`, else a
        drawing of the target's space. None: the target has no picture."""
        return None
