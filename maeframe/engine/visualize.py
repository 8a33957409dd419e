"""Reconstruction panels of a pretraining run: what the model predicts, drawn next to what it saw."""
from __future__ import annotations

import torch

from ..build import Components
from ..dataset import Dataset
from ..loss import Prediction
from ..masker import Mask
from ..target import TargetOut
from ..tokenizer import Tokens



def reconstruction_panels(components: Components, dataset: Dataset, tokens: Tokens, mask: Mask,
                          prediction: Prediction, target: TargetOut | None = None) -> torch.Tensor | None:
    """[B, 4, *input_shape] in [0, 1]. A target in pixel space (`Target.reconstructs_pixels`): original |
    masked | reconstruction | reconstruction with the visible patches pasted back. Any other target that can
    draw itself (`reconstruct` returns patches): original | masked | true target | prediction, both in the
    target's own space, scaled together per sample. None when the target has no picture (e.g. HOG)."""
    tokenizer, goal = components.tokenizer, components.target
    recon = goal.reconstruct(prediction.values.float(), tokens)
    if recon is None:
        return None
    original = dataset.denormalize(tokens.source.float())
    hidden = mask.masked.unsqueeze(-1)
    shown = tokenizer.tokenize(original).patches
    masked = tokenizer.untokenize(shown * (1 - hidden) + 0.5 * hidden)
    if goal.reconstructs_pixels:
        reconstruction = dataset.denormalize(tokenizer.untokenize(recon))
        pasted = tokenizer.untokenize(shown * (1 - hidden) + tokenizer.tokenize(reconstruction).patches * hidden)
        return torch.stack([original, masked, reconstruction, pasted], dim=1).clamp(0, 1)
    if target is None:
        return None
    pair = torch.stack([tokenizer.untokenize(goal.reconstruct(target.values.float(), tokens)),
                        tokenizer.untokenize(recon)], dim=1)                           # [B, 2, *input_shape]
    flat = pair.flatten(1)
    low, high = flat.min(1).values, flat.max(1).values
    scale = (high - low).clamp_min(1e-8).view(-1, *[1] * (pair.dim() - 1))
    pair = (pair - low.view_as(scale)) / scale
    return torch.stack([original, masked, pair[:, 0], pair[:, 1]], dim=1).clamp(0, 1)
