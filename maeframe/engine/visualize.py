"""Reconstruction pictures: rows of original | masked | reconstruction | reconstruction + visible."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.utils import save_image

from ..build import Components
from ..dataset import Dataset
from ..loss import Prediction
from ..masker import Mask
from ..tokenizer import Tokens

MIN_SIDE = 112  # small images (e.g. 28² Fashion-MNIST) are enlarged with nearest-neighbour for viewing


def reconstruction_panels(components: Components, dataset: Dataset, tokens: Tokens, mask: Mask,
                          prediction: Prediction) -> torch.Tensor | None:
    """[B, 4, *input_shape] in [0, 1]: original | masked | reconstruction | reconstruction with the visible
    patches pasted back; None when the target has no picture (e.g. HOG or teacher features)."""
    tokenizer = components.tokenizer
    recon = components.target.reconstruct(prediction.values.float(), tokens)
    original = dataset.denormalize(tokens.source.float())
    if recon is None:
        return None
    hidden = mask.masked.unsqueeze(-1)
    shown = tokenizer.tokenize(original).patches
    masked = tokenizer.untokenize(shown * (1 - hidden) + 0.5 * hidden)
    reconstruction = dataset.denormalize(tokenizer.untokenize(recon))
    pasted = tokenizer.untokenize(shown * (1 - hidden) + tokenizer.tokenize(reconstruction).patches * hidden)
    return torch.stack([original, masked, reconstruction, pasted], dim=1).clamp(0, 1)


def save_panels(panels: torch.Tensor, path: Path) -> None:
    """panels [B, K, C, H, W] in [0, 1] -> one PNG, a row per sample, small images enlarged."""
    b, k, c, h, w = panels.shape
    images = panels.reshape(b * k, c, h, w)
    scale = math.ceil(MIN_SIDE / min(h, w))
    if scale > 1:
        images = F.interpolate(images, scale_factor=scale, mode="nearest")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, path, nrow=k, padding=2, pad_value=1.0)
