"""A user's own files as a dataset with a recipe's evaluation preprocessing (`Dataset.from_files`).

The reader is the recipe's dataset class (`data.train`, or `data.eval`) when it reads single files
(`file_suffixes()` is not empty: every built-in image, video and audio dataset does, through its modality's
base class). A dataset that reads no files (e.g. a synthetic one) hands over to the registered datasets
that read every input's suffix (the first by name); they get the recipe dataset's options, of which they
take the preprocessing fields they declare (same names, e.g. mean/std). Either way the choice is reported
(`reader`), never silent.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

from ..build import Prepared
from ..dataset import Dataset
from ..errors import MaeframeError


def suffix_of(path: str | Path) -> str:
    return Path(path).suffix.lower()


def find_reader(prepared: Prepared, paths: list[str], split: str = "train") -> tuple[str, type[Dataset], dict]:
    """(dataset name, class, its options with defaults) that reads `paths` with the recipe's preprocessing."""
    data = prepared.recipe.data
    ref = data.eval if split == "eval" and data.eval is not None else data.train
    cls = prepared.registry.get("dataset", ref.name).cls
    options = cls.Options.model_validate(ref.options).model_dump()
    if cls.file_suffixes():
        return ref.name, cls, options
    wanted = {suffix_of(path) for path in paths}
    for name, entry in sorted(prepared.registry.entries["dataset"].items()):
        if wanted and wanted <= set(entry.cls.file_suffixes()):
            return name, entry.cls, options
    raise MaeframeError(f"the recipe's dataset {ref.name!r} reads no single files and no registered dataset reads "
                        f"files ending in {', '.join(sorted(wanted))}")


def readable_suffixes(prepared: Prepared) -> tuple[str, ...]:
    """The suffixes of files the recipe's dataset reads, or, when it reads none, those any registered one reads
    (for listing a folder)."""
    cls = prepared.registry.get("dataset", prepared.recipe.data.train.name).cls
    return cls.file_suffixes() or tuple(sorted({suffix for entry in prepared.registry.entries["dataset"].values()
                                                for suffix in entry.cls.file_suffixes()}))


def check_inputs(paths: list[str], suffixes: tuple[str, ...], reader: str) -> None:
    """Every path exists and has a suffix the reader takes; an error names the first file that does not."""
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"input {path!r} does not exist or is not a file")
        if suffix_of(path) not in suffixes:
            shown = ", ".join(suffixes[:12]) + (" ..." if len(suffixes) > 12 else "")
            raise MaeframeError(f"{path}: not a file these weights read (suffix {suffix_of(path) or 'none'!r}; "
                                f"{reader} reads {shown})")


def files_dataset(prepared: Prepared, paths: list[str], labels: list[int] | None = None,
                  split: str = "train") -> tuple[Dataset, str]:
    """(dataset reading exactly `paths` in order, the reader's dataset name). Files that are missing, of
    another kind, or whose header cannot be read are an error naming the file."""
    name, cls, options = find_reader(prepared, paths, split)
    check_inputs(paths, cls.file_suffixes(), name)
    try:
        dataset = cls.from_files(options, prepared.components.tokenizer.input_shape, paths, labels)
    except (ValueError, OSError) as err:
        raise MaeframeError(f"reading the inputs with {name}: {err}") from None
    if dataset.unreadable():
        raise MaeframeError(f"cannot read {dataset.unreadable()[0]}")
    return dataset, name


def load_sample(dataset: Dataset, index: int):
    """dataset[index], a failure as an error naming the file (`describe`)."""
    try:
        return dataset[index]
    except Exception as err:  # any decoder's failure on a user's file
        raise MaeframeError(f"{dataset.describe(index)}: cannot be read: {type(err).__name__}: {err}") from None


def list_folder(folder: Path, suffixes: tuple[str, ...]) -> list[str]:
    """Every file under `folder` (recursively, sorted) with one of `suffixes`."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found += [os.path.join(root, name) for name in sorted(files) if suffix_of(name) in suffixes]
    if not found:
        raise MaeframeError(f"{folder}: no file with a suffix the weights read ({', '.join(suffixes[:12])})")
    return found


def read_file_list(listing: Path) -> tuple[list[str], list[int] | None]:
    """(paths, labels or None) of a .txt list (one path per line, # comments) or a .csv with a `path` column
    and an optional integer `label` column; relative paths are taken from the list's folder."""
    base = listing.parent
    if suffix_of(listing) == ".csv":
        with open(listing, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if "path" not in (reader.fieldnames or []):
                raise MaeframeError(f"{listing}: no `path` column (header: {', '.join(reader.fieldnames or [])})")
            rows = [row for row in reader if (row.get("path") or "").strip()]
        paths = [str(base / row["path"].strip()) for row in rows]
        if "label" not in (reader.fieldnames or []):
            return paths, None
        try:
            return paths, [int(row["label"]) if (row["label"] or "").strip() else -1 for row in rows]
        except ValueError as err:
            raise MaeframeError(f"{listing}: labels must be integers ({err})") from None
    lines = [line.strip() for line in listing.read_text(encoding="utf-8").splitlines()]
    return [str(base / line) for line in lines if line and not line.startswith("#")], None
