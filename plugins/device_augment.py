"""MAE's image augmentation for a whole batch on the device: RandomResizedCrop + horizontal flip + normalise.

The loader hands over uint8 images [B, C, H, W] (e.g. from the packed dataset, no decoding); this module
draws one crop box and flip per image from a `torch.Generator` on the batch's device and resamples every
image with one `affine_grid` + `grid_sample` call: no per-image Python loop, no host sync.

Crop boxes follow torchvision's `RandomResizedCrop.get_params` (area fraction uniform in `scale`, aspect
log-uniform in `ratio`, up to 10 tries, then a centre crop clamped to `ratio`) but are continuous
(sub-pixel), so every box has exactly the drawn area and aspect. Sampling matches `F.interpolate`
(`align_corners=False`): the output pixel i of a crop starting at `left` with width `w` reads the source
at x = left − ½ + (i + ½)·w / out_w, so a whole-image box at the stored size reproduces the image exactly.
Unlike torchvision's default there is no antialiasing: keep the stored size close to the model's input
(e.g. 256 for 224) so crops are never shrunk by much.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

TRIES = 10  # torchvision's RandomResizedCrop draws up to 10 candidate boxes per image


def sample_crop_boxes(batch_size: int, height: int, width: int, scale: tuple[float, float],
                      ratio: tuple[float, float], generator: torch.Generator) -> Tensor:
    """Random crop boxes [B, 4] float (top, left, box height, box width) in pixels of an H×W image.

    Each box has area fraction in `scale` and aspect w/h in `ratio` (the first of 10 candidates that fits
    the image); when none fits, the largest centred box whose aspect is clamped to `ratio`.
    """
    device = generator.device
    shape = (batch_size, TRIES)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * torch.rand(shape, generator=generator, device=device))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(shape, generator=generator, device=device))
    box_w, box_h = torch.sqrt(area * aspect), torch.sqrt(area / aspect)
    fits = (box_w <= width) & (box_h <= height)
    first = fits.float().argmax(dim=1, keepdim=True)  # index of the first fitting candidate (0 if none)
    box_w, box_h = box_w.gather(1, first)[:, 0], box_h.gather(1, first)[:, 0]
    found = fits.any(dim=1)

    in_ratio = width / height  # the fallback: the whole image, cropped to the nearest allowed aspect
    if in_ratio < ratio[0]:
        fallback_w, fallback_h = float(width), width / ratio[0]
    elif in_ratio > ratio[1]:
        fallback_w, fallback_h = height * ratio[1], float(height)
    else:
        fallback_w, fallback_h = float(width), float(height)
    box_w = torch.where(found, box_w, torch.full_like(box_w, fallback_w))
    box_h = torch.where(found, box_h, torch.full_like(box_h, fallback_h))
    offsets = torch.rand((batch_size, 2), generator=generator, device=device)
    offsets = torch.where(found[:, None], offsets, torch.full_like(offsets, 0.5))
    top = (height - box_h) * offsets[:, 0]
    left = (width - box_w) * offsets[:, 1]
    return torch.stack([top, left, box_h, box_w], dim=1)


def resized_crop(images: Tensor, boxes: Tensor, flip: Tensor, size: tuple[int, int],
                 mode: str = "bicubic") -> Tensor:
    """Crop each image to its box, resize to `size` and mirror it where `flip` is set, in one call.

    images [B, C, H, W] (any dtype), boxes [B, 4] (top, left, h, w) in pixels, flip [B] bool
    -> float32 [B, C, size[0], size[1]] in the input's value range (bicubic overshoot clamped to it for
    uint8 input).
    """
    batch, _, height, width = images.shape
    top, left, box_h, box_w = boxes.float().unbind(dim=1)
    theta = torch.zeros(batch, 2, 3, device=images.device)
    theta[:, 0, 0] = torch.where(flip, -box_w, box_w) / width  # a negative x scale mirrors the output
    theta[:, 0, 2] = (2 * left + box_w) / width - 1
    theta[:, 1, 1] = box_h / height
    theta[:, 1, 2] = (2 * top + box_h) / height - 1
    grid = F.affine_grid(theta, [batch, images.shape[1], *size], align_corners=False)
    out = F.grid_sample(images.float(), grid, mode=mode, padding_mode="border", align_corners=False)
    if images.dtype == torch.uint8:
        out = out.clamp_(0, 255)
    return out


class DeviceAugment:
    """Callable batch transform: uint8 [B, C, H, W] on any device -> normalised float32 [B, C, *size].

    RandomResizedCrop(scale, ratio) to `size` + flip with probability ½ (if `hflip`) + (x/255 − mean)/std.
    All randomness comes from the generator passed in, which must live on the batch's device.
    """

    def __init__(self, size: tuple[int, int], scale: tuple[float, float], ratio: tuple[float, float], hflip: bool,
                 mean: tuple[float, ...], std: tuple[float, ...], mode: str = "bicubic"):
        self.size, self.scale, self.ratio, self.hflip, self.mode = tuple(size), scale, ratio, hflip, mode
        self._mean = torch.tensor(mean).view(1, -1, 1, 1) * 255
        self._std = torch.tensor(std).view(1, -1, 1, 1) * 255

    def __call__(self, batch: Tensor, generator: torch.Generator, rows: tuple[int, int] | None = None) -> Tensor:
        """rows (start, total): draw boxes and flips for `total` images and use rows start..start+B (this
        process's slice of a global batch); None = the batch is the whole draw."""
        if batch.dtype != torch.uint8 or batch.dim() != 4:
            raise ValueError(f"device augmentation expects uint8 [B, C, H, W] images, got {batch.dtype} "
                             f"{list(batch.shape)}")
        b, _, height, width = batch.shape
        start, total = rows or (0, b)
        if start < 0 or start + b > total:
            raise ValueError(f"rows {rows}: a batch of {b} does not fit at {start} in a draw of {total}")
        mine = slice(start, start + b)
        boxes = sample_crop_boxes(total, height, width, self.scale, self.ratio, generator)[mine]
        flip = (torch.rand(total, generator=generator, device=batch.device) < 0.5)[mine]
        if not self.hflip:
            flip = torch.zeros_like(flip)
        out = resized_crop(batch, boxes, flip, self.size, self.mode)
        if self._mean.device != out.device:  # once: no host-to-device copy per batch
            self._mean, self._std = self._mean.to(out.device), self._std.to(out.device)
        return out.sub_(self._mean).div_(self._std)
