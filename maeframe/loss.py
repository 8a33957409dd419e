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
    latent: [B, 1 + V, D] encoder output for the cls token and the V visible tokens. A joint model returns one
            Prediction per modality: its latent is the shared cls token and this modality's V visible tokens,
            split back out of the joint sequence.
    pooled: [B, D] or None: a joint model's pooled latent of this modality for cross-modal losses, computed
            as `model.pooled_latent` says (joint: mean of this modality's visible tokens in the joint output;
            separate: the shared blocks run on this modality's tokens alone, then normalised and averaged, as
            CAV-MAE feeds its contrastive loss); None when not asked for.
    """

    values: Tensor
    latent: Tensor
    pooled: Tensor | None = None


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


class CrossModalLoss(Component):
    """A scalar objective over the modalities of paired samples (e.g. CAV-MAE's contrastive term), named in a
    joint recipe's `joint_losses` and registered through `register_losses` like any loss. Constructed with its
    options and {modality name: tokenizer}; logged as loss/joint/<name>."""

    kind = "loss"

    def __init__(self, options: Options, tokenizers: dict[str, Tokenizer]):
        super().__init__(options)
        self.tokenizers = tokenizers

    @abstractmethod
    def __call__(self, predictions: dict[str, Prediction], masks: dict[str, Mask]) -> Tensor:
        """predictions / masks: {modality name: that modality's Prediction / Mask} of one micro-batch (every
        modality of the recipe). Returns a 0-dim float32 tensor."""
