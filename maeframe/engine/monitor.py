"""The online k-NN monitor of a pretraining run (recipe block `monitor`): every `knn_every_epochs` epochs,
and at the last one, the encoder's features of a fixed labelled subset are classified exactly as the `knn`
task does (`knn.knn_features`, then `knn.knn_scores`: cosine, k neighbours, exp(s / T) votes), giving
`monitor/knn_top1` and `monitor/knn_top5` (percent) while the run trains.

Bank: `bank` training images without augmentation; queries: `queries` images of `data.eval`, or without
one, training images outside the bank (the bank then leaves at least a fifth of a small training set to them). Both are drawn once from a generator seeded with the recipe's seed,
so every evaluation of a run (and of its resumed continuation) uses the same images. All tokens are
visible, the encoder is in eval mode under the run's autocast, and the global RNG state is restored after
building and after each evaluation: a run's training trajectory is the same with the monitor on or off.
"""
from __future__ import annotations

import contextlib
import time
from typing import Iterator

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from ..build import Prepared, build_dataset
from ..errors import MaeframeError
from ..recipe import MonitorConfig
from ..tokenizer import Tokenizer
from .distributed import World
from .downstream import dataset_classes, eval_label_map, relabel
from .knn import knn_features, knn_scores
from .metrics import topk_accuracy
from .runtime import rng_state, set_rng_state


@contextlib.contextmanager
def rng_isolated() -> Iterator[None]:
    """Whatever runs inside leaves the python, numpy, torch and CUDA global RNG states as it found them."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def _require_class_labels(dataset: Dataset, field: str) -> None:
    """The monitor needs single-label class indices; the first sample tells (unlabelled datasets give -1)."""
    label = dataset[0][1]
    if isinstance(label, Tensor) and label.numel() == 1:
        label = label.item()
    if isinstance(label, bool) or not isinstance(label, int) or label < 0:
        raise MaeframeError(f"monitor: {field} ({type(dataset).__name__}) yields no class labels (first sample's "
                            f"label is {label!r}); the k-NN monitor needs single-label class indices. Set "
                            f"`monitor: null` or use a labelled dataset")


def _subset(dataset: Dataset, order: Tensor, count: int | None) -> Subset:
    """The first `count` (all when None) indices of `order`, sorted so the loader reads in dataset order."""
    chosen = order if count is None else order[:count]
    return Subset(dataset, chosen.sort().values.tolist())


class KnnMonitor:
    """Built once per run on every process; `evaluate(encoder, tokenizer)` returns the metrics (each process
    encodes its share of the bank and queries; all get every feature)."""

    def __init__(self, prepared: Prepared, config: MonitorConfig, device: torch.device, autocast=contextlib.nullcontext,
                 world: World = World(), modality: str | None = None):
        """`modality`: a joint recipe's modality (alternate mixing), monitored on its own data."""
        self.config, self.device, self.autocast, self.world = config, device, autocast, world
        self.query_labels = None  # eval label -> training label, when the two sets number classes differently
        recipe = prepared.recipe
        data, field = (recipe.modalities[modality].data, f"modalities.{modality}.data") if modality else (recipe.data, "data")
        self.batch_size = config.batch_size or recipe.data.batch_size
        with rng_isolated():
            train_set = build_dataset(prepared, "train", augment=False, modality=modality)
            _require_class_labels(train_set, f"{field}.train")
            generator = torch.Generator().manual_seed(recipe.seed)
            order, total = torch.randperm(len(train_set), generator=generator), len(train_set)
            bank_count = min(config.bank or total, total)
            if data.eval is None:  # queries are other training images: keep room for them
                bank_count = min(bank_count, total - min(config.queries or total, max(total // 5, 1)))
                if bank_count < config.k:
                    raise MaeframeError(f"monitor: {field}.train has {total} images, too few for a bank of k="
                                        f"{config.k} images plus queries outside it; set {field}.eval or lower "
                                        f"monitor.k")
            self.bank = _subset(train_set, order, bank_count)
            if data.eval is not None:
                eval_set = build_dataset(prepared, "eval", modality=modality)
                _require_class_labels(eval_set, f"{field}.eval")
                self.queries = _subset(eval_set, torch.randperm(len(eval_set), generator=generator), config.queries)
                self.query_labels = eval_label_map(train_set, eval_set)
            else:
                self.queries = _subset(train_set, order[bank_count:], config.queries)

    @torch.no_grad()
    def evaluate(self, encoder: torch.nn.Module, tokenizer: Tokenizer) -> dict[str, float]:
        """{"monitor/knn_top1", "monitor/knn_top5" (percent; top5 only with 5+ classes), "monitor/bank",
        "monitor/queries", "monitor/seconds"} of `encoder` (restored to its train/eval mode afterwards)."""
        started = time.perf_counter()
        with rng_isolated():
            (bank, bank_labels), (queries, labels) = knn_features(
                encoder, tokenizer, [self.bank, self.queries], self.device, self.autocast, self.config.pool,
                self.batch_size, self.config.num_workers, self.world)
        classes = dataset_classes(None, self.bank.dataset, torch.cat([bank_labels, labels]))
        labels = relabel(labels, self.query_labels, len(classes))
        scores = knn_scores(bank, bank_labels, queries, self.config.k, self.config.temperature, len(classes))
        accuracy = {f"monitor/knn_{key}": value for key, value in topk_accuracy(scores, labels).items()}
        return {**accuracy, "monitor/bank": len(self.bank), "monitor/queries": len(self.queries),
                "monitor/seconds": round(time.perf_counter() - started, 2)}


def describe(epochs_done: int, results: dict[str, float]) -> str:
    """The log line of one evaluation, e.g. "epoch 3: k-NN monitor top-1 71.20%, top-5 97.90% (...)"."""
    top5 = f", top-5 {results['monitor/knn_top5']:.2f}%" if "monitor/knn_top5" in results else ""
    return (f"epoch {epochs_done}: k-NN monitor top-1 {results['monitor/knn_top1']:.2f}%{top5} "
            f"({results['monitor/bank']} bank / {results['monitor/queries']} queries, {results['monitor/seconds']:.1f} s)")
