"""Images as users have them: every image under a folder (`image_files`) or named by a list (`image_list`).

No class sub-folders are needed. `image_files` searches its root recursively (sorted paths, so the index of
a file is the same on every machine and every run) and takes every format Pillow opens, TIFF and `.npy`
arrays (`image_decode.image_extensions()`); the samples are unlabelled (label -1). `image_list` reads a
text file (one path per line, optionally `path<whitespace>label` with `label_column: 1`) or a CSV/TSV with
a header (`path_column`, optional `label_column`); paths are relative to the list's folder (or `root`),
labels are class indices (integers) or class names (sorted into indices), and a row without one is -1.

A file that cannot be read (missing, corrupt, too large) raises when loaded: the engine logs it with its
path, replaces it and counts it under `data.max_bad_fraction`. Files passed over when listing (another
extension) are logged once on the `maeframe.data` logger.
"""
from __future__ import annotations

import csv
import os
from collections import Counter
from pathlib import Path

from pydantic import Field
from torch import Tensor

from maeframe import OptionError, hookimpl

from .folders import extension_reason, log_passed_over
from .image_data import ImageAugmentOptions, ImageDataset
from .image_decode import DecodeOptions, decode, image_extensions

CHECKED = 20  # list entries whose existence is checked when the dataset is built (a wrong base folder)


class ImageFilesOptions(ImageAugmentOptions, DecodeOptions):
    root: str = Field(description="folder searched recursively for images (no class sub-folders needed)")
    extensions: list[str] | None = Field(None, description="file suffixes taken, e.g. ['.png', '.tif']; null = "
                                                           "every format Pillow opens, TIFF and .npy arrays")
    follow_links: bool = Field(True, description="descend into symbolic links to folders")
    limit: int | None = Field(None, gt=0, description="use only the first N images in sorted path order")


class FileListDataset(ImageDataset):
    """Shared by both: `self.paths` (absolute) and `self.labels` (-1 = unlabelled), set by subclasses."""

    paths: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self, index: int) -> str:
        return self.paths[index]

    def _load(self, index: int) -> tuple[Tensor, int]:
        path = self.paths[index]
        return decode(path, path, self.input_shape[0], self.options), self.labels[index]


class ImageFilesDataset(FileListDataset):
    """Every image under `root`, at any depth, unlabelled."""

    Options = ImageFilesOptions

    def __init__(self, options: ImageFilesOptions, input_shape: tuple[int, ...], train: bool):
        super().__init__(options, input_shape, train)
        root = Path(options.root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"image_files: root {str(root)!r} is not a directory")
        taken = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in options.extensions or []) \
            or image_extensions()
        passed: Counter = Counter()
        paths = []
        for folder, dirs, files in os.walk(root, followlinks=options.follow_links):
            dirs.sort()
            for name in files:
                if name.lower().endswith(taken):
                    paths.append(os.path.join(folder, name))
                else:
                    passed[extension_reason(name)] += 1
        described = (", ".join(taken) if options.extensions else
                     f"Pillow's formats ({len(taken) - 1} suffixes: .png, .jpg, .webp, .tif, ...) and .npy")
        log_passed_over("image_files", root, passed, chosen=() if options.extensions is None else tuple(passed),
                        taken=described)
        if not paths:
            raise ValueError(f"image_files: no image under {root} (suffixes taken: {', '.join(taken)})")
        self.paths = sorted(paths)[: options.limit]
        self.labels = [-1] * len(self.paths)


class ImageListOptions(ImageAugmentOptions, DecodeOptions):
    list: str = Field(description="a .txt (one path per line) or .csv/.tsv file (header row) naming the images")
    root: str | None = Field(None, description="folder the listed paths are relative to (default: the list's "
                                               "folder); absolute paths are taken as they are")
    path_column: str = Field("path", description="CSV/TSV: header of the column holding the paths")
    label_column: str | int | None = Field(None, description="CSV/TSV: header of an optional label column; "
                                           ".txt: 1 reads `path label` lines (label after the last whitespace); "
                                           "labels are integers or class names, empty = unlabelled (-1)")
    limit: int | None = Field(None, gt=0, description="use only the first N listed images")


class ImageListDataset(FileListDataset):
    """The images a text or CSV list names, with optional labels."""

    Options = ImageListOptions
    source_option = "list"

    def __init__(self, options: ImageListOptions, input_shape: tuple[int, ...], train: bool):
        super().__init__(options, input_shape, train)
        listing = Path(options.list).expanduser()
        if not listing.is_file():
            raise FileNotFoundError(f"image_list: list {str(listing)!r} is not a file")
        base = Path(options.root).expanduser() if options.root else listing.parent
        rows = read_rows(listing, options)[: options.limit]
        if not rows:
            raise ValueError(f"image_list: {listing} names no image")
        self.paths = [str(base / path) for path, _ in rows]  # an absolute listed path replaces the base
        self.labels, self.classes = encode_labels([label for _, label in rows])
        step = max(len(self.paths) // CHECKED, 1)
        checked = self.paths[::step][:CHECKED]
        if not any(os.path.exists(p) for p in checked):
            raise OptionError("root" if options.root else "list",
                              f"image_list: none of {len(checked)} paths checked of those {listing} lists exists, "
                              f"e.g. {checked[0]!r}; they are taken relative to {str(base)!r} (set root)")


def read_rows(listing: Path, options: ImageListOptions) -> list[tuple[str, str]]:
    """(path, label text or '') per entry of a .txt or a .csv/.tsv list."""
    if listing.suffix.lower() not in (".csv", ".tsv"):
        if options.label_column not in (None, 1, "1"):
            raise OptionError("label_column", f"a .txt list takes label_column 1 (`path label` lines) or null, "
                                              f"got {options.label_column!r}")
        rows = []
        for line in listing.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(maxsplit=1) if options.label_column is not None else [line]
            rows.append((parts[0], parts[1] if len(parts) == 2 else ""))
        return rows
    with open(listing, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter="\t" if listing.suffix.lower() == ".tsv" else ",")
        header = reader.fieldnames or []
        for field, column in (("path_column", options.path_column), ("label_column", options.label_column)):
            if column is not None and str(column) not in header:
                raise OptionError(field, f"{listing} has no column {column!r}; its header: {', '.join(header)}")
        label = None if options.label_column is None else str(options.label_column)
        return [(row[options.path_column].strip(), (row[label] or "").strip() if label else "")
                for row in reader if (row.get(options.path_column) or "").strip()]


def encode_labels(texts: list[str]) -> tuple[list[int], list[str] | None]:
    """Label texts -> (indices, class names or None): integers as they are, names sorted into indices,
    empty texts -1 (unlabelled)."""
    given = [t for t in texts if t]
    if all(t.lstrip("-").isdigit() for t in given):
        return [int(t) if t else -1 for t in texts], None
    classes = sorted(set(given))
    index = {name: i for i, name in enumerate(classes)}
    return [index[t] if t else -1 for t in texts], classes


@hookimpl
def register_datasets(register):
    register("image_files", ImageFilesDataset)
    register("image_list", ImageListDataset)
