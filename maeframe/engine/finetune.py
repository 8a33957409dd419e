"""End-to-end fine-tuning (MAE's protocol) on the shared loop: pretrained encoder + avg pooling + LayerNorm +
linear head, AdamW with layer-wise lr decay, warmup + cosine, drop path, RandAugment, random erasing,
mixup/cutmix with label smoothing, optional EMA, evaluation (top-1/top-5, or mAP for multi-hot labels) after
every epoch, best/last checkpoints and exact resume. `LinearProbe` (linprobe.py) changes the head, the
optimizer and the augmentation. Modality specifics stay in the dataset plugins: a training set may apply
RandAugment / erasing itself (`use_finetune_augment`, video clips), an eval set may return several test
views per sample (`views`, averaged by `predict`), and `BatchMixup` mixes inputs of any rank.

Under torchrun the same global batch on N processes follows one process: per-sample augmentation is seeded
by (seed, epoch, position), mixup/cutmix draws by (seed, step, micro-batch) with each sample mixed with its
partner in the reversed *global* batch (one exchange between mirror ranks), drop path per global sample, and
evaluation is sharded over the ranks and gathered (every sample counted once).
"""
from __future__ import annotations

from typing import Any

import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay
from timm.utils import ModelEmaV3
from torch import Tensor, nn
from tqdm import tqdm

from ..build import build_dataset
from ..errors import RecipeError
from ..model.mae import count_parameters
from .augment import BatchMixup
from .data import MIXUP_STREAM, stream_seed
from .distributed import mirrored_rows
from ..interop.encoder_weights import encoder_layout, load_encoder, pretrained_encoder_state
from .downstream import (dataset_classes, dataset_views, eval_label_map, predict, relabel,
                         train_set_without_device_transform)
from ..model.classifier import Classifier
from .loop import Trainer
from .metrics import classification_metrics, format_results, write_results
from .rundir import MetricsLog
from .step import OptimizerStep


class ClassifierStep(OptimizerStep):
    """(images, labels) -> [mixup/cutmix] -> tokenizer -> classifier -> criterion; EMA after each update."""

    def __init__(self, model: Classifier, trainer: FineTuner, criterion: nn.Module, mixup: BatchMixup | None,
                 ema_decay: float | None):
        super().__init__(model, trainer.prepared, trainer.runtime, trainer.world, trainer.lr,
                         trainer.steps_per_epoch, trainer.build_optimizer)
        self.tokenizer = trainer.prepared.components.tokenizer
        self.criterion, self.mixup, self.multi_label = criterion, mixup, trainer.multi_label
        self.ema = ModelEmaV3(self.model, decay=ema_decay) if ema_decay is not None else None

    def losses(self, images: Tensor, labels: Tensor, step: int, micro: int):
        targets = labels.float() if self.multi_label else labels
        if self.mixup is not None:
            partner = mirrored_rows(images, self.world), mirrored_rows(targets, self.world)
            images, targets = self.mixup(images, targets, stream_seed(self.seed, step, micro, MIXUP_STREAM), partner)
        with self.model_rng(step, micro), self.runtime.autocast():
            logits = self.step_model(self.tokenizer.tokenize(images).patches)
        return self.criterion(logits.float(), targets), {}

    def end(self, step: int) -> None:
        if self.ema is not None:
            self.ema.update(self.model, step=step)


class FineTuner(Trainer):
    """A `task: finetune` run; `train()` returns the results written to `<output_dir>/<name>/results.json`."""

    bn_head = False        # LinearProbe: a BatchNorm1d(affine=False) over the global batch before the linear layer
    default_head_std = 2e-5

    # --- construction (LinearProbe overrides some) -------------------------------------------------------

    def build_train_set(self):
        """The training dataset, asked to add RandAugment / random erasing to its per-sample pipeline
        (`Dataset.use_finetune_augment`: images after the crop, clips with the same ops on every frame)."""
        dataset = train_set_without_device_transform(self.prepared)
        augment = self.recipe.augment
        if augment.rand_augment or augment.random_erasing > 0:
            try:
                dataset.use_finetune_augment(augment.rand_augment, augment.random_erasing)
            except ValueError as err:
                raise RecipeError([("augment.rand_augment", str(err))]) from None
        return dataset

    def setup(self) -> None:
        self.tokenizer = self.prepared.components.tokenizer
        self.train_set = self.dataset
        self.eval_set = build_dataset(self.prepared, "eval")
        self.classes = dataset_classes(self.recipe.head, self.train_set)
        self.eval_labels = eval_label_map(self.train_set, self.eval_set)
        self.multi_label = self.recipe.head.multi_label
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self._last_eval: tuple[int, Tensor, Tensor] | None = None

    def build_step(self) -> ClassifierStep:
        model = self.build_model()
        self.mixup, self.criterion = self.build_criterion()
        ema = getattr(self.recipe, "ema", None)
        step = ClassifierStep(model, self, self.criterion, self.mixup, ema.decay if ema is not None else None)
        self.ema = step.ema
        return step

    def build_model(self) -> Classifier:
        recipe = self.recipe
        head, fmt = recipe.head, self.prepared.components.weight_format
        model = Classifier(self.tokenizer.spec, recipe.model, len(self.classes), head.pool, bn_head=self.bn_head,
                           features=head.features, layout=encoder_layout(fmt))
        model.reset_parameters(head.init_std or self.default_head_std)
        self.unused_keys: list[str] = []
        if fmt is not None and model.encoder is not None:
            weights = pretrained_encoder_state(fmt, recipe.init, self.tokenizer.spec, recipe.model,
                                               recipe.tokenizer.options, recipe.tokenizer.name)
            self.unused_keys = load_encoder(model, weights, recipe.init.checkpoint)
        return model

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """AdamW over layer-decayed groups: lr_scale = layer_decay^(depth + 1 - layer id); no weight decay on
        biases, norms and the cls token. Fused: a non-finite step is skipped on the device."""
        optim = self.recipe.optim
        groups = param_groups_layer_decay(model, optim.weight_decay, no_weight_decay_list=["encoder.cls_token"],
                                          layer_decay=optim.layer_decay)
        return torch.optim.AdamW(groups, lr=self.lr, betas=optim.betas, fused=True)

    def build_criterion(self) -> tuple[BatchMixup | None, nn.Module]:
        """Single-label: soft-target cross-entropy after mixup/cutmix, else (smoothed) cross-entropy.
        Multi-label: BCE on the multi-hot targets, mixed (and smoothed) by `BatchMixup` when mixing."""
        augment = self.recipe.augment
        mixup = None
        if augment.mixes:
            mixup = BatchMixup(mixup_alpha=augment.mixup, cutmix_alpha=augment.cutmix, prob=augment.mixup_prob,
                               switch_prob=augment.mixup_switch_prob, label_smoothing=augment.label_smoothing,
                               num_classes=len(self.classes), multi_label=self.multi_label)
        if self.multi_label:
            return mixup, nn.BCEWithLogitsLoss()
        if mixup is not None:
            return mixup, SoftTargetCrossEntropy()
        if augment.label_smoothing > 0:
            return None, LabelSmoothingCrossEntropy(augment.label_smoothing)
        return None, nn.CrossEntropyLoss()

    # --- evaluation ----------------------------------------------------------------------------------------

    def evaluate(self, model: nn.Module | None = None) -> tuple[dict[str, Any], Tensor, Tensor]:
        """Headline metrics of `model` (default: the trained model) on the whole eval set, plus (scores,
        labels); each rank scores its share, every rank gets all of them."""
        scores, labels = predict(model or self.model, self.tokenizer, self.eval_set, self.device,
                                 self.recipe.data.batch_size, self.runtime.autocast, multi_label=self.multi_label,
                                 world=self.world)
        labels = relabel(labels, self.eval_labels, len(self.classes))
        metrics = classification_metrics(scores, labels, self.classes, self.multi_label)
        if not self.multi_label:
            metrics["loss"] = nn.functional.cross_entropy(scores, labels).item()
        return metrics, scores, labels

    @property
    def headline(self) -> str:
        return "mAP" if self.multi_label else "top1"

    def end_epoch(self, epochs_done: int, final: bool, metrics: dict[str, float], log: MetricsLog | None):
        metrics, scores, labels = self.evaluate()
        self._last_eval = (self.step, scores, labels)
        record = {"epoch": epochs_done, "step": self.step, **metrics}
        if self.ema is not None:
            ema_metrics, _, _ = self.evaluate(self.ema.module)
            record.update({f"ema_{k}": v for k, v in ema_metrics.items()})
        self.history.append(record)
        improved = self.best is None or metrics[self.headline] > self.best["value"]
        if improved:
            self.best = {"epoch": epochs_done, "step": self.step, "metric": self.headline,
                         "value": metrics[self.headline]}
        if log is not None:
            log.write(self.step, {f"eval/{k}": v for k, v in record.items() if k not in ("epoch", "step")})
            tqdm.write(f"epoch {epochs_done}: " + ", ".join(f"{k} {v:.4g}" for k, v in record.items()
                                                            if k not in ("epoch", "step")))
        return record, improved

    def finish(self, metrics: dict[str, float]) -> dict[str, Any]:
        """Final evaluation with per-class accuracy and confusion matrix; rank 0 writes results.json + PNG."""
        if self._last_eval is not None and self._last_eval[0] == self.step:
            _, scores, labels = self._last_eval
        else:
            _, scores, labels = self.evaluate()
        final = classification_metrics(scores, labels, self.classes, self.multi_label, details=True)
        if not self.multi_label:
            final["loss"] = nn.functional.cross_entropy(scores, labels).item()
        recipe = self.recipe
        results: dict[str, Any] = {
            "task": recipe.task, "name": recipe.name, "seed": recipe.seed,
            "init": recipe.init.model_dump(mode="json"), "pool": recipe.head.pool, "features": recipe.head.features,
            "complete": self.step == self.total_steps, "step": self.step,
            "epochs": round(self.step / self.steps_per_epoch, 4), "world_size": self.world_size,
            "dataset": {"train": len(self.train_set), "eval": len(self.eval_set), "num_classes": len(self.classes)},
            "eval_views": self.eval_views(), "final": final, "best": self.best, "history": self.history,
        }
        if self.ema is not None:
            results["ema"], _, _ = self.evaluate(self.ema.module)
            results["ema"].pop("loss", None)
        if self.world.is_main:
            results["path"] = str(write_results(self.run_dir.path, results, self.classes))
            print(format_results(results))
        return results

    def eval_views(self) -> dict[str, Any]:
        """The test views averaged per eval sample: their count and the dataset's own description
        (`view_layout`, e.g. {"clips": 5, "crops": 3})."""
        return {"views": dataset_views(self.eval_set), **self.eval_set.view_layout}

    # --- state ---------------------------------------------------------------------------------------------

    def extra_state(self) -> dict[str, Any]:
        return {"ema": self.ema.module.state_dict() if self.ema is not None else None,
                "history": self.history, "best": self.best, "classes": self.classes}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if self.ema is not None:
            self.ema.module.load_state_dict(state["ema"])
        self.history, self.best = state["history"], state["best"]

    def run_facts(self) -> dict[str, Any]:
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return {"dataset_size": {"train": len(self.train_set), "eval": len(self.eval_set)},
                "num_classes": len(self.classes), "init_unused_keys": self.unused_keys,
                "params": {"total": count_parameters(self.model), "trainable": trainable}}
