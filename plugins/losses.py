"""Masked mean-squared error, averaged over hidden tokens only (MAE)."""
from __future__ import annotations

from torch import Tensor

from maeframe import Loss, Mask, Prediction, TargetOut, hookimpl, masked_mean


class MaskedMSE(Loss):
    """mean over hidden tokens of the per-token mean squared error."""

    def __call__(self, prediction: Prediction, target: TargetOut, mask: Mask) -> Tensor:
        per_token = (prediction.values.float() - target.values).pow(2).mean(dim=-1)
        return masked_mean(per_token, mask)


@hookimpl
def register_losses(register):
    register("mse", MaskedMSE)
