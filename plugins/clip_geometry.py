"""Clip geometry of the video datasets: which frames a clip takes and which box of them, as VideoMAE samples
them (temporal: `clip_indices`; spatial: multi-scale crops, random resized crops, evaluation crops), and the
short-side resize."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor



VIDEOMAE_SCALES = (1.0, 0.875, 0.75, 0.66)
LUMA = (0.299, 0.587, 0.114)
# 13 crop positions in quarter steps of the free room (row, column): corners, centre, edge centres and
# the four quarter points, as VideoMAE's multi-scale crop with its "more fixed crops".
FIXED_OFFSETS = ((0, 0), (0, 4), (4, 0), (4, 4), (2, 2), (2, 0), (2, 4), (4, 2), (0, 2), (1, 1), (1, 3),
                 (3, 1), (3, 3))


def clip_indices(length: int, num_frames: int, sampling_rate: int, *, train: bool,
                 generator: torch.Generator | None = None, view: int = 0, views: int = 1) -> list[int]:
    """Frame indices of one clip of a `length`-frame video (see the module docstring).

    train: start uniform in [0, length - span]; eval: view `view` of `views` evenly spread starts (the
    centre when views = 1). Indices past the end are clamped to the last frame."""
    if length <= 0:
        raise ValueError("a video needs at least one frame")
    span = (num_frames - 1) * sampling_rate + 1
    room = length - span
    if room <= 0:
        start = 0
    elif train:
        start = int(torch.randint(0, room + 1, (1,), generator=generator))
    elif views == 1:
        start = room // 2
    else:
        start = round(view * room / (views - 1))
    return [min(start + i * sampling_rate, length - 1) for i in range(num_frames)]


def multiscale_crop_box(height: int, width: int, out_size: tuple[int, int], scales: tuple[float, ...],
                        max_distort: int, fixed_offsets: bool,
                        generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """(top, left, crop height, crop width) of a VideoMAE-style multi-scale crop of a height×width frame.

    Candidate sides are int(short side × scale), snapped to the output side when within 2 pixels of it;
    the crop's height and width use scales at most `max_distort` steps apart, chosen uniformly among the
    allowed pairs. The crop is placed at one of 13 fixed positions (`fixed_offsets`) or uniformly."""
    base = min(height, width)
    sides = [int(base * s) for s in scales]
    heights = [out_size[0] if abs(s - out_size[0]) < 3 else s for s in sides]
    widths = [out_size[1] if abs(s - out_size[1]) < 3 else s for s in sides]
    pairs = [(heights[i], widths[j]) for i in range(len(sides)) for j in range(len(sides))
             if abs(i - j) <= max_distort]
    crop_h, crop_w = pairs[int(torch.randint(0, len(pairs), (1,), generator=generator))]
    crop_h, crop_w = max(1, min(crop_h, height)), max(1, min(crop_w, width))
    if fixed_offsets:
        row, col = FIXED_OFFSETS[int(torch.randint(0, len(FIXED_OFFSETS), (1,), generator=generator))]
        top, left = (height - crop_h) * row // 4, (width - crop_w) * col // 4
    else:
        top = int(torch.randint(0, height - crop_h + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - crop_w + 1, (1,), generator=generator))
    return top, left, crop_h, crop_w


def random_resized_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                       generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """(top, left, crop height, crop width) of an Inception-style random crop (torchvision's
    RandomResizedCrop rule): area fraction uniform in `scale`, log aspect ratio uniform in `ratio`; after
    10 misses, the largest centred crop whose aspect ratio lies in `ratio`."""
    area = height * width
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_low + (log_high - log_low) * u[1])
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def crop_offsets(size: int, out: int, crops: int) -> list[int]:
    """Starts of `crops` windows of length `out` spread evenly over `size`: first, ..., last (one = centred)."""
    room = max(size - out, 0)
    if crops == 1:
        return [room // 2]
    return [round(k * room / (crops - 1)) for k in range(crops)]


def eval_crop_corner(height: int, width: int, out_size: tuple[int, int], crop: int, crops: int) -> tuple[int, int]:
    """(top, left) of spatial test view `crop` of `crops`: spread along the axis with more room (the long side
    after a short-side resize: left, centre, right for 3 crops of a landscape frame), centred on the other."""
    room_h, room_w = height - out_size[0], width - out_size[1]
    if room_w >= room_h:
        return room_h // 2, crop_offsets(width, out_size[1], crops)[crop]
    return crop_offsets(height, out_size[0], crops)[crop], room_w // 2


def resize_frames(frames: Tensor, size: tuple[int, int]) -> Tensor:
    """frames [T, C, h, w] uint8 or float -> [T, C, *size], bilinear, antialiased when shrinking (uint8 in and
    out, rounded, runs torch's vectorised uint8 kernel: several times faster than float)."""
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    return F.interpolate(frames, size=size, mode="bilinear", align_corners=False, antialias=True)


def short_side_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(height, width) with the shorter side scaled to `short_side`, aspect ratio kept."""
    scale = short_side / min(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))
