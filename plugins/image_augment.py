"""Fine-tuning augmentation of image datasets (MAE's recipe): timm RandAugment on an 8-bit PIL image and random
erasing with per-pixel normal noise (timm RandomErasing, mode "pixel", as DeiT/MAE), in timm's
`create_transform` order, after the dataset's own crop and flip. `FinetuneAugment` undoes the normalisation,
augments, and normalises again (mode "L" for 1 channel, "RGB" for 3).

timm draws these augmentations from Python's `random` and NumPy's global generator; they are seeded here from
the torch generator that the engine's loader seeds per sample, and restored afterwards, so the augmentation
depends only on (run seed, epoch, position) -- whatever the number of workers or processes, and across a
resume. The video datasets use the same helpers frame by frame.
"""
from __future__ import annotations

import torch
from PIL import Image, ImageOps
from timm.data.auto_augment import rand_augment_transform
from timm.data.random_erasing import RandomErasing
from torch import Tensor
from torchvision.transforms import v2

from maeframe import python_numpy_seeded


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize for Pillow >= 13, which rejects 0 bits; keeping 0 bits is a black image."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size, 0)
    return ImageOps.posterize(img, bits_to_keep)


def build_rand_augment(spec: str, height: int, width: int, mean: tuple[float, ...]):
    """timm's RandAugment for 8-bit PIL images of height × width whose fill colour is `mean` (0..1 per channel);
    translations up to 45% of the shorter side, posterize patched for Pillow >= 13."""
    fill = tuple(round(255 * m) for m in mean)
    transform = rand_augment_transform(spec, {"translate_const": int(min(height, width) * 0.45), "img_mean": fill})
    for op in transform.ops:
        if "Posterize" in op.name:
            op.aug_fn = _posterize
    return transform


class FinetuneAugment:
    """image [C, H, W] normalised with `mean` / `std` -> RandAugment + random erasing of it (1 or 3 channels),
    drawn from the torch generator's next value (seeded per sample by the engine)."""

    def __init__(self, rand_augment: str | None, random_erasing: float, height: int, width: int,
                 mean: tuple[float, ...], std: tuple[float, ...]):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.rand_augment = build_rand_augment(rand_augment, height, width, mean) if rand_augment else None
        self.erase = RandomErasing(random_erasing, mode="pixel", max_count=1, device="cpu") if random_erasing > 0 else None

    def _rand_augment(self, image: Tensor) -> Tensor:
        pixels = (image * self.std + self.mean).clamp(0, 1).mul(255).round().to(torch.uint8)
        picture = v2.functional.to_pil_image(pixels)
        pixels = v2.functional.pil_to_tensor(self.rand_augment(picture))
        return (pixels.float() / 255 - self.mean) / self.std

    def __call__(self, image: Tensor) -> Tensor:
        seed = int(torch.randint(0, 2**62, ()))
        with python_numpy_seeded(seed):
            if self.rand_augment is not None:
                image = self._rand_augment(image)
            if self.erase is not None:
                image = self.erase(image)
        return image
