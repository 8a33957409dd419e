"""`maeframe audio-stats`: the mean and std of the log-mel fbank over a recipe's training recordings."""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from .audio_data import AudioDataset
from .audio_features import AudioError
from .stats_file import write_stats_file

log = logging.getLogger("maeframe.audio")


def fbank_stats(dataset: AudioDataset, limit: int | None = None) -> dict:
    """Mean and std of the raw log-mel values over the recordings' own frames (no padding, cropping,
    augmentation or normalisation), with `limit` recordings spread evenly over the dataset."""
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    count = len(dataset) if limit is None else min(limit, len(dataset))
    indices = sorted({int(i * len(dataset) / count) for i in range(count)})
    total = total_sq = 0.0
    frames = 0
    used = 0
    for i in indices:
        try:
            features = dataset.features(i).double()
        except AudioError as err:
            dataset._skip(dataset.items[i][0], str(err))
            continue
        total += float(features.sum())
        total_sq += float((features * features).sum())
        frames += features.shape[0]
        used += 1
    if frames == 0:
        raise ValueError("no readable recordings to compute statistics from")
    values = frames * dataset.config.num_mel_bins
    mean = total / values
    std = math.sqrt(max(total_sq / values - mean * mean, 0.0))
    return {"mean": mean, "std": std, "num_files": used, "num_frames": frames,
            "num_mel_bins": dataset.config.num_mel_bins, "sample_rate": dataset.config.sample_rate,
            "skipped": len(set(dataset.skipped))}


def audio_stats(recipe: str | Path, overrides: Sequence[str] = (), limit: int | None = None,
                write: bool = False) -> dict:
    """The fbank statistics of a recipe's training recordings (`data.train`, evaluation pipeline). With
    `write`, also stores them as JSON at the dataset's `stats_file` option. Returns the statistics plus
    `path` (the file written, or None)."""
    from maeframe import prepare

    prepared = prepare(recipe, list(overrides))
    if prepared.joint:
        raise ValueError("modalities: audio-stats reads a single-modality recipe's data.train; run it on a recipe "
                         "of that modality alone")
    ref = prepared.recipe.data.train
    cls = prepared.registry.get("dataset", ref.name).cls
    if not issubclass(cls, AudioDataset):
        raise ValueError(f"data.train is dataset {ref.name!r}, not an audio dataset")
    options = cls.Options.model_validate(ref.options)
    target = options.stats_file
    if write and target is None:
        raise ValueError("--write stores the statistics at data.train.options.stats_file; set it in the recipe "
                         "or with data.train.options.stats_file=PATH")
    dataset = cls(options.model_copy(update={"stats_file": None}), prepared.components.tokenizer.input_shape, False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per-file fbank is small: extra threads only add overhead (as in loader workers)
    try:
        stats = fbank_stats(dataset, limit)
    finally:
        torch.set_num_threads(threads)
    stats["path"] = write_stats_file(stats, target, recipe, ref.name) if write else None
    return stats
