"""Moving Fashion-MNIST: a labelled synthetic video dataset built from the real Fashion-MNIST images (each item
bounces across a wider canvas; the label is the item's class), rendered in memory, no decoding."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import Tensor

from maeframe import Dataset, Options

from .clip_geometry import clip_indices, crop_offsets
from .clip_transforms import ClipAugment, MultiViewTesting, check_clip_shape
from .image_data import FASHION_MNIST_ROOT, load_fashion_mnist



ITEM_SIDE = 28


class MovingFashionMNISTOptions(Options):
    root: str = Field(FASHION_MNIST_ROOT, description="folder with the Fashion-MNIST *-ubyte.gz files")
    split: str = Field("train", pattern="^(train|test)$", description="train (60k items) or test (10k)")
    limit: int | None = Field(None, gt=0, description="use only the first N items (quick runs)")
    seed: int = Field(0, description="evaluation trajectories: clip i is fixed by (i, seed); training draws "
                                     "a new trajectory every time")
    min_speed: float = Field(1.0, ge=0, description="slowest motion, pixels per frame")
    max_speed: float = Field(3.0, ge=0, description="fastest motion, pixels per frame")
    mean: tuple[float, ...] = Field((0.0,), description="normalisation mean, one value per channel or one for all "
                                                        "(default: none)")
    std: tuple[float, ...] = Field((1.0,), description="normalisation std, one value per channel or one for all")
    video_frames: int | None = Field(None, gt=0, description="frames rendered per video (null = the clip's T); "
                                                             "a clip is T consecutive frames of it")
    canvas_width: int | None = Field(None, gt=0, description="width of the rendered canvas (null = the clip's W); "
                                                             "a clip is a W-wide window of it")
    test_clips: int = Field(1, ge=1, description="evaluation: clips spread evenly over the video (test views)")
    test_crops: int = Field(1, ge=1, description="evaluation: W-wide windows spread over the canvas, left to "
                                                 "right (test views)")

    @model_validator(mode="after")
    def _speeds(self) -> MovingFashionMNISTOptions:
        if self.max_speed < self.min_speed:
            raise ValueError(f"max_speed {self.max_speed} is below min_speed {self.min_speed}")
        return self


def bounce(position: Tensor, room: int) -> Tensor:
    """Reflect positions into [0, room] (a triangle wave): motion bounces off both walls."""
    if room == 0:
        return torch.zeros_like(position)
    folded = torch.remainder(position, 2 * room)
    return torch.where(folded > room, 2 * room - folded, folded)


class MovingFashionMNISTDataset(MultiViewTesting, Dataset):
    """One real Fashion-MNIST item (28×28) moving on a black H×W canvas for T frames, bouncing off the
    edges; label = the item's class. Item i of the dataset is Fashion-MNIST image i. Start position,
    direction and speed are drawn per clip: from a generator seeded by (seed, i) in evaluation (so
    clip i is always the same), from torch's global generator in training (which the engine seeds per
    sample, so a run is reproducible while every epoch sees new motion).

    With `video_frames` L > T and/or `canvas_width` > W the motion is rendered on the larger video and a
    clip is a T × H × W window of it: a random one in training, the centre one in evaluation, or with
    `test_clips` × `test_crops` a stack [K·S, C, T, H, W] of evenly spread windows (multi-view testing)."""

    Options = MovingFashionMNISTOptions
    name = "moving_fashion_mnist"
    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot"]

    def __init__(self, options: MovingFashionMNISTOptions, input_shape: tuple[int, ...], train: bool):
        super().__init__(options, input_shape, train)
        check_clip_shape(self.name, options, input_shape, single_ok=True)
        channels, self.clip_frames, self.height, self.clip_width = input_shape
        self.frames = options.video_frames or self.clip_frames
        self.width = options.canvas_width or self.clip_width
        if self.frames < self.clip_frames or self.width < self.clip_width:
            raise ValueError(f"moving_fashion_mnist: video_frames {self.frames} and canvas_width {self.width} must "
                             f"be at least the clip's {self.clip_frames} frames and width {self.clip_width}")
        self.augment: ClipAugment | None = None
        if self.height < ITEM_SIDE or self.width < ITEM_SIDE:
            raise ValueError(f"moving_fashion_mnist: the {self.height}×{self.width} canvas is smaller than a "
                             f"{ITEM_SIDE}×{ITEM_SIDE} Fashion-MNIST item; use image_size >= {ITEM_SIDE}")
        images, labels = load_fashion_mnist(str(Path(options.root).expanduser()), options.split)
        if options.limit:
            images, labels = images[: options.limit], labels[: options.limit]
        self.images = torch.from_numpy(images.copy())
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.mean = torch.tensor(options.mean).view(-1, 1, 1, 1)
        self.std = torch.tensor(options.std).view(-1, 1, 1, 1)

    def __len__(self) -> int:
        return len(self.images)

    def trajectory(self, index: int) -> tuple[Tensor, Tensor]:
        """(rows [T], cols [T]) long: the item's top-left corner in every frame."""
        o = self.options
        generator = None
        if not self.train:
            generator = torch.Generator().manual_seed((o.seed * 1_000_003 + index) % (2**63 - 1))
        u = torch.rand(4, generator=generator, dtype=torch.float64)   # row, column, direction, speed
        room_y, room_x = self.height - ITEM_SIDE, self.width - ITEM_SIDE
        angle = 2 * math.pi * u[2]
        speed = o.min_speed + (o.max_speed - o.min_speed) * u[3]
        t = torch.arange(self.frames, dtype=torch.float64)
        rows = bounce(u[0] * room_y + speed * torch.sin(angle) * t, room_y)
        cols = bounce(u[1] * room_x + speed * torch.cos(angle) * t, room_x)
        return rows.round().long(), cols.round().long()

    def use_finetune_augment(self, rand_augment: str | None, random_erasing: float) -> None:
        """Fine-tuning: RandAugment (same ops on every frame) and per-frame random erasing on training clips."""
        mean = tuple(self.options.mean) * (self.input_shape[0] // len(self.options.mean))
        self.augment = ClipAugment(rand_augment, random_erasing, self.height, self.clip_width, mean)

    def render(self, index: int) -> Tensor:
        """The whole moving item: [L, H, canvas width] in [0, 1]."""
        rows, cols = self.trajectory(index)
        item = self.images[index].float() / 255.0
        video = torch.zeros(self.frames, self.height, self.width)
        for t, (y, x) in enumerate(zip(rows.tolist(), cols.tolist())):
            video[t, y:y + ITEM_SIDE, x:x + ITEM_SIDE] = item
        return video

    def _window(self, video: Tensor, start: int, left: int, seed: int | None = None) -> Tensor:
        """Frames start.. and columns left.. of the video -> normalised [C, T, H, W] (augmented with `seed`)."""
        frames = video[start:start + self.clip_frames, :, left:left + self.clip_width]
        frames = frames[:, None].expand(-1, self.input_shape[0], -1, -1)              # [T, C, H, W]
        if seed is not None:
            frames = self.augment.frames(frames * 255, seed) / 255
        clip = (frames.transpose(0, 1) - self.mean) / self.std
        return self.augment.erase_frames(clip, seed) if seed is not None else clip

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        video = self.render(index)
        label = int(self.labels[index])
        o, room = self.options, self.width - self.clip_width
        if self.train:
            start = clip_indices(self.frames, self.clip_frames, 1, train=True)[0]
            left = int(torch.randint(0, room + 1, (1,))) if room else 0
            seed = int(torch.randint(0, 2**62, (1,))) if self.augment is not None else None
            return self._window(video, start, left, seed), label
        starts = [clip_indices(self.frames, self.clip_frames, 1, train=False, view=k, views=o.test_clips)[0]
                  for k in range(o.test_clips)]
        lefts = crop_offsets(self.width, self.clip_width, o.test_crops)
        views = [self._window(video, start, left) for start in starts for left in lefts]
        return (torch.stack(views) if len(views) > 1 else views[0]), label

    def denormalize(self, batch: Tensor) -> Tensor:
        mean = self.mean.view(1, -1, 1, 1, 1).to(batch.device)
        std = self.std.view(1, -1, 1, 1, 1).to(batch.device)
        return (batch * std + mean).clamp(0, 1)
