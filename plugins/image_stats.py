"""`maeframe image-stats RECIPE`: per-channel mean and std of a recipe's training images.

The values are those the image datasets normalise: each image as `_load` gives it (8-bit / 255, 16-bit /
65535, floats as stored, channels fitted to the tokenizer's), at its stored size, before any crop, every
pixel weighted alike. `--write` stores them as JSON at `data.train.options.stats_file`, which the image
datasets then read instead of their `mean` / `std` options (for 4-13-band or medical data, where
ImageNet's three values do not apply).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader

from maeframe import OptionError
from maeframe.errors import MaeframeError, RecipeError

from .image_data import ImageDataset
from .stats_file import write_stats_file


class ChannelSums(torch.utils.data.Dataset):
    """Item i of `indices` -> (sum [C] float64, sum of squares [C], pixels, None) or (.., error text)."""

    def __init__(self, dataset: ImageDataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int):
        index = self.indices[item]
        try:
            image, _ = self.dataset._load(index)
            image = self.dataset._fit_channels(image)
            image = image.double() / 255.0 if image.dtype == torch.uint8 else image.double()
            flat = image.flatten(1)
            return flat.sum(1), (flat * flat).sum(1), flat.shape[1], None
        except Exception as err:  # an unreadable image is skipped and counted, as in training
            return None, None, 0, f"{self.dataset.describe(index)}: {type(err).__name__}: {err}"


def channel_stats(dataset: ImageDataset, limit: int | None = None, workers: int = 0) -> dict:
    """{"mean": [C], "std": [C], "num_images", "num_pixels", "skipped", "channels"} over `limit` images
    spread evenly over the dataset (all by default)."""
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    count = len(dataset) if limit is None else min(limit, len(dataset))
    indices = sorted({int(i * len(dataset) / count) for i in range(count)})
    loader = DataLoader(ChannelSums(dataset, indices), batch_size=32, num_workers=workers, collate_fn=list)
    channels = dataset.input_shape[0]
    total, total_sq = torch.zeros(channels, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64)
    pixels = used = 0
    skipped = []
    for items in loader:
        for summed, squared, n, error in items:
            if error is not None:
                skipped.append(error)
                continue
            total += summed
            total_sq += squared
            pixels += n
            used += 1
    if used == 0:
        raise ValueError(f"no readable image to compute statistics from ({len(skipped)} unreadable; first: "
                         f"{skipped[0] if skipped else '-'})")
    mean = total / pixels
    std = (total_sq / pixels - mean * mean).clamp(min=0).sqrt()
    return {"mean": mean.tolist(), "std": [max(v, 1e-6) for v in std.tolist()], "channels": channels,
            "num_images": used, "num_pixels": pixels, "skipped": len(skipped), "first_skipped": skipped[:5]}


def image_stats(recipe: str | Path, overrides: Sequence[str] = (), limit: int | None = None, workers: int = 0,
                write: bool = False) -> dict:
    """The statistics of a recipe's `data.train` images; with `write`, also stored as JSON at its
    `stats_file` option. Returns them plus `path` (the file written, or None)."""
    from maeframe.build import prepare

    if limit is not None and limit <= 0:
        raise MaeframeError(f"image-stats: --limit must be positive, got {limit}")
    prepared = prepare(recipe, list(overrides))
    if prepared.joint:
        raise RecipeError([("modalities", "image-stats reads a single-modality recipe's data.train; run it on a "
                                          "recipe of that modality alone")], prepared.source)
    ref = prepared.recipe.data.train
    cls = prepared.registry.get("dataset", ref.name).cls
    if not issubclass(cls, ImageDataset):
        raise RecipeError([("data.train.name", f"dataset {ref.name!r} is not an image dataset; image-stats reads "
                                               f"image_folder, image_files, image_list, tar_shards, packed, ...")],
                          prepared.source)
    channels = prepared.components.tokenizer.input_shape[0]
    target = ref.options.get("stats_file")
    if write and not target:
        raise RecipeError([("data.train.options.stats_file", "--write stores the statistics here; set it in the "
                                                             "recipe or with data.train.options.stats_file=PATH")],
                          prepared.source)
    neutral = {"mean": [0.0] * channels, "std": [1.0] * channels, "stats_file": None}  # no normalisation
    options = cls.Options.model_validate({**ref.options, **neutral})
    try:
        dataset = cls(options, prepared.components.tokenizer.input_shape, False)
        stats = channel_stats(dataset, limit, workers)
    except OptionError as err:
        raise RecipeError([(f"data.train.options.{err.field}", err.message)], prepared.source) from err
    except (ValueError, OSError) as err:
        raise RecipeError([("data.train", str(err))], prepared.source) from err
    stats["path"] = write_stats_file(stats, target, recipe, ref.name) if write else None
    return stats
