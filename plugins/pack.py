"""`maeframe pack`: decode every image of a dataset once and store it as shards: uint8 `.npy` arrays for the
`packed` dataset (`to="npy"`), or WebDataset tar shards for `tar_shards` (`to="webdataset"`).

Sources are read through an existing image dataset plugin (`image_folder`, `image_files`, `image_list`,
`tar_shards`, `fashion_mnist`, or any plugin whose dataset derives from `ImageDataset`; SOURCE fills its
`source_option`), in parallel loader processes. Each image is resized so its short side is S (bicubic,
antialiased, torchvision's `resize`, as the image datasets' evaluation path) and centre-cropped to S×S,
any number of channels, 8-bit values only. `npy` stores uint8 [C, S, S] rows; `webdataset` stores each as
`KEY.jpg` (or `.png`, or `.npy` for channel counts other than 1 and 3) plus `KEY.cls` when labelled,
written with webdataset's `TarWriter` (the `webdataset` extra). Writing goes to a hidden temporary folder
beside OUT which is renamed to OUT only when everything is written, so OUT is either complete or absent.

An unreadable source is skipped, logged with its path and recorded in the index; above
`max_bad_fraction` of the sources the packing fails and writes nothing (the training policy).
"""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Literal

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
WEBDATASET_FORMAT = "maeframe-webdataset-1"
WEBDATASET_EXTRA = "pip install 'maeframe[webdataset]'"
Encoding = Literal["jpg", "png", "npy"]


class DecodeResize(torch.utils.data.Dataset):
    """Wraps a source image dataset: item i -> (i, uint8 [C, S, S] or its encoded bytes or None, label, error
    or None). `encoding` None keeps the array; "jpg" / "png" / "npy" return the file's bytes."""

    def __init__(self, source: ImageDataset, size: int, encoding: Encoding | None = None, quality: int = 95):
        self.source, self.size, self.encoding, self.quality = source, size, encoding, quality

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        try:
            image, label = self.source._load(index)
            if image.dtype != torch.uint8:
                raise ValueError(f"decodes to {str(image.dtype).replace('torch.', '')} values (16-bit or float "
                                 f"data); pack stores 8-bit images: train from the files directly")
            image = self.source._fit_channels(image)
            image = v2.functional.resize(image, self.size, interpolation=v2.InterpolationMode.BICUBIC,
                                         antialias=True)
            image = v2.functional.center_crop(image, [self.size, self.size]).contiguous()
            return index, image if self.encoding is None else encode(image, self.encoding, self.quality), label, None
        except Exception as err:  # any failure of one source is that source's problem
            return index, None, None, f"{type(err).__name__}: {err}"


def encode(image: torch.Tensor, encoding: Encoding, quality: int = 95) -> bytes:
    """uint8 [C, S, S] -> the bytes of a .jpg / .png (1 or 3 channels) or .npy file (any channels)."""
    buffer = io.BytesIO()
    if encoding == "npy":
        np.save(buffer, image.numpy())
    else:
        from PIL import Image

        array = image.permute(1, 2, 0).numpy()
        Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(
            buffer, format="JPEG" if encoding == "jpg" else "PNG", **({"quality": quality} if encoding == "jpg" else {}))
    return buffer.getvalue()


def open_source(fmt: str, root: str, options: dict, channels: int, size: int) -> ImageDataset:
    """The source dataset, built by its plugin with `root` and `options` (no augmentation)."""
    source = component_class("dataset", fmt)
    if not issubclass(source, ImageDataset):
        raise MaeframeError(f"pack: dataset {fmt!r} is not an image dataset; use image_folder, fashion_mnist or "
                            f"another ImageDataset plugin")
    neutral = {"mean": (0.5,) * channels, "std": (0.5,) * channels}  # only _load is used: no normalisation
    try:
        return build_component("dataset", fmt, {source.source_option: root, **neutral, **options},
                               (channels, size, size), False)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise MaeframeError(f"pack: bad options for dataset {fmt!r}: {problems}") from err
    except (ValueError, OSError) as err:
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
         max_bad_fraction: float = 0.01, progress: bool = False, to: Literal["npy", "webdataset"] = "npy",
         encoding: Encoding | None = None, quality: int = 95) -> dict:
    """Pack `source` (read by dataset plugin `fmt`) into folder `out` as `to` shards; returns the written index.
    `encoding` (webdataset only): the image field, default jpg for 1 or 3 channels, npy otherwise."""
    out = Path(out).expanduser()
    if out.exists():
        raise MaeframeError(f"pack: {out} already exists; remove it or choose another output folder")
    if size < 1 or shard_size < 1 or workers < 0 or channels < 1 or not 1 <= quality <= 100:
        raise MaeframeError(f"pack: need --size ≥ 1, --shard-size ≥ 1, --workers ≥ 0, --channels ≥ 1 and "
                            f"--quality 1-100 (got {size}, {shard_size}, {workers}, {channels}, {quality})")
    if to == "webdataset":
        encoding = encoding or ("jpg" if channels in (1, 3) else "npy")
        if encoding != "npy" and channels not in (1, 3):
            raise MaeframeError(f"pack: --image-format {encoding} stores 1 or 3 channels, not {channels}; use npy")
        try:
            import webdataset  # noqa: F401
        except ImportError:
            raise MaeframeError(f"pack: --to webdataset needs the webdataset library: {WEBDATASET_EXTRA}") from None
    elif encoding is not None:
        raise MaeframeError("pack: --image-format applies to --to webdataset only")
    dataset = open_source(fmt, source, options or {}, channels, size)
    started = time.perf_counter()
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        writer = (_pack_webdataset(tmp, dataset, size, channels, shard_size, workers, encoding, quality, progress)
                  if to == "webdataset" else
                  _pack_into(tmp, dataset, size, channels, shard_size, workers, progress))
        index = _finish(tmp, dataset, writer, max_bad_fraction)
        index.update(source={"format": fmt, "root": str(source), "options": options or {}},
                     seconds=round(time.perf_counter() - started, 2))
        (tmp / INDEX).write_text(json.dumps(index) + "\n")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return index


class Decoded:
    """The decoded sources in order: iterate for (payload, label, source) of each readable one; `skipped`
    collects the unreadable ones (logged with their path)."""

    def __init__(self, dataset: ImageDataset, decoder: DecodeResize, workers: int, progress: bool):
        self.dataset, self.skipped, self.sources, self.labels = dataset, [], [], []
        self.loader = DataLoader(decoder, batch_size=64, num_workers=workers, collate_fn=list,
                                 prefetch_factor=4 if workers else None)
        self.progress = progress

    def __iter__(self):
        for items in tqdm(self.loader, total=len(self.loader), disable=not self.progress, unit="batch", desc="pack"):
            for index, payload, label, error in items:
                where = self.dataset.describe(index)
                if error is not None:
                    log.warning("skipping unreadable image %s: %s", where, error)
                    self.skipped.append({"index": index, "source": where, "error": error})
                    continue
                self.labels.append(int(label))
                self.sources.append(where)
                yield payload, int(label), where


def _pack_into(tmp: Path, dataset: ImageDataset, size: int, channels: int, shard_size: int, workers: int,
               progress: bool) -> tuple[Decoded, dict]:
    """uint8 .npy shards for the `packed` dataset."""
    decoded = Decoded(dataset, DecodeResize(dataset, size), workers, progress)
    buffer = np.empty((shard_size, channels, size, size), dtype=np.uint8)
    filled, shards = 0, []
    for image, _, _ in decoded:
        buffer[filled] = image.numpy()
        filled += 1
        if filled == shard_size:
            shards.append(_write_shard(tmp, len(shards), buffer))
            filled = 0
    if filled:
        shards.append(_write_shard(tmp, len(shards), buffer[:filled]))
    return decoded, {"format": FORMAT, "shape": [channels, size, size], "dtype": "uint8", "layout": "NCHW",
                     "shard_size": shard_size, "shards": shards}


def _pack_webdataset(tmp: Path, dataset: ImageDataset, size: int, channels: int, shard_size: int, workers: int,
                     encoding: Encoding, quality: int, progress: bool) -> tuple[Decoded, dict]:
    """WebDataset tar shards (`KEY.<encoding>` + `KEY.cls` when labelled) for the `tar_shards` dataset."""
    import webdataset

    decoded = Decoded(dataset, DecodeResize(dataset, size, encoding, quality), workers, progress)
    shards, writer, count = [], None, 0

    def close() -> None:
        writer.close()
        shards[-1].update(bytes=(tmp / shards[-1]["file"]).stat().st_size,
                          sha256=file_sha256(tmp / shards[-1]["file"]))

    for data, label, _ in decoded:
        if count % shard_size == 0:
            if writer is not None:
                close()
            shards.append({"file": f"shard-{len(shards):05d}.tar", "count": 0})
            writer = webdataset.TarWriter(str(tmp / shards[-1]["file"]))
        writer.write({"__key__": f"{count:09d}", encoding: data, **({"cls": label} if label >= 0 else {})})
        shards[-1]["count"] += 1
        count += 1
    if writer is not None:
        close()
    last = f"{len(shards) - 1:05d}"
    return decoded, {"format": WEBDATASET_FORMAT, "shape": [channels, size, size], "dtype": "uint8",
                     "encoding": encoding, "quality": quality if encoding == "jpg" else None,
                     "shard_size": shard_size, "shards": shards, "urls": f"shard-{{00000..{last}}}.tar"}


def _finish(tmp: Path, dataset: ImageDataset, written: tuple[Decoded, dict], max_bad_fraction: float) -> dict:
    """Fail above the bad fraction (nothing is kept), else write sources.txt and return the index."""
    decoded, index = written
    read, skipped = len(dataset), decoded.skipped
    if len(skipped) > max_bad_fraction * read or not decoded.labels:
        first = "; ".join(f"{s['source']}: {s['error']}" for s in skipped[:5])
        raise MaeframeError(f"pack: {len(skipped)} of {read} source images are unreadable (more than "
                            f"max_bad_fraction={max_bad_fraction}); first: {first}")
    (tmp / SOURCES).write_text("".join(f"{s}\n" for s in decoded.sources))
    return {**index, "count": len(decoded.labels), "labels": decoded.labels,
            "classes": list(getattr(dataset, "classes", None) or []), "sources_file": SOURCES,
            "sources_sha256": file_sha256(tmp / SOURCES), "read": read, "skipped_count": len(skipped),
            "skipped": skipped, "resize": RESIZE}
