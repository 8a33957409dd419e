"""Picture files: reconstruction panels and confusion matrices (a leaf module the component bases and the
engine both use)."""
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


def save_confusion_matrix(matrix: torch.Tensor | list, classes: list[str], path: str | Path, title: str = "") -> Path:
    """A row-normalised confusion-matrix heat map with counts, as a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = torch.as_tensor(matrix, dtype=torch.float64)
    rates = counts / counts.sum(1, keepdim=True).clamp(min=1)
    n = len(classes)
    size = max(4.0, 0.55 * n + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if n <= 40:
        ax.set_xticks(range(n), classes, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(n), classes, fontsize=8)
        if n <= 20:
            for t in range(n):
                for p in range(n):
                    ax.text(p, t, int(counts[t, p]), ha="center", va="center", fontsize=7,
                            color="white" if rates[t, p] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
