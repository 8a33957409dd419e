"""Uniformity loss (Wang & Isola) on mean-pooled encoder features.

Wang & Isola, "Understanding Contrastive Representation Learning through Alignment and Uniformity on
the Hypersphere" (ICML 2020). For L2-normalised features z_1..z_B of one batch,

    uniformity = log( mean over pairs i != j of exp(-t · |z_i - z_j|²) )

It is low when the features spread over the sphere and 0 (its maximum) when they all coincide, so
adding it with a small weight discourages the encoder from collapsing every sample onto one feature.
Since |z_i - z_j|² lies in [0, 4], the loss lies in [-4t, 0]; -4t needs every pair antipodal, which only
a batch of two can reach.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from maeframe import Loss, Mask, Options, Prediction, TargetOut, hookimpl


class UniformityOptions(Options):
    t: float = Field(2.0, gt=0, description="temperature of the Gaussian potential exp(-t·d²); 2 as in "
                                            "Wang & Isola")


class Uniformity(Loss):
    """log of the mean of exp(-t·|z_i - z_j|²) over the B·(B-1) ordered pairs i != j of the batch.

    z [B, D]: prediction.latent [B, 1 + V, D] without the cls token (index 0, when `has_cls`), averaged over the V
    visible tokens and L2-normalised. Target and mask are not read. Computed with logsumexp in fp32;
    the diagonal is excluded by setting it to -inf (no boolean indexing, no host sync). Needs B >= 2
    (ValueError otherwise); gradients reach the encoder only.
    """

    Options = UniformityOptions

    def __call__(self, prediction: Prediction, target: TargetOut, mask: Mask) -> Tensor:
        latent = prediction.latent
        start = 1 if prediction.has_cls else 0
        if latent.dim() != 3 or latent.shape[1] < start + 1:
            raise ValueError(f"uniformity loss needs latent [B, {'1 + ' * start}V, D] with at least one visible "
                             f"token, got {list(latent.shape)}")
        batch = latent.shape[0]
        if batch < 2:
            raise ValueError(f"uniformity loss compares samples of a batch and needs batch size >= 2, got {batch}")
        z = F.normalize(latent[:, start:].float().mean(dim=1), dim=-1)            # [B, D]
        squared = z.pow(2).sum(dim=-1)
        distance2 = (squared[:, None] + squared[None, :] - 2.0 * z @ z.T).clamp_min(0.0)   # [B, B]
        diagonal = torch.eye(batch, dtype=torch.bool, device=z.device)
        logits = (-self.options.t * distance2).masked_fill(diagonal, float("-inf"))
        return torch.logsumexp(logits.flatten(), dim=0) - math.log(batch * (batch - 1))


@hookimpl
def register_losses(register):
    register("uniformity", Uniformity)
