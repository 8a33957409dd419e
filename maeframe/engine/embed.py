"""`maeframe embed`: encoder features of a dataset, as the k-NN protocol computes them.

The weights (a maeframe pretraining or fine-tuning checkpoint, or other weights through their format) are
loaded as a `task: knn` recipe would load them (`knn_eval.build_encoder`: the same encoder, layout and
checks), and every sample is encoded with all tokens visible by `knn.knn_features` under the runtime's
precision: `avg` (mean of the normed patch tokens, the k-NN task's feature), `cls`, or `all` tokens. A
fine-tuned or linearly probed checkpoint gives what its classifier's head sees (embed_downstream.py).

DATA: a recipe file (its `data.train`, or `data.eval` with split="eval", read without augmentation), a
folder (every file under it that the weights' dataset reads), or a list (.txt: one path per line; .csv: a
`path` column and an optional integer `label` column). Folders and lists are read with the weights'
preprocessing (`Dataset.from_files`, engine/files.py). Chunks, resume and the output layout:
engine/embed_store.py. Under torchrun, chunk i is embedded by rank i mod world size; rank 0 assembles.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from torch.utils.data import Subset
from tqdm import tqdm

from ..build import Prepared, build_dataset
from ..dataset import Dataset
from ..errors import MaeframeError
from ..recipe import EncoderConfig
from ..recipe_file import apply_override, read_recipe_tree
from .distributed import World, barrier, init_world, map_dataset, shutdown_world
from .embed_downstream import downstream_features
from .embed_store import assemble, chunk_done, fingerprint, write_chunk
from .files import files_dataset, list_folder, read_file_list, readable_suffixes
from .knn import knn_features
from .knn_eval import build_encoder
from .pretrained import Weights, open_weights, prepare_tree
from .runtime import select_runtime

POOLS = ("avg", "cls", "all")
RECIPE_SUFFIXES = (".yaml", ".yml")
LIST_SUFFIXES = (".txt", ".csv")
DOWNSTREAM = ("finetune", "linprobe")


def knn_tree(weights: Weights, data_ref: dict[str, Any] | None, plugins: list[str], pool: str,
             device: str, batch_size: int, num_workers: int) -> dict[str, Any]:
    """A `task: knn` recipe running these weights' encoder on `data_ref` (default: the weights' own dataset,
    whose preprocessing reads a folder or list)."""
    tree = weights.tree
    data = data_ref or tree["data"]["train"]
    return {
        "task": "knn", "name": "embed", "seed": tree.get("seed", 0),
        "plugins": list(dict.fromkeys([*tree.get("plugins", []), *plugins])),
        "init": {"format": weights.format, "checkpoint": str(weights.path)},
        "tokenizer": copy.deepcopy(tree["tokenizer"]),
        "model": {key: value for key, value in tree.get("model", {}).items() if key in EncoderConfig.model_fields},
        "knn": {"pool": "cls" if pool == "cls" else "avg"},
        "data": {"train": data, "eval": data, "batch_size": batch_size, "num_workers": num_workers},
        "runtime": {"device": device},
    }


def open_data(prepared: Prepared, data: Path, from_recipe: bool, split: str) -> tuple[Dataset, dict[str, Any]]:
    """(dataset, facts identifying it for the fingerprint)."""
    if from_recipe:
        return build_dataset(prepared, "train", augment=False), {"recipe": str(data.resolve()), "split": split,
                                                                  "data": prepared.recipe.data.train.model_dump()}
    if data.is_dir():
        paths, labels = list_folder(data, readable_suffixes(prepared)), None
    else:
        paths, labels = read_file_list(data)
        if not paths:
            raise MaeframeError(f"{data}: lists no file")
    dataset, _ = files_dataset(prepared, paths, labels)
    return dataset, {"paths": paths, "labels": labels}


def embed(weights: str | Path, data: str | Path, out: str | Path, *, format: str = "auto", split: str = "train",
          pool: str = "avg", device: str = "auto", batch_size: int = 256, chunk_size: int = 4096,
          num_workers: int = 0, overrides: list[str] = (), progress: bool = True) -> Path:
    """Write the features of `data` to `out` (safetensors; see embed_store). Returns `out`."""
    if pool not in POOLS:
        raise MaeframeError(f"--pool {pool!r}: choose one of {', '.join(POOLS)}")
    data, out = Path(data), Path(out)
    if chunk_size < 1 or batch_size < 1:
        raise MaeframeError(f"--chunk-size {chunk_size} / --batch-size {batch_size}: both must be at least 1")
    if not data.exists():
        raise FileNotFoundError(f"data {str(data)!r} does not exist")
    from_recipe = data.suffix.lower() in RECIPE_SUFFIXES
    if not (from_recipe or data.is_dir() or data.suffix.lower() in LIST_SUFFIXES):
        raise MaeframeError(f"{data}: DATA is a recipe (.yaml), a folder or a file list (.txt, .csv)")
    opened = open_weights(weights, format)
    for assignment in overrides:  # --set changes the weights' recipe, as for reconstruct
        apply_override(opened.tree, assignment)
    data_ref, plugins = None, []
    if from_recipe:
        recipe = read_recipe_tree(data)
        data_ref = (recipe.get("data") or {}).get(split)
        if not isinstance(data_ref, dict):
            raise MaeframeError(f"{data}: has no data.{split} section")
        plugins = list(recipe.get("plugins") or [])
    prepared = prepare_tree(opened, knn_tree(opened, data_ref, plugins, pool, device, batch_size, num_workers))
    runtime = select_runtime(prepared.recipe.runtime)
    world = init_world(runtime.device.type)
    if world.distributed and runtime.device.type == "cuda":
        runtime = select_runtime(prepared.recipe.runtime, world.local_rank)
    dataset, data_facts = open_data(prepared, data, from_recipe, split)
    if opened.task in DOWNSTREAM:  # a trained classifier: what its head sees
        encode = downstream_features(opened, runtime.device, pool)
    else:
        encoder = build_encoder(prepared, runtime.device)
        encode = None
    stat = os.stat(opened.path / ".metadata" if opened.path.is_dir() else opened.path)
    stamp = fingerprint({"weights": str(opened.path.resolve()), "size": stat.st_size, "mtime": stat.st_mtime_ns,
                         "format": opened.format, "data": data_facts, "pool": pool, "chunk_size": chunk_size,
                         "rows": len(dataset), "overrides": list(overrides), "precision": runtime.precision})
    count = len(dataset)
    if count == 0 or dataset.views > 1:
        raise MaeframeError(f"{data}: {'holds no sample' if count == 0 else f'gives {dataset.views} test views per sample'}"
                            f"; embed takes one feature per sample (set test_clips / test_crops to 1)")
    chunks = -(-count // chunk_size)
    bar = tqdm(total=count, unit="sample", desc="embed", disable=not (progress and world.is_main))
    for index in range(world.rank, chunks, world.world_size):
        rows = range(index * chunk_size, min((index + 1) * chunk_size, count))
        if not chunk_done(out, index, stamp, len(rows)):
            chunk = Subset(dataset, rows)
            if encode is None:
                ((features, labels),) = knn_features(encoder, prepared.components.tokenizer, [chunk], runtime.device,
                                                     runtime.autocast, pool, batch_size, num_workers, World())
            else:
                with runtime.autocast():
                    features, labels = map_dataset(encode, chunk, World(), batch_size, num_workers)
            write_chunk(out, index, features, labels, [dataset.describe(i) for i in rows], stamp)
        bar.update(len(rows) * world.world_size)
    bar.close()
    barrier(world)
    if world.is_main:
        assemble(out, chunks, {"fingerprint": stamp, "pool": pool, "weights": str(opened.path),
                               "format": opened.format})
    barrier(world)
    if world.distributed:
        shutdown_world(world)
    return out

