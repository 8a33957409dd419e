"""The per-sample work of the official VideoMAE pretraining loader, rebuilt for benchmarks/av_loader.py.

Rebuilt from the published code of MCG-NJU/VideoMAE (`kinetics.VideoMAE` as `datasets.build_pretraining_dataset`
configures it, `datasets.DataAugmentationForVideoMAE`, `transforms.GroupMultiScaleCrop`, `Stack`,
`ToTorchFormatTensor`, `GroupNormalize` and `masking_generator.TubeMaskingGenerator`), written here from its
description, not copied. Per item:

1. a new `decord.VideoReader(path, num_threads=1)` at the file's native size (VideoMAE reads Kinetics
   pre-resized to a 320-pixel short side);
2. one segment: offset = 1 + a uniform draw in [0, frames - T·rate] (NumPy's global generator), then T frame
   ids `offset - 1 + i·rate`, the step stopping at the end of short videos; `get_batch` of those ids;
3. every frame to a PIL RGB image;
4. GroupMultiScaleCrop: crop sides int(short side × s) for s in (1, .875, .75, .66), sides within 2 pixels of
   the output snapped to it, height and width at most one scale apart, one pair and one of 13 fixed offsets
   (corners, centre, edge centres, quarter points) drawn with Python's `random`; each frame cropped and
   resized to 224² with PIL's bilinear filter;
5. Stack (channels concatenated: H × W × 3T), to a float tensor / 255, ImageNet normalisation one channel at
   a time, viewed as [3, T, H, W];
6. a tube mask: 90% of the 14×14 positions hidden, the same in all 8 time steps ([1568] bool).

Returns (clip [3, T, 224, 224] float32, mask [1568] bool), as the official dataset does.
"""
from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SCALES = (1.0, 0.875, 0.75, 0.66)


def read_list(list_file: str) -> list[tuple[str, int]]:
    """`path label` lines (VideoMAE splits each line on one space)."""
    items = []
    for line in open(list_file).read().splitlines():
        fields = line.split(" ")
        if len(fields) >= 2:
            items.append((fields[0], int(fields[1])))
    return items


class OfficialVideoMAEPretrainData(torch.utils.data.Dataset):
    """VideoMAE's pretraining dataset + transform for one list file (see the module docstring)."""

    def __init__(self, list_file: str, num_frames: int = 16, sampling_rate: int = 4, input_size: int = 224,
                 mask_ratio: float = 0.9, tubelet: int = 2, patch: int = 16):
        self.items = read_list(list_file)
        self.num_frames, self.rate, self.size = num_frames, sampling_rate, input_size
        self.mask_grid = (num_frames // tubelet, input_size // patch, input_size // patch)
        self.mask_ratio = mask_ratio

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        import decord

        path, _ = self.items[index]
        reader = decord.VideoReader(path, num_threads=1)
        ids = self.frame_ids(len(reader))
        try:
            frames = reader.get_batch(ids).asnumpy()
            images = [Image.fromarray(frames[i]).convert("RGB") for i in range(len(ids))]
        except Exception as err:
            raise RuntimeError(f"frames {ids} of {path} ({len(reader)} frames) could not be read") from err
        return self.to_clip(self.multi_scale_crop(images)), self.tube_mask()

    def frame_ids(self, length: int) -> list[int]:
        """One segment's frame ids: TSN-style sampling with a single segment and no jitter."""
        room = length - self.num_frames * self.rate + 1          # (its other branch cannot occur for 1 segment)
        offset = int(np.random.randint(room)) + 1 if room > 0 else 1
        ids = []
        for _ in range(self.num_frames):
            ids.append(offset - 1)
            if offset + self.rate < length:
                offset += self.rate
        return ids

    def multi_scale_crop(self, images: list[Image.Image]) -> list[Image.Image]:
        crop_w, crop_h, left, top = self.sample_crop(*images[0].size)
        box = (left, top, left + crop_w, top + crop_h)
        return [image.crop(box).resize((self.size, self.size), Image.BILINEAR) for image in images]

    def sample_crop(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(crop width, crop height, left, top) of one multi-scale crop of a width × height frame."""
        base = min(width, height)
        sides = [int(base * s) for s in SCALES]
        snapped = [self.size if abs(s - self.size) < 3 else s for s in sides]
        pairs = [(w, h) for i, h in enumerate(snapped) for j, w in enumerate(snapped) if abs(i - j) <= 1]
        crop_w, crop_h = random.choice(pairs)
        step_w, step_h = (width - crop_w) // 4, (height - crop_h) // 4
        quarters = [(0, 0), (4, 0), (0, 4), (4, 4), (2, 2), (0, 2), (4, 2), (2, 4), (2, 0), (1, 1), (3, 1), (1, 3),
                    (3, 3)]
        qx, qy = random.choice(quarters)
        return crop_w, crop_h, qx * step_w, qy * step_h

    def to_clip(self, images: list[Image.Image]) -> torch.Tensor:
        stacked = np.concatenate(images, axis=2)                                   # H × W × 3T uint8
        tensor = torch.from_numpy(stacked).permute(2, 0, 1).contiguous().float().div(255.0)
        for channel, mean, std in zip(tensor, IMAGENET_MEAN * self.num_frames, IMAGENET_STD * self.num_frames):
            channel.sub_(mean).div_(std)
        return tensor.view(self.num_frames, 3, self.size, self.size).transpose(0, 1)   # [3, T, H, W]

    def tube_mask(self) -> np.ndarray:
        steps, rows, cols = self.mask_grid
        per_frame = rows * cols
        hidden = int(self.mask_ratio * per_frame)
        mask = np.hstack([np.zeros(per_frame - hidden), np.ones(hidden)])
        np.random.shuffle(mask)
        return np.tile(mask, (steps, 1)).flatten().astype(bool)
