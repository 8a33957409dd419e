"""The k-NN protocol: features of the training set (without augmentation) and of the eval set from the
frozen encoder, then cosine-similarity k-NN with exp(s / T)-weighted votes (k = 20, T = 0.07), top-1/top-5,
per-class accuracy and the confusion matrix. Nothing is trained; the run writes results.json. Under
torchrun every rank encodes its share of the bank and the queries and gathers the rest, so a large bank is
not encoded on rank 0 alone and the result equals one process's."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..build import Prepared, build_dataset
from ..errors import MaeframeError
from ..interop.encoder_weights import encoder_layout, load_encoder, pretrained_encoder_state
from ..model.classifier import Classifier
from ..model.vit import Encoder
from ..recipe import dump_recipe
from .distributed import barrier, map_dataset, shutdown_world
from .downstream import dataset_classes, dataset_views, eval_label_map, relabel
from .knn import knn_features, knn_scores
from .metrics import classification_metrics, format_results, write_results
from .rundir import RunDirectory
from .runtime import start_process
from .window import device_name


def build_encoder(prepared: Prepared, device: torch.device) -> Encoder:
    """The recipe's encoder (with its final norm), initialised as pretraining does and loaded from `init`
    unless that is none; frozen, in eval mode."""
    recipe, fmt = prepared.recipe, prepared.components.weight_format
    spec = prepared.components.tokenizer.spec
    if not encoder_layout(fmt).cls_token:
        raise MaeframeError(f"init.format: k-NN reads the encoder's cls-token layout; {recipe.init.format} weights "
                            f"have no cls token (finetune and linprobe recipes use them)")
    holder = Classifier(spec, recipe.model, num_classes=1, pool="cls")  # cls keeps the encoder's final norm
    holder.reset_parameters(head_std=0.01)
    if fmt is not None:
        weights = pretrained_encoder_state(fmt, recipe.init, spec, recipe.model, recipe.tokenizer.options,
                                           recipe.tokenizer.name)
        load_encoder(holder, weights, recipe.init.checkpoint)
    return holder.encoder.to(device).eval().requires_grad_(False)


class KnnTask:
    """A `task: knn` run. `train()` (the dispatcher's verb; nothing is trained) extracts the bank's and the
    queries' features, each rank its share (gathered on every rank), votes, and rank 0 writes results.json.
    The run directory is guarded as every task's is: an existing run is never overwritten."""

    def __init__(self, prepared: Prepared, resume: bool | str = False):
        if resume is True:
            raise MaeframeError("--resume: a knn run trains nothing; run it again under another name")
        self.prepared, self.recipe = prepared, prepared.recipe
        recipe = prepared.recipe
        self.world, self.runtime = start_process(recipe.runtime, recipe.seed)
        self.bank_set = build_dataset(prepared, "train", augment=False)
        self.eval_set = build_dataset(prepared, "eval")
        if dataset_views(self.eval_set) > 1:
            raise MaeframeError(f"data.eval: k-NN compares one feature per sample; the eval set gives "
                                f"{dataset_views(self.eval_set)} views per sample (set its test_clips and "
                                f"test_crops to 1)")
        self.encoder = build_encoder(prepared, self.runtime.device) if recipe.knn.features == "encoder" else None
        # checked and created only once everything is built
        self.run_dir = RunDirectory(Path(recipe.runtime.output_dir) / recipe.name, resume, self.world.is_main)
        barrier(self.world)

    def features(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(bank features, labels), (query features, labels)], all rows on every rank."""
        recipe, runtime = self.prepared.recipe, self.runtime
        datasets = [self.bank_set, self.eval_set]
        if self.encoder is None:  # the raw-pixel baseline: each normalised input flattened
            flat = lambda batch: batch.flatten(1).float()  # noqa: E731
            return [map_dataset(flat, dataset, self.world, recipe.data.batch_size, recipe.data.num_workers)
                    for dataset in datasets]
        return knn_features(self.encoder, self.prepared.components.tokenizer, datasets, runtime.device,
                            runtime.autocast, recipe.knn.pool, recipe.data.batch_size, recipe.data.num_workers,
                            self.world)

    def train(self) -> dict[str, Any]:
        recipe, knn = self.prepared.recipe, self.prepared.recipe.knn
        if self.world.is_main:
            self.run_dir.write_text("recipe.yaml", dump_recipe(recipe))
        start = time.perf_counter()
        (bank, bank_labels), (queries, labels) = self.features()
        classes = dataset_classes(None, self.bank_set, torch.cat([bank_labels, labels]))
        labels = relabel(labels, eval_label_map(self.bank_set, self.eval_set), len(classes))
        scores = knn_scores(bank.float(), bank_labels, queries.float(), knn.k, knn.temperature, len(classes))
        final = classification_metrics(scores, labels, classes, details=True)
        results: dict[str, Any] = {
            "task": "knn", "name": recipe.name, "seed": recipe.seed, "init": recipe.init.model_dump(mode="json"),
            "pool": knn.pool, "features": knn.features, "k": knn.k, "temperature": knn.temperature,
            "complete": True, "world_size": self.world.world_size,
            "dataset": {"train": len(self.bank_set), "eval": len(self.eval_set), "num_classes": len(classes)},
            "feature_dim": bank.shape[1], "seconds": round(time.perf_counter() - start, 2), "final": final,
            "maeframe": __version__, "device": device_name(self.runtime.device),
        }
        if self.world.is_main:
            results["path"] = str(write_results(self.run_dir.path, results, classes))
            print(format_results(results))
        barrier(self.world)
        shutdown_world(self.world)
        return results
