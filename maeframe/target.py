"""Targets compute what the decoder must predict for each token."""
from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

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
        """Map predictions [B, N, out_dim] back to patch space [B, N, patch_dim] for pictures, if possible."""
        return None
