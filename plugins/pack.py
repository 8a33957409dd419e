"""`maeframe pack`: decode every image of a dataset once and store it as uint8 shards for the `packed` dataset.

Sources are read through an existing image dataset plugin (`image_folder`, `fashion_mnist`, or any plugin
whose dataset derives from `ImageDataset`), in parallel loader processes. Each image is resized so its
short side is S (bicubic, antialiased, torchvision's `resize`, as the image datasets' evaluation path) and
centre-cropped to S×S, then stored as uint8 [C, S, S]. Writing goes to a hidden temporary folder beside
OUT which is renamed to OUT only when everything is written, so OUT is either complete or absent.

An unreadable source is skipped, logged with its path and recorded in the index; above
`max_bad_fraction` of the sources the packing fails and writes nothing (the training policy).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError
from torch.utils.data import DataLoader
from torchvision.transforms import v2
from tqdm import tqdm

from maeframe import MaeframeError, build_component, component_class

from .image_data import ImageDataset
from .packed_data import FORMAT, INDEX, SOURCES, file_sha256

log = logging.getLogger("maeframe.pack")
RESIZE = "short side resized to S (bicubic, antialias, torchvision v2 resize on uint8), centre crop S×S"


class DecodeResize(torch.utils.data.Dataset):
    """Wraps a source image dataset: item i -> (i, uint8 [C, S, S] or None, label, error or None)."""

    def __init__(self, source: ImageDataset, size: int):
        self.source, self.size = source, size

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        try:
            image, label = self.source._load(index)
            image = self.source._fit_channels(image)
            image = v2.functional.resize(image, self.size, interpolation=v2.InterpolationMode.BICUBIC,
                                         antialias=True)
            return index, v2.functional.center_crop(image, [self.size, self.size]).contiguous(), label, None
        except Exception as err:  # any failure of one source is that source's problem
            return index, None, None, f"{type(err).__name__}: {err}"


def open_source(fmt: str, root: str, options: dict, channels: int, size: int) -> ImageDataset:
    """The source dataset, built by its plugin with `root` and `options` (no augmentation)."""
    if not issubclass(component_class("dataset", fmt), ImageDataset):
        raise MaeframeError(f"pack: dataset {fmt!r} is not an image dataset; use image_folder, fashion_mnist or "
                            f"another ImageDataset plugin")
    neutral = {"mean": (0.5,) * channels, "std": (0.5,) * channels}  # only _load is used: no normalisation
    try:
        return build_component("dataset", fmt, {"root": root, **neutral, **options}, (channels, size, size), False)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise MaeframeError(f"pack: bad options for dataset {fmt!r}: {problems}") from err
    except ValueError as err:
        raise MaeframeError(f"pack: {fmt} at {root}: {err}") from err


def _write_shard(folder: Path, number: int, images: np.ndarray) -> dict:
    name = f"shard-{number:05d}.npy"
    with open(folder / name, "wb") as handle:
        np.save(handle, images)
        handle.flush()
        os.fsync(handle.fileno())
    return {"file": name, "count": len(images), "bytes": (folder / name).stat().st_size,
            "sha256": file_sha256(folder / name)}


def pack(source: str, out: str | Path, size: int, fmt: str = "image_folder", channels: int = 3,
         options: dict | None = None, shard_size: int = 4096, workers: int = 0,
         max_bad_fraction: float = 0.01, progress: bool = False) -> dict:
    """Pack `source` (read by dataset plugin `fmt`) into folder `out`; returns the written index."""
    out = Path(out).expanduser()
    if out.exists():
        raise MaeframeError(f"pack: {out} already exists; remove it or choose another output folder")
    if size < 1 or shard_size < 1 or workers < 0 or channels not in (1, 3):
        raise MaeframeError(f"pack: need --size ≥ 1, --shard-size ≥ 1, --workers ≥ 0 and --channels 1 or 3 "
                            f"(got {size}, {shard_size}, {workers}, {channels})")
    dataset = open_source(fmt, source, options or {}, channels, size)
    started = time.perf_counter()
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        index = _pack_into(tmp, dataset, size, channels, shard_size, workers, max_bad_fraction, progress)
        index.update(source={"format": fmt, "root": str(source), "options": options or {}},
                     seconds=round(time.perf_counter() - started, 2))
        (tmp / INDEX).write_text(json.dumps(index) + "\n")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return index


def _pack_into(tmp: Path, dataset: ImageDataset, size: int, channels: int, shard_size: int, workers: int,
               max_bad_fraction: float, progress: bool) -> dict:
    loader = DataLoader(DecodeResize(dataset, size), batch_size=64, num_workers=workers, collate_fn=list,
                        prefetch_factor=4 if workers else None)
    buffer = np.empty((shard_size, channels, size, size), dtype=np.uint8)
    filled, shards, labels, sources, skipped = 0, [], [], [], []
    for items in tqdm(loader, total=len(loader), disable=not progress, unit="batch", desc="pack"):
        for index, image, label, error in items:
            if error is not None:
                where = dataset.describe(index)
                log.warning("skipping unreadable image %s: %s", where, error)
                skipped.append({"index": index, "source": where, "error": error})
                continue
            buffer[filled] = image.numpy()
            labels.append(int(label))
            sources.append(dataset.describe(index))
            filled += 1
            if filled == shard_size:
                shards.append(_write_shard(tmp, len(shards), buffer))
                filled = 0
    if filled:
        shards.append(_write_shard(tmp, len(shards), buffer[:filled]))
    read = len(dataset)
    if len(skipped) > max_bad_fraction * read or not labels:
        first = "; ".join(f"{s['source']}: {s['error']}" for s in skipped[:5])
        raise MaeframeError(f"pack: {len(skipped)} of {read} source images are unreadable (more than "
                            f"max_bad_fraction={max_bad_fraction}); first: {first}")
    (tmp / SOURCES).write_text("".join(f"{s}\n" for s in sources))
    return {
        "format": FORMAT, "count": len(labels), "shape": [channels, size, size], "dtype": "uint8",
        "layout": "NCHW", "shard_size": shard_size, "shards": shards, "labels": labels,
        "classes": list(getattr(dataset, "classes", [])), "sources_file": SOURCES,
        "sources_sha256": file_sha256(tmp / SOURCES), "read": read, "skipped_count": len(skipped),
        "skipped": skipped, "resize": RESIZE,
    }
