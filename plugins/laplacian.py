"""Masked Laplacian loss: L1 between Laplacian-filtered prediction and target on hidden pixels.

The decoder's output for every token is un-patchified with the tokenizer into the input layout
([B, C, H, W] for images, [B, C, T, H, W] for video), and so is the target. Each channel of each frame
is filtered with the 3×3 Laplacian

    [[0,  1, 0],
     [1, -4, 1],
     [0,  1, 0]]

over the last two axes (H, W), and the loss is the mean |Δprediction - Δtarget| over the pixels of the
hidden tokens. It only makes sense where targets live in patch space (pixel targets, raw or norm_pix).

Borders are handled by replicate padding: a missing neighbour takes the value of the pixel itself, so
its term (neighbour - centre) is zero and a constant image filters to zero everywhere. With
`within_patch` (the default), every patch border counts as an image border: the filter never mixes
two tokens. That matters for norm_pix targets, where each patch is normalised by its own mean and
standard deviation: across a patch border the values jump although the image is smooth, and a
filter that crossed the border would ask the decoder to reproduce those jumps, and would read the
(unsupervised) predictions of visible neighbours. `within_patch: false` filters the whole
un-patchified image, which suits raw pixel targets (`norm_pix: false`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from maeframe import Loss, Mask, Options, Prediction, TargetOut, hookimpl


class LaplacianOptions(Options):
    within_patch: bool = Field(True, description="filter each patch on its own (replicate padding at every patch "
                                                 "border); false filters the whole image, crossing patch borders")


def laplacian(images: Tensor, cut: tuple[int, int] | None = None) -> Tensor:
    """3×3 Laplacian over the last two axes with replicate padding; images [..., H, W] -> [..., H, W].

    Written as the sum of the four differences (neighbour - centre); a difference across the image
    border is zero (replicate padding), and so is one across a patch border when cut = (p, q) is given
    (patches start at every multiple of p rows and q columns).
    """
    rows = images[..., 1:, :] - images[..., :-1, :]      # [..., H-1, W]: pixel below minus pixel
    cols = images[..., :, 1:] - images[..., :, :-1]      # [..., H, W-1]: pixel right minus pixel
    if cut is not None:
        p, q = cut
        rows = rows * _inside(images.shape[-2], p, images).unsqueeze(-1)
        cols = cols * _inside(images.shape[-1], q, images)
    # below - centre, above - centre, right - centre, left - centre; zero padding adds nothing.
    return (F.pad(rows, (0, 0, 0, 1)) - F.pad(rows, (0, 0, 1, 0))
            + F.pad(cols, (0, 1)) - F.pad(cols, (1, 0)))


def _inside(length: int, period: int, like: Tensor) -> Tensor:
    """[length - 1]: 1.0 where positions i and i + 1 lie in the same patch, 0.0 across a patch border."""
    after = torch.arange(1, length, device=like.device)
    return (after % period != 0).to(like.dtype)


class MaskedLaplacian(Loss):
    """mean over hidden pixels of |Laplacian(prediction) - Laplacian(target)|.

    prediction.values, target.values: [B, N, patch_dim] -> untokenize -> [B, C, ..., H, W]; every
    channel and frame is filtered separately; the pixel mask is the token mask [B, N] broadcast over
    patch_dim and untokenized the same way. Raises ValueError when the values are not in patch space
    (last dim != tokenizer.spec.patch_dim) or the input has fewer than two spatial axes.
    """

    Options = LaplacianOptions

    def __call__(self, prediction: Prediction, target: TargetOut, mask: Mask) -> Tensor:
        spec = self.tokenizer.spec
        for what, values in (("prediction", prediction.values), ("target", target.values)):
            if values.dim() != 3 or values.shape[-1] != spec.patch_dim:
                raise ValueError(f"laplacian loss needs {what} values in patch space [B, N, patch_dim="
                                 f"{spec.patch_dim}], got {list(values.shape)}; use it with a pixel target")
        if len(spec.patch_size) < 2:
            raise ValueError(f"laplacian loss needs at least two spatial axes, got patch_size {spec.patch_size}")
        # The filter is linear: Laplacian(prediction) - Laplacian(target) = Laplacian(prediction - target).
        difference = self.tokenizer.untokenize(prediction.values.float() - target.values.float())
        hidden = mask.masked.float().unsqueeze(-1).expand(*mask.masked.shape, spec.patch_dim)
        pixels = self.tokenizer.untokenize(hidden)
        cut = tuple(spec.patch_size[-2:]) if self.options.within_patch else None
        # Flatten batch, channels and frames: every [H, W] plane is filtered on its own.
        planes = lambda x: x.reshape(-1, *x.shape[-2:])  # noqa: E731
        error = laplacian(planes(difference), cut).abs()
        pixels = planes(pixels)
        return (error * pixels).sum() / pixels.sum()


@hookimpl
def register_losses(register):
    register("laplacian", MaskedLaplacian)
