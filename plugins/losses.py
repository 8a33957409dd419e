"""Per-token regression losses averaged over hidden tokens only (MAE): mse, l1, smooth_l1, cosine.

Every loss here reads prediction.values [B, N, D] and target.values [B, N, D], reduces each token to one
number, and averages those numbers over the tokens the mask hides (`masked_mean`). Predictions at visible
tokens never reach the loss. Arithmetic is fp32 whatever precision the decoder ran in.
"""
from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from maeframe import Loss, Mask, Options, Prediction, TargetOut, hookimpl, masked_mean


class MaskedMSE(Loss):
    """mean over hidden tokens of the per-token mean squared error."""

    def __call__(self, prediction: Prediction, target: TargetOut, mask: Mask) -> Tensor:
        per_token = (prediction.values.float() - target.values).pow(2).mean(dim=-1)
        return masked_mean(per_token, mask)


class MaskedL1(Loss):
    """mean over hidden tokens of the per-token mean absolute error |prediction - target|.

    values [B, N, D] -> per token [B, N] -> scalar.
    """

    def __call__(self, prediction: Prediction, target: TargetOut, mask: Mask) -> Tensor:
        per_token = (prediction.values.float() - target.values.float()).abs().mean(dim=-1)
        return masked_mean(per_token, mask)


class SmoothL1Options(Options):
    beta: float = Field(1.0, gt=0, description="error size where the quadratic part (0.5·x²/beta) turns "
                                               "into the linear part (|x| - beta/2); use `l1` for beta = 0")


class MaskedSmoothL1(Loss):
    """mean over hidden tokens of the per-token mean of torch's smooth L1 (Huber divided by beta).

    Per element with x = prediction - target: 0.5·x²/beta where |x| < beta, |x| - beta/2 elsewhere.
    values [B, N, D] -> per token [B, N] -> scalar.
    """

    Options = SmoothL1Options

    def __call__(self, prediction: Prediction, target: TargetOut, mask: Mask) -> Tensor:
        per_element = F.smooth_l1_loss(prediction.values.float(), target.values.float(),
                                       reduction="none", beta=self.options.beta)
        return masked_mean(per_element.mean(dim=-1), mask)


class CosineOptions(Options):
    eps: float = Field(1e-8, gt=0, description="lower bound on each vector's norm, so an all-zero prediction "
                                               "or target gives similarity 0 (loss 1) instead of NaN")


class MaskedCosine(Loss):
    """mean over hidden tokens of 1 - cos(prediction token, target token).

    Each token's D values are one vector; the loss ignores their lengths, so it lies in [0, 2]: 0 when
    the prediction points along the target, 1 when orthogonal, 2 when opposite.
    values [B, N, D] -> per token [B, N] -> scalar.
    """

    Options = CosineOptions

    def __call__(self, prediction: Prediction, target: TargetOut, mask: Mask) -> Tensor:
        similarity = F.cosine_similarity(prediction.values.float(), target.values.float(), dim=-1,
                                         eps=self.options.eps)
        return masked_mean(1.0 - similarity, mask)


@hookimpl
def register_losses(register):
    register("mse", MaskedMSE)
    register("l1", MaskedL1)
    register("smooth_l1", MaskedSmoothL1)
    register("cosine", MaskedCosine)
