"""The k-NN protocol: features of the training set (without augmentation) and of the eval set from the
frozen encoder, then cosine-similarity k-NN with exp(s / T)-weighted votes (k = 20, T = 0.07), top-1/top-5,
per-class accuracy and the confusion matrix. Nothing is trained; the run writes results.json."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..build import Prepared, build_dataset
from ..model.vit import Encoder
from ..recipe import dump_recipe
from ..errors import MaeframeError
from .downstream import dataset_classes, dataset_views, load_encoder, pretrained_encoder_state
from .window import device_name
from .heads import Classifier
from .knn import knn_features, knn_scores
from .metrics import classification_metrics, format_results, write_results
from .runtime import seed_everything, select_runtime


@torch.no_grad()
def pixel_features(dataset, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw-pixel baseline: each normalised input flattened."""
    features, labels = [], []
    for batch, label in torch.utils.data.DataLoader(dataset, batch_size=batch_size, generator=torch.Generator()):
        features.append(batch.flatten(1).float())
        labels.append(torch.as_tensor(label))
    return torch.cat(features), torch.cat(labels)


def build_encoder(prepared: Prepared, device: torch.device) -> Encoder:
    """The recipe's encoder (with its final norm), initialised as pretraining does and loaded from `init`
    unless that is none; frozen, in eval mode."""
    recipe = prepared.recipe
    spec = prepared.components.tokenizer.spec
    if recipe.init.format == "official_videomae":
        raise MaeframeError("init.format: k-NN reads the encoder's cls-token layout; official VideoMAE weights "
                            "(no cls token) are supported by finetune and linprobe recipes")
    holder = Classifier(spec, recipe.model, num_classes=1, pool="cls")  # cls keeps the encoder's final norm
    holder.reset_parameters(head_std=0.01)
    if recipe.init.format != "none":
        weights = pretrained_encoder_state(recipe.init, spec, recipe.model, recipe.tokenizer.options)
        load_encoder(holder, weights, recipe.init.checkpoint)
    return holder.encoder.to(device).eval().requires_grad_(False)


def run_knn(prepared: Prepared) -> dict[str, Any]:
    recipe = prepared.recipe
    runtime = select_runtime(recipe.runtime)
    seed_everything(recipe.seed)
    bank_set = build_dataset(prepared, "train", augment=False)
    eval_set = build_dataset(prepared, "eval")
    if dataset_views(eval_set) > 1:
        raise MaeframeError(f"data.eval: k-NN compares one feature per sample; the eval set gives "
                            f"{dataset_views(eval_set)} views per sample (set its test_clips and test_crops to 1)")
    knn = recipe.knn
    encoder = build_encoder(prepared, runtime.device) if knn.features == "encoder" else None
    run_dir = Path(recipe.runtime.output_dir) / recipe.name  # written only once everything is built
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))
    start = time.perf_counter()
    if encoder is None:
        bank, bank_labels = pixel_features(bank_set, recipe.data.batch_size)
        queries, labels = pixel_features(eval_set, recipe.data.batch_size)
    else:
        (bank, bank_labels), (queries, labels) = knn_features(
            encoder, prepared.components.tokenizer, [bank_set, eval_set], runtime.device, runtime.autocast,
            knn.pool, recipe.data.batch_size, recipe.data.num_workers)
    classes = dataset_classes(None, bank_set, torch.cat([bank_labels, labels]))
    scores = knn_scores(bank.float(), bank_labels, queries.float(), knn.k, knn.temperature, len(classes))
    final = classification_metrics(scores, labels, classes, details=True)
    results: dict[str, Any] = {
        "task": "knn", "name": recipe.name, "seed": recipe.seed, "init": recipe.init.model_dump(mode="json"),
        "pool": knn.pool, "features": knn.features, "k": knn.k, "temperature": knn.temperature, "complete": True,
        "dataset": {"train": len(bank_set), "eval": len(eval_set), "num_classes": len(classes)},
        "feature_dim": bank.shape[1], "seconds": round(time.perf_counter() - start, 2), "final": final,
        "maeframe": __version__, "device": device_name(runtime.device),
    }
    results["path"] = str(write_results(run_dir, results, classes))
    print(format_results(results))
    return results
