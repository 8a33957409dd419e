"""The `packed` dataset: images stored by `maeframe pack` as uint8 arrays, read through memory maps.

A packed folder holds `index.json` (count, shape, labels, classes, shard list with sizes and SHA-256,
skipped sources), `shard-NNNNN.npy` files of uint8 [n, C, S, S] images (numpy's .npy format, opened with
`numpy.load(mmap_mode="r")`) and `sources.txt` (the source of each image, one per line, for messages).

Training serves the stored uint8 images untouched, with zero decoding; the engine moves each batch to the
device and applies `device_transform` (`DeviceAugment`: RandomResizedCrop + flip + normalise, one call per
batch). Evaluation (train=False) resizes and centre-crops on the CPU like the other image datasets and
returns normalised float images.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from maeframe import hookimpl

from .device_augment import DeviceAugment
from .image_data import ImageAugmentOptions, ImageDataset

FORMAT = "maeframe-packed-1"
INDEX = "index.json"
SOURCES = "sources.txt"
PACK_HINT = "build it with `maeframe pack SRC OUT --size S` (see `maeframe pack --help`)"


def read_index(folder: Path) -> dict:
    """The index of a packed folder, checked against the shard files on disk (existence, byte size)."""
    index_path = folder / INDEX
    if not folder.is_dir():
        raise ValueError(f"packed: {str(folder)!r} is not a directory; {PACK_HINT}")
    if not index_path.is_file():
        raise ValueError(f"packed: {index_path} not found (not a packed dataset?); {PACK_HINT}")
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"packed: {index_path} is not readable JSON: {err}") from err
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ValueError(f"packed: {index_path} is not a {FORMAT} index (format {index.get('format')!r})"
                         if isinstance(index, dict) else f"packed: {index_path} is not a {FORMAT} index")
    total = 0
    for shard in index["shards"]:
        file = folder / shard["file"]
        if not file.is_file():
            raise ValueError(f"packed: shard {file} listed in {index_path} is missing")
        if file.stat().st_size != shard["bytes"]:
            raise ValueError(f"packed: shard {file} has {file.stat().st_size} bytes, {index_path} says "
                             f"{shard['bytes']} (truncated or replaced?)")
        total += shard["count"]
    if total != index["count"] or len(index["labels"]) != index["count"]:
        raise ValueError(f"packed: {index_path} is inconsistent: {index['count']} images, {total} in shards, "
                         f"{len(index['labels'])} labels")
    return index


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class PackedOptions(ImageAugmentOptions):
    path: str = Field(description="folder written by `maeframe pack` (holds index.json and shard-*.npy)")
    limit: int | None = Field(None, gt=0, description="use only the first N images (quick runs)")
    ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="RandomResizedCrop aspect range (training)")
    interpolation: Literal["bicubic", "bilinear"] = Field("bicubic", description="device crop resampling")
    verify: bool = Field(False, description="re-hash every shard against the index's SHA-256 when opening")


class PackedDataset(ImageDataset):
    """uint8 [C, S, S] images from `maeframe pack` shards; augmentation runs on the device per batch."""

    Options = PackedOptions

    def __init__(self, options: PackedOptions, input_shape: tuple[int, ...], train: bool):
        super().__init__(options, input_shape, train)
        self.folder = Path(options.path).expanduser()
        index = read_index(self.folder)
        channels = index["shape"][0]
        if channels not in (1, input_shape[0]):
            raise ValueError(f"packed: {self.folder} holds {channels}-channel images, the tokenizer expects "
                             f"{input_shape[0]}")
        if options.verify:
            for shard in index["shards"]:
                if file_sha256(self.folder / shard["file"]) != shard["sha256"]:
                    raise ValueError(f"packed: shard {self.folder / shard['file']} does not match its SHA-256 "
                                     f"in {self.folder / INDEX} (corrupted)")
        self.count = min(index["count"], options.limit or index["count"])
        self.shard_size = index["shard_size"]
        self.shard_files = [self.folder / shard["file"] for shard in index["shards"]]
        self.labels = index["labels"][: self.count]
        self.classes = index["classes"]
        self.stored_shape = tuple(index["shape"])
        self._shards: dict[int, np.ndarray] | None = None  # opened lazily, in each loader process
        self._sources: list[str] | None = None
        self.device_transform = (DeviceAugment(input_shape[1:], options.crop_scale, options.ratio, options.hflip,
                                               options.mean, options.std, options.interpolation) if train else None)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_shards": None}  # memory maps are reopened, not pickled

    def __len__(self) -> int:
        return self.count

    def describe(self, index: int) -> str:
        if self._sources is None:
            self._sources = (self.folder / SOURCES).read_text().splitlines()
        return f"{self._sources[index]} (packed image {index} in {self.folder})"

    def _load(self, index: int) -> tuple[Tensor, int]:
        if not 0 <= index < self.count:
            raise IndexError(f"packed: index {index} out of range for {self.count} images")
        if self._shards is None:
            self._shards = {}
        shard, row = divmod(index, self.shard_size)
        if shard not in self._shards:  # each open map holds a file descriptor: open only what is read
            self._shards[shard] = np.load(self.shard_files[shard], mmap_mode="r")
        return torch.from_numpy(np.array(self._shards[shard][row])), self.labels[index]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """train: (uint8 [C, S, S] as stored, label); eval: (normalised float [*input_shape], label)."""
        if self.device_transform is None:
            return super().__getitem__(index)
        image, label = self._load(index)
        return self._fit_channels(image), label


@hookimpl
def register_datasets(register):
    register("packed", PackedDataset)
