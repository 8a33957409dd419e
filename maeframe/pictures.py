"""Picture files of reconstruction panels: a leaf module the component bases and the engine both use."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.utils import save_image

MIN_SIDE = 112  # small images (e.g. 28² Fashion-MNIST) are enlarged with nearest-neighbour for viewing


def save_panels(panels: torch.Tensor, path: Path) -> None:
    """panels [B, K, C, H, W] in [0, 1] -> one PNG, a row per sample, small images enlarged."""
    b, k, c, h, w = panels.shape
    images = panels.reshape(b * k, c, h, w)
    scale = math.ceil(MIN_SIDE / min(h, w))
    if scale > 1:
        images = F.interpolate(images, scale_factor=scale, mode="nearest")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, path, nrow=k, padding=2, pad_value=1.0)
