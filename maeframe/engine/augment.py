"""Fine-tuning augmentation on top of a dataset's own pipeline: timm RandAugment and random erasing, and
batch mixing (`BatchMixup`: timm's mixup/cutmix for inputs of any rank and for multi-hot targets).

The wrapped dataset yields normalised [C, H, W] images after its crop and flip (RandomResizedCrop + flip,
as MAE fine-tuning). This wrapper undoes the normalisation, applies RandAugment on an 8-bit PIL image
(mode "L" for 1 channel, "RGB" for 3), normalises again and erases a random box with per-pixel normal
noise (timm RandomErasing, mode "pixel", as DeiT/MAE). The order matches timm's `create_transform`.

timm draws these augmentations from Python's `random` and NumPy's global generator; the wrapper seeds
both from the torch generator that `SeededDataset` seeds per sample, and restores them afterwards, so the
augmentation depends only on (run seed, epoch, position) -- whatever the number of workers, and across a
resume.
"""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import Mixup
from timm.data.mixup import cutmix_bbox_and_lam, mixup_target
from timm.data.auto_augment import rand_augment_transform
from timm.data.random_erasing import RandomErasing
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2

from ..recipe import AugmentConfig


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


@contextlib.contextmanager
def python_numpy_seeded(seed: int):
    """Seed Python's and NumPy's global generators for the block, then put their states back."""
    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


class FinetuneAugment(Dataset):
    """dataset[i] -> (RandAugment + random erasing of the image, label). Needs an image dataset whose options
    carry `mean` and `std` (the built-in fashion_mnist and image_folder do)."""

    device_transform = None  # as `maeframe.Dataset`: samples are ready as loaded
    repeats = 1              # as `maeframe.Dataset`: one augmented image per item

    def __init__(self, dataset: Dataset, config: AugmentConfig):
        if dataset.repeats != 1:
            raise ValueError(f"augment.rand_augment / augment.random_erasing augment single images; "
                             f"{type(dataset).__name__} gives {dataset.repeats} samples per item (set repeats: 1)")
        self.dataset = dataset
        self.classes = getattr(dataset, "classes", None)
        shape = tuple(getattr(dataset, "input_shape", ()))
        options = getattr(dataset, "options", None)
        if len(shape) != 3 or shape[0] not in (1, 3) or not hasattr(options, "mean"):
            raise ValueError(f"augment.rand_augment needs [C, H, W] images with 1 or 3 channels and mean/std "
                             f"options; got a {type(dataset).__name__} of shape {shape} (set "
                             f"augment.rand_augment: null and augment.random_erasing: 0)")
        channels, height, width = shape
        self.mean = torch.tensor(options.mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(options.std, dtype=torch.float32).view(-1, 1, 1)
        self.rand_augment = None
        if config.rand_augment:
            self.rand_augment = build_rand_augment(config.rand_augment, height, width, options.mean)
        self.erase = (RandomErasing(config.random_erasing, mode="pixel", max_count=1, device="cpu")
                      if config.random_erasing > 0 else None)

    def __len__(self) -> int:
        return len(self.dataset)

    def _rand_augment(self, image: Tensor) -> Tensor:
        pixels = (image * self.std + self.mean).clamp(0, 1).mul(255).round().to(torch.uint8)
        picture = v2.functional.to_pil_image(pixels)
        pixels = v2.functional.pil_to_tensor(self.rand_augment(picture))
        return (pixels.float() / 255 - self.mean) / self.std

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        seed = int(torch.randint(0, 2**62, ()))
        with python_numpy_seeded(seed):
            if self.rand_augment is not None:
                image = self._rand_augment(image)
            if self.erase is not None:
                image = self.erase(image)
        return image, label


class BatchMixup(Mixup):
    """timm's `Mixup` (mode "batch") for inputs [B, C, *, H, W] of rank >= 4 and multi-hot targets, with its
    draws and its pairing independent of how the global batch is split over processes.

    One lam, one choice of mixup or cutmix and one box per global micro-batch, drawn with timm's
    distributions from `seed` alone (the engine passes (seed, step, micro-batch)); each sample is mixed with
    its `partner` row (the engine passes its partner in the reversed global batch, which is timm's `flip(0)`
    in one process). A CutMix box spans (H, W): one box pasted on every frame of a clip [B, C, T, H, W], as
    VideoMAE. Targets: smoothed one-hot (or multi-hot: y(1-s) + s/2), mixed with the partner's by lam."""

    def __call__(self, x: Tensor, target: Tensor, seed: int,
                 partner: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        partner_x, partner_target = partner if partner is not None else (x.flip(0), target.flip(0))
        with python_numpy_seeded(seed):
            lam, use_cutmix = self._params_per_batch()
            if use_cutmix and lam != 1.0:
                (top, bottom, left, right), lam = cutmix_bbox_and_lam(x.shape, lam, self.cutmix_minmax,
                                                                      self.correct_lam)
        if lam != 1.0 and use_cutmix:
            x = x.clone()
            x[..., top:bottom, left:right] = partner_x[..., top:bottom, left:right]
        elif lam != 1.0:
            x = x * lam + partner_x * (1.0 - lam)
        smooth = lambda t: mixup_target(t, self.num_classes, 1.0, self.label_smoothing, self.multi_label)  # noqa: E731
        return x, smooth(target) * lam + smooth(partner_target) * (1.0 - lam)
