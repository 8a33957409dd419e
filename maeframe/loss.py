"""Losses compare a prediction with a target; they live outside the model."""
from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

from torch import Tensor

from .component import Component, Options
from .masker import Mask
from .target import TargetOut
from .tokenizer import Tokenizer


@dataclass
class Prediction:
    """What the model returns.

    values: [B, N, out_dim] decoder output for every grid position (cls token dropped).
    latent: [B, 1 + V, D] encoder output for the cls token and the V visible tokens ([B, V, D] when
            `has_cls` is False: weights of a layout without cls token, e.g. VideoMAE's).
    """

    values: Tensor
    latent: Tensor
    has_cls: bool = True


class Loss(Component):
    """A scalar training objective; a recipe combines several with weights."""

    kind = "loss"

    def __init__(self, options: Options, tokenizer: Tokenizer):
        super().__init__(options)
        self.tokenizer = tokenizer

    @abstractmethod
    def __call__(self, prediction: Prediction, target: TargetOut, mask: Mask) -> Tensor:
        """Returns a 0-dim float32 tensor."""


def masked_mean(per_token: Tensor, mask: Mask) -> Tensor:
    """Mean of per_token [B, N] over the hidden tokens only."""
    return (per_token * mask.masked).sum() / mask.masked.sum()
