"""The inter-modal contrastive term of CAV-MAE: InfoNCE between the L2-normalised pooled representations of
two modalities of the same samples, the other samples of the global batch as negatives."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

from maeframe import CrossModalLoss, OptionError, Options, all_rank_rows, hookimpl


def info_nce(first: Tensor, second: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """first [B, D], second [B, D]: pooled representations of B pairs (row i of each is one sample) ->
    (loss with the `first` rows as queries, loss with the `second` rows as queries), each a 0-dim float32
    tensor: mean over queries of -log softmax_j(cos(q_i, k_j) / temperature)[i]. Under torchrun the rows of
    every process join (`all_rank_rows`), so the negatives are the whole global batch and every process
    computes the same value."""
    first = F.normalize(all_rank_rows(first).float(), dim=1)
    second = F.normalize(all_rank_rows(second).float(), dim=1)
    logits = first @ second.T / temperature                                            # [N·B, N·B]
    labels = torch.arange(len(logits), device=logits.device)
    return F.cross_entropy(logits, labels), F.cross_entropy(logits.T, labels)


class ContrastiveOptions(Options):
    first: str = Field("audio", min_length=1, description="one modality of the pairs (a name under `modalities`)")
    second: str = Field("visual", min_length=1, description="the other modality")
    temperature: float = Field(0.05, gt=0, description="softmax temperature of the cosine similarities "
                                                       "(CAV-MAE: 0.05)")
    queries: str = Field("both", description="both: the mean of the two directions (symmetric InfoNCE); a "
                                             "modality name: only that modality's rows are queries, softmax "
                                             "over the other's (CAV-MAE's default single direction is "
                                             "queries: visual, its log_softmax over the audio rows)")

    @model_validator(mode="after")
    def _names(self):
        if self.first == self.second:
            raise ValueError(f"first and second are both {self.first!r}")
        if self.queries not in ("both", self.first, self.second):
            raise ValueError(f"queries {self.queries!r} must be both, {self.first!r} or {self.second!r}")
        return self


class ContrastiveLoss(CrossModalLoss):
    """InfoNCE between the pooled latents (`Prediction.pooled`, [B, D]) of two modalities of the same samples:
    each sample's own pair is the positive, every other sample of the global batch a negative. The joint
    model must pool them (`model.pooled_latent`: separate, as CAV-MAE, or joint)."""

    Options = ContrastiveOptions

    def __init__(self, options: ContrastiveOptions, tokenizers: dict):
        super().__init__(options, tokenizers)
        for field in ("first", "second"):
            if getattr(options, field) not in tokenizers:
                raise OptionError(field, f"{getattr(options, field)!r} is not a modality of this recipe "
                                         f"({sorted(tokenizers)})")

    def __call__(self, predictions: dict, masks: dict) -> Tensor:
        o = self.options
        first, second = predictions[o.first].pooled, predictions[o.second].pooled
        if first is None or second is None:
            raise ValueError("the contrastive loss needs pooled latents: set model.pooled_latent")
        first_queries, second_queries = info_nce(first, second, o.temperature)
        if o.queries == "both":
            return (first_queries + second_queries) / 2
        return first_queries if o.queries == o.first else second_queries


@hookimpl
def register_losses(register):
    register("contrastive", ContrastiveLoss)


@hookimpl
def validate_recipe(recipe):
    """A contrastive term without pooled latents would fail at the first step: refuse the recipe instead."""
    names = [ref.name for ref in (getattr(recipe, "joint_losses", None) or [])]
    if "contrastive" in names and recipe.model.pooled_latent == "none":
        raise ValueError("model.pooled_latent: the contrastive joint loss compares pooled latents; set it to "
                         "separate (CAV-MAE: each modality alone through the shared blocks) or joint")
