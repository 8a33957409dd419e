"""Image datasets: any ImageFolder tree, and real Fashion-MNIST read from its IDX files.

Both produce [C, H, W] float tensors of the tokenizer's input shape (any channel count C). Training applies
MAE's augmentation (RandomResizedCrop + horizontal flip); evaluation resizes and centre-crops. Both
normalise by a per-channel mean/std: the options', or those `maeframe image-stats --write` stored in
`stats_file`. Files are decoded by `image_decode.decode` (transparency, arrays, the pixel limit).
"""
from __future__ import annotations

import functools
import gzip
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from pydantic import Field
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor
from torchvision import datasets
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension
from torchvision.transforms import v2

from maeframe import Dataset, OptionError, Options, hookimpl

from .folders import OUTSIDE_CLASSES, extension_reason, log_passed_over
from .image_augment import FinetuneAugment
from .image_decode import DecodeOptions, decode, image_extensions

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_HINT = ("install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu; `make data` does it) "
                      "or point data.train.options.root at a folder holding the four *-ubyte.gz files")


class ImageAugmentOptions(Options):
    crop_scale: tuple[float, float] = Field((0.2, 1.0), description="RandomResizedCrop area range (training)")
    hflip: bool = Field(True, description="random horizontal flip (training)")
    mean: tuple[float, ...] = Field(IMAGENET_DEFAULT_MEAN, description="per-channel normalisation mean")
    std: tuple[float, ...] = Field(IMAGENET_DEFAULT_STD, description="per-channel normalisation std")
    stats_file: str | None = Field(None, description="JSON written by `maeframe image-stats RECIPE --write`; when "
                                                     "set, its per-channel mean and std replace the two options above")


def read_image_stats(path: str, channels: int) -> tuple[list[float], list[float]]:
    """(mean, std) per channel from a `maeframe image-stats --write` file, checked against `channels`."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"stats_file {str(path)!r} does not exist; compute it with "
                                f"`maeframe image-stats RECIPE --write`")
    stats = json.loads(file.read_text())
    if not isinstance(stats, dict) or not {"mean", "std"} <= set(stats):
        raise OptionError("stats_file", f"{str(path)!r} holds no mean and std")
    if len(stats["mean"]) != channels or len(stats["std"]) != channels:
        raise OptionError("stats_file", f"{str(path)!r} holds statistics of {len(stats['mean'])} channels, "
                                        f"the tokenizer expects {channels}")
    return [float(v) for v in stats["mean"]], [float(v) for v in stats["std"]]


class ImageDataset(Dataset):
    """Shared transform pipeline; subclasses provide `_load(index) -> (uint8 or float [C, H, W], label)`
    (uint8 values are scaled by 1/255, float ones taken as they are) and may override `source_option`, the
    option `maeframe pack SOURCE` fills with SOURCE."""

    source_option = "root"

    def __init__(self, options: ImageAugmentOptions, input_shape: tuple[int, ...], train: bool):
        super().__init__(options, input_shape, train)
        channels, height, width = input_shape
        mean, std = options.mean, options.std
        if options.stats_file is not None:
            mean, std = read_image_stats(options.stats_file, channels)
        for field, values in (("mean", mean), ("std", std)):
            if len(values) != channels:
                raise OptionError(field, f"{len(values)} values but the tokenizer expects {channels} channels: "
                                         f"give one per channel, or compute them with `maeframe image-stats "
                                         f"RECIPE --write` and set stats_file")
        if min(std) <= 0:
            raise OptionError("std", f"every std must be positive, got {list(std)}")
        self.mean, self.std = tuple(mean), tuple(std)
        size = (height, width)
        if train:
            geometry = [v2.RandomResizedCrop(size, scale=options.crop_scale,
                                             interpolation=v2.InterpolationMode.BICUBIC, antialias=True)]
            geometry += [v2.RandomHorizontalFlip()] if options.hflip else []
        else:
            geometry = [v2.Resize(int(round(min(size) / 0.875)) if min(size) >= 64 else min(size),
                                  interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                        v2.CenterCrop(size)]
        self.transform = v2.Compose([*geometry, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
        self._mean = torch.tensor(mean).view(1, -1, 1, 1)
        self._std = torch.tensor(std).view(1, -1, 1, 1)
        self.finetune_augment: FinetuneAugment | None = None

    def _fit_channels(self, image: Tensor) -> Tensor:
        channels = self.input_shape[0]
        if image.shape[0] == channels:
            return image
        if image.shape[0] == 1:
            return image.expand(channels, -1, -1)
        raise ValueError(f"image has {image.shape[0]} channels, the tokenizer expects {channels}")

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, label = self._load(index)
        image = self.transform(self._fit_channels(image))
        return (image if self.finetune_augment is None else self.finetune_augment(image)), label

    def use_finetune_augment(self, rand_augment: str | None, random_erasing: float) -> None:
        """Fine-tuning: timm RandAugment and random erasing after the crop and flip (1- or 3-channel images)."""
        channels, height, width = self.input_shape
        if channels not in (1, 3):
            raise ValueError(f"RandAugment works on 1- or 3-channel images, these have {channels}; set "
                             f"augment.rand_augment: null and augment.random_erasing: 0")
        self.finetune_augment = FinetuneAugment(rand_augment, random_erasing, height, width, self.mean, self.std)

    @classmethod
    def file_suffixes(cls) -> tuple[str, ...]:
        """Every image format `image_decode.decode` reads (Pillow's, TIFF, .npy)."""
        return image_extensions()

    @classmethod
    def from_files(cls, options: dict, input_shape: tuple[int, ...], paths: list[str],
                   labels: list[int] | None = None) -> Dataset:
        """The listed images with the evaluation transform (resize, centre crop, this normalisation)."""
        from .image_reader import ImageFileReader

        return ImageFileReader.for_paths(options, input_shape, paths, labels)

    def denormalize(self, batch: Tensor) -> Tensor:
        return (batch * self._std.to(batch.device) + self._mean.to(batch.device)).clamp(0, 1)


class ImageFolderOptions(ImageAugmentOptions, DecodeOptions):
    root: str = Field(description="folder with one sub-folder of images per class (torchvision ImageFolder)")


class ImageFolderDataset(ImageDataset):
    """`root/<class>/<image>` trees, listed by torchvision's ImageFolder and decoded with PIL."""

    Options = ImageFolderOptions

    def __init__(self, options: ImageFolderOptions, input_shape: tuple[int, ...], train: bool):
        super().__init__(options, input_shape, train)
        root = Path(options.root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"image_folder: root {str(root)!r} is not a directory")
        passed = Counter({OUTSIDE_CLASSES: sum(1 for p in root.iterdir() if p.is_file())})

        def is_image(path: str) -> bool:  # torchvision's rule, counting what it passes over
            if has_file_allowed_extension(path, IMG_EXTENSIONS):
                return True
            passed[extension_reason(path)] += 1
            return False

        try:
            self.folder = datasets.ImageFolder(str(root), is_valid_file=is_image)
        except FileNotFoundError as err:  # no class folder, or one without images
            raise ValueError(f"image_folder: {root}: {err} (extensions taken: {', '.join(IMG_EXTENSIONS)})") from None
        finally:
            log_passed_over("image_folder", root, passed, taken=", ".join(IMG_EXTENSIONS))
        self.classes = self.folder.classes

    def __len__(self) -> int:
        return len(self.folder.samples)

    def describe(self, index: int) -> str:
        return self.folder.samples[index][0]

    def _load(self, index: int) -> tuple[Tensor, int]:
        path, label = self.folder.samples[index]
        return decode(path, path, self.input_shape[0], self.options), label


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file, the format of MNIST and Fashion-MNIST, into a uint8 array."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    rank = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(rank))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * rank)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {body.size} values (truncated?)")
    return body.reshape(shape)


@functools.lru_cache(maxsize=2)
def load_fashion_mnist(root: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 28, 28] uint8, labels [N] uint8) of one split; cached per process."""
    prefix = "train" if split == "train" else "t10k"
    files = [Path(root) / f"{prefix}-images-idx3-ubyte.gz", Path(root) / f"{prefix}-labels-idx1-ubyte.gz"]
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"fashion_mnist: {file} not found; {FASHION_MNIST_HINT}")
    return read_idx(files[0]), read_idx(files[1])


class FashionMNISTOptions(ImageAugmentOptions):
    root: str = Field(FASHION_MNIST_ROOT, description="folder with the Fashion-MNIST *-ubyte.gz files")
    split: str = Field("train", pattern="^(train|test)$", description="train (60k) or test (10k)")
    limit: int | None = Field(None, gt=0, description="use only the first N images (quick runs)")
    mean: tuple[float, ...] = Field((0.2860,), description="per-channel normalisation mean")
    std: tuple[float, ...] = Field((0.3530,), description="per-channel normalisation std")
    crop_scale: tuple[float, float] = Field((0.35, 1.0), description="RandomResizedCrop area range (training)")


class FashionMNISTDataset(ImageDataset):
    """Zalando's Fashion-MNIST: 28×28 grayscale clothing images in 10 classes, held in memory."""

    Options = FashionMNISTOptions
    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot"]

    def __init__(self, options: FashionMNISTOptions, input_shape: tuple[int, ...], train: bool):
        super().__init__(options, input_shape, train)
        images, labels = load_fashion_mnist(str(Path(options.root).expanduser()), options.split)
        if options.limit:
            images, labels = images[: options.limit], labels[: options.limit]
        self.images = torch.from_numpy(images.copy())
        self.labels = torch.from_numpy(labels.astype(np.int64))

    def __len__(self) -> int:
        return len(self.images)

    def _load(self, index: int) -> tuple[Tensor, int]:
        return self.images[index][None], int(self.labels[index])


@hookimpl
def register_datasets(register):
    register("image_folder", ImageFolderDataset)
    register("fashion_mnist", FashionMNISTDataset)
