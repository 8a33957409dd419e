"""`tar_shards`: images in WebDataset tar shards, read by random access from local paths or fsspec URLs.

A shard is a plain tar file in the WebDataset layout: consecutive members that share a key (the member
name up to the first dot of its file name) form one sample, e.g. `000042.jpg` + `000042.cls`. The image
is the sample's first field whose extension is in `image_keys` (decoded by `image_decode.decode`, so
JPEG/PNG/TIFF/.npy, transparency and any channel count work as in the file datasets); the label is the
integer text of its `label_key` field (`cls`), or -1 without one. `maeframe pack SRC OUT --to webdataset`
writes such shards, and the `webdataset` library reads them as they are.

Why a map-style dataset rather than webdataset's streaming `IterableDataset`: the engine's data order
(`ResumableBatchSampler`: a permutation of all samples per (seed, epoch), rank r loading its slice of
each global batch, every sample augmented under its own seed) then applies unchanged, so `--resume`
continues at the exact sample, N processes see exactly what one process with an N× batch sees, and the
shuffle is over the whole dataset rather than within a buffer. A stream would need its own shard split
across ranks × workers (unequal shard counts drop or repeat data), a replay of the stream to resume, and a
sample order that changes with the number of workers. The price is one ranged read per sample instead
of a sequential read per shard: nothing on a local disk or NFS (the page cache holds the shards), one
request per sample on an object store, which enough loader workers overlap.

The index: when the dataset is built each shard's tar headers are read once (`tar_index.members`, seeking
over the data, in `index_threads` threads) into (member, offset, size, label) per sample; `index_cache` keeps the indexes
between runs, keyed by URL and checked against the shard's size and modification time. Loader workers
then read `size` bytes at `offset` (`os.pread` on local files, `fs.cat_file` with a byte range on any
other fsspec filesystem). A member that fails to decode or is cut short raises when read: the engine logs,
replaces and counts it like any unreadable file. A shard whose headers break off (a damaged tar) keeps the
samples before the damage, is logged when the dataset is built, and the rest counts as one bad sample per
epoch. Samples without an image field are passed over and logged, like other files in folder datasets.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field
from torch import Tensor

from maeframe import OptionError, hookimpl

from .folders import log_passed_over
from .image_data import ImageAugmentOptions, ImageDataset
from .image_decode import DecodeOptions, decode
from .tar_index import Member, TarDamaged, members

log = logging.getLogger("maeframe.data")
IMAGE_KEYS = ["jpg", "jpeg", "png", "webp", "tif", "tiff", "npy", "ppm", "pgm", "bmp", "gif"]
INDEX_VERSION = 2
KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's rule: key up to the first dot of the file name


class TarShardsOptions(ImageAugmentOptions, DecodeOptions):
    urls: str | list[str] = Field(description="shard paths or fsspec URLs (file://, s3://, https://, ...), with "
                                              "brace ranges and globs: 'data/shard-{00000..00099}.tar', "
                                              "'s3://bucket/train-*.tar'")
    image_keys: list[str] = Field(IMAGE_KEYS, description="field extensions taken as the image, first present "
                                                          "wins (lower case, without the dot)")
    label_key: str | None = Field("cls", description="field holding an integer label as text; absent or null "
                                                     "= unlabelled (-1)")
    storage_options: dict[str, Any] = Field({}, description="fsspec options of the URLs' filesystem, e.g. "
                                                            "{anon: true} for public S3 buckets")
    index_cache: str | None = Field(None, description="folder keeping each shard's member index between runs "
                                                      "(checked against size and mtime); null = rebuilt per run")
    index_threads: int = Field(8, ge=1, description="shards whose headers are read at once when indexing")
    limit: int | None = Field(None, gt=0, description="use only the first N samples in shard order")


@dataclass
class ShardIndex:
    """One shard's samples: image member names, data offsets and sizes, labels (-1 = none)."""

    url: str
    names: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    passed: dict[str, int] = field(default_factory=dict)  # samples passed over, by reason
    damaged: str | None = None  # why the headers broke off, if they did


def expand_braces(pattern: str) -> list[str]:
    """'a-{00..02}-{x,y}.tar' -> ['a-00-x.tar', 'a-00-y.tar', 'a-01-x.tar', ...] (zero padding kept)."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end():]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        width = len(first) if first.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(first), int(last) + 1)]
    else:
        items = body.split(",")
    return [expanded for item in items for expanded in expand_braces(head + item + tail)]


def resolve_shards(urls: str | list[str], storage_options: dict) -> list[tuple[Any, str, str]]:
    """(filesystem, path, url as given) per shard, braces expanded and globs listed, in the given order."""
    import fsspec

    shards = []
    for entry in [urls] if isinstance(urls, str) else urls:
        for url in expand_braces(entry):
            try:
                fs, path = fsspec.core.url_to_fs(url, **storage_options)
            except ImportError as err:  # fsspec names the package of the protocol, e.g. s3fs
                raise OptionError("urls", f"{url}: {err}") from err
            except ValueError as err:  # an unknown protocol
                raise OptionError("urls", f"{url}: {err}") from err
            if any(c in path for c in "*?["):
                found = sorted(fs.glob(path))
                if not found:
                    raise FileNotFoundError(f"tar_shards: no shard matches {url}")
                protocol = url.split("://")[0] + "://" if "://" in url else ""
                shards += [(fs, p, protocol + p if protocol and not p.startswith(protocol) else p) for p in found]
            else:
                shards.append((fs, path, url))
    if not shards:
        raise OptionError("urls", "no shard given")
    return shards


def _version(info: dict) -> str:
    """What changes when a shard is rewritten: size and modification time (or the object's ETag)."""
    stamp = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("ETag") or ""
    return f"{info.get('size')}:{stamp}"


def index_shard(fs, path: str, url: str, image_keys: list[str], label_key: str | None,
                cache: Path | None) -> ShardIndex:
    """Read one shard's tar headers (seeking over the data) into a ShardIndex; uses and fills `cache`."""
    info = fs.info(path)
    if info.get("type") == "directory":
        raise FileNotFoundError(f"tar_shards: {url} is a directory, not a tar shard")
    version = _version(info)
    cached = cache / f"{hashlib.sha256(url.encode()).hexdigest()[:32]}.json" if cache else None
    settings = [INDEX_VERSION, version, image_keys, label_key]
    if cached is not None and cached.is_file():
        stored = json.loads(cached.read_text())
        if stored.get("settings") == settings:
            return ShardIndex(**stored["index"])
    index = ShardIndex(url)
    passed: Counter = Counter()
    with fs.open(path, "rb") as handle:
        sample: dict[str, Member] = {}
        key = None
        try:
            for member in members(handle, info["size"]):
                match = KEY.match(member.name)
                if match is None:
                    continue
                if match.group(1) != key and sample:
                    _add(index, sample, image_keys, label_key, handle, passed)
                    sample = {}
                key = match.group(1)
                sample[match.group(2).lower()] = member
        except TarDamaged as err:  # headers break off: keep what came before
            index.damaged = f"{err}, after {len(index.names) + bool(sample)} samples"
        except ValueError as err:
            raise ValueError(f"tar_shards: {url} is {err}") from None
        if sample:
            _add(index, sample, image_keys, label_key, handle, passed)
    index.passed = dict(passed)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"settings": settings, "index": index.__dict__}))
        os.replace(tmp, cached)
    return index


def _add(index: ShardIndex, sample: dict, image_keys: list[str], label_key: str | None, handle,
         passed: Counter) -> None:
    image = next((sample[key] for key in image_keys if key in sample), None)
    if image is None:
        passed[f"without an image field (fields: {', '.join(sorted(sample))})"] += 1
        return
    label = -1
    if label_key is not None and label_key in sample:
        handle.seek(sample[label_key].offset)
        text = handle.read(sample[label_key].size).decode("utf-8", "replace").strip()
        label = int(text) if text.lstrip("-").isdigit() else -1
        if label == -1 and text:
            log.warning("tar_shards: %s: %s field %r is not an integer label; the sample is unlabelled",
                        index.url, image.name, text[:40])
    index.names.append(image.name)
    index.offsets.append(image.offset)
    index.sizes.append(image.size)
    index.labels.append(label)


class TarShardsDataset(ImageDataset):
    """Samples of WebDataset tar shards by random access (see the module docstring)."""

    Options = TarShardsOptions
    source_option = "urls"

    def __init__(self, options: TarShardsOptions, input_shape: tuple[int, ...], train: bool):
        super().__init__(options, input_shape, train)
        shards = resolve_shards(options.urls, options.storage_options)
        for fs, path, url in shards:
            if not fs.exists(path):
                raise FileNotFoundError(f"tar_shards: shard {url} not found")
        cache = Path(options.index_cache).expanduser() if options.index_cache else None
        keys = [k.lower().lstrip(".") for k in options.image_keys]
        with ThreadPoolExecutor(min(options.index_threads, len(shards))) as pool:
            indexes = list(pool.map(lambda s: index_shard(*s, keys, options.label_key, cache), shards))
        self.fs = [fs for fs, _, _ in shards]
        self.paths = [path for _, path, _ in shards]
        self.urls = [url for _, _, url in shards]
        shard_of, names, offsets, sizes, labels = [], [], [], [], []
        passed: Counter = Counter()
        for s, index in enumerate(indexes):
            count = len(index.names) + (index.damaged is not None)
            shard_of += [s] * count
            names += index.names + ([f"(damaged remainder: {index.damaged})"] if index.damaged else [])
            offsets += index.offsets + ([-1] if index.damaged else [])
            sizes += index.sizes + ([-1] if index.damaged else [])
            labels += index.labels + ([-1] if index.damaged else [])
            passed.update(index.passed)
            if index.damaged:
                log.warning("tar_shards: shard %s is damaged: %s; the rest of it counts as one unreadable sample "
                            "per epoch", index.url, index.damaged)
        log_passed_over("tar_shards", f"{len(shards)} shards", passed)
        count = min(len(names), options.limit or len(names))
        if count == 0:
            raise ValueError(f"tar_shards: no sample with an image field ({', '.join(keys)}) in {len(shards)} "
                             f"shards ({self.urls[0]}, ...)")
        self.shard_of = np.asarray(shard_of[:count], dtype=np.int32)
        self.names = np.asarray(names[:count], dtype=object)
        self.offsets = np.asarray(offsets[:count], dtype=np.int64)
        self.sizes = np.asarray(sizes[:count], dtype=np.int64)
        self.labels = np.asarray(labels[:count], dtype=np.int64)
        self.local = [type(fs).__name__ == "LocalFileSystem" for fs in self.fs]
        self._files: dict[int, int] = {}  # open descriptors of local shards, per loader process

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}}  # descriptors are reopened in each process

    def __len__(self) -> int:
        return len(self.names)

    def describe(self, index: int) -> str:
        return f"{self.urls[self.shard_of[index]]}:{self.names[index]}"

    def read_member(self, index: int) -> bytes:
        """The raw bytes of sample `index`'s image member (one ranged read)."""
        shard, offset, size = int(self.shard_of[index]), int(self.offsets[index]), int(self.sizes[index])
        if offset < 0:
            raise OSError(f"{self.urls[shard]}: {self.names[index]}")
        if self.local[shard]:
            if shard not in self._files:
                self._files[shard] = os.open(self.paths[shard], os.O_RDONLY)
            data = os.pread(self._files[shard], size, offset)
        else:
            data = self.fs[shard].cat_file(self.paths[shard], start=offset, end=offset + size)
        if len(data) != size:
            raise OSError(f"truncated member: {len(data)} of {size} bytes")
        return data

    def _load(self, index: int) -> tuple[Tensor, int]:
        return decode(self.read_member(index), str(self.names[index]), self.input_shape[0], self.options), \
            int(self.labels[index])


@hookimpl
def register_datasets(register):
    register("tar_shards", TarShardsDataset)
