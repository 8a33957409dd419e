"""Clip transforms of the video datasets: their shared options (`VideoAugmentOptions`), the training / evaluation
pipeline of one decoded clip (`ClipTransform`: crop, resize, flip, normalise in uint8 until the end), the
fine-tuning augmentation of every frame (`ClipAugment`: RandAugment with the same ops, random erasing) and
multi-view testing (`MultiViewTesting`)."""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor

from maeframe import Options, python_numpy_seeded

from .clip_geometry import (LUMA, VIDEOMAE_SCALES, resize_frames, eval_crop_corner, multiscale_crop_box, random_resized_box,
                            short_side_size)
from .image_augment import build_rand_augment
from .torchcodec_reader import torchcodec_problem



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
        return resize_frames(frames, short_side_size(*frames.shape[-2:], short))

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
            x = resize_frames(clip(top, left, ch, cw), self.out_size)
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
                x = resize_frames(x, (h, w))[..., top:top + out_h, left:left + out_w]
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


def check_clip_shape(name: str, options, input_shape: tuple[int, ...], single_ok: bool = False) -> None:
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
