"""End-to-end fine-tuning (MAE's protocol): pretrained encoder + avg pooling + LayerNorm + linear head,
AdamW with layer-wise lr decay, warmup + cosine, drop path, RandAugment, random erasing, mixup/cutmix with
label smoothing, optional EMA, evaluation (top-1/top-5, or mAP for multi-hot labels) after every epoch,
best/last checkpoints and exact resume. `LinearProbe` (linprobe.py) reuses this loop with a frozen encoder
and LARS. Modality specifics stay in the dataset plugins: a training set may apply RandAugment / erasing
itself (`use_finetune_augment`, video clips), an eval set may return several test views per sample
(`views`, averaged by `predict`), and `BatchMixup` mixes inputs of any rank (one cutmix box per clip).

The data order, per-sample augmentation and checkpoint format are those of pretraining
(`ResumableBatchSampler`, `SeededDataset`, `atomic_save`); a resumed run continues bit for bit.
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import timm
import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay
from timm.utils import ModelEmaV3
from torch import nn
from tqdm import tqdm

from .. import __version__
from ..build import Prepared, build_dataset
from ..model.mae import count_parameters
from ..recipe import dump_recipe
from .augment import BatchMixup, FinetuneAugment
from .checkpoint import FORMAT, atomic_save, load_checkpoint
from .data import ResumableBatchSampler, make_loader
from .downstream import (dataset_classes, dataset_views, encoder_layout, load_encoder, predict,
                         pretrained_encoder_state, train_set_without_device_transform)
from .heads import Classifier
from .loop import Preempted, PreemptionSignals, SampleCount
from .metrics import classification_metrics, format_results, write_results
from .optim import build_schedule, peak_lr
from .rundir import MetricsLog, RunDirectory
from .runtime import compile_static, rng_state, seed_everything, select_runtime, set_rng_state
from .window import LogWindow, device_name


class FineTuner:
    """Builds a fine-tuning run from a prepared `task: finetune` recipe; `train()` runs it and returns the
    results written to `<output_dir>/<name>/results.json`."""

    bn_head = False        # LinearProbe: BatchNorm1d(affine=False) before the linear layer
    default_head_std = 2e-5

    def __init__(self, prepared: Prepared, resume: bool = False):
        self.prepared = prepared
        self.recipe = recipe = prepared.recipe
        self.hook = prepared.pm.hook
        self.tokenizer = prepared.components.tokenizer
        self.runtime = select_runtime(recipe.runtime)
        self.device = self.runtime.device
        seed_everything(recipe.seed)

        self.train_set = self.build_train_set()
        self.eval_set = build_dataset(prepared, "eval")
        self.classes = dataset_classes(recipe.head, self.train_set)
        self.multi_label = recipe.head.multi_label
        data, optim = recipe.data, recipe.optim
        self.sampler = ResumableBatchSampler(len(self.train_set), data.batch_size, recipe.seed,
                                             batches_multiple=optim.accum_steps)
        self.loader = make_loader(self.train_set, data, self.sampler, pin_memory=self.device.type == "cuda")
        self.steps_per_epoch = self.sampler.batches_per_epoch // optim.accum_steps
        self.total_steps = optim.epochs * self.steps_per_epoch
        self.world_size = 1
        self.effective_batch = data.batch_size * optim.accum_steps * self.world_size
        self.lr = peak_lr(optim, self.effective_batch)

        self.model = self.build_model().to(self.device)
        self.step_model = compile_static(self.model, recipe.runtime.compile_mode) if recipe.runtime.compile else self.model
        self.optimizer = self.build_optimizer()
        self.schedule = build_schedule(self.optimizer, optim, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.runtime.uses_scaler)
        self.mixup, self.criterion = self.build_criterion()
        ema = getattr(recipe, "ema", None)
        self.ema = ModelEmaV3(self.model, decay=ema.decay) if ema is not None else None
        self.step = 0
        self.samples = SampleCount(data.max_bad_fraction)
        self.signals = PreemptionSignals()
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self._last_eval: tuple[int, torch.Tensor, torch.Tensor] | None = None

        self.run_dir = RunDirectory(Path(recipe.runtime.output_dir) / recipe.name, resume)
        if resume:
            self._restore(load_checkpoint(self.run_dir.last))  # onto the CPU: RNG states must stay there

    # --- construction (LinearProbe overrides these) ----------------------------------------------------

    def build_train_set(self):
        """The training dataset with RandAugment / random erasing: a dataset that has its own
        `use_finetune_augment(rand_augment, random_erasing)` (video clips: the same ops on every frame)
        applies them itself; any other is wrapped in the image `FinetuneAugment`."""
        dataset = train_set_without_device_transform(self.prepared)
        augment = self.recipe.augment
        if not (augment.rand_augment or augment.random_erasing > 0):
            return dataset
        own = getattr(dataset, "use_finetune_augment", None)
        if own is not None:
            own(augment.rand_augment, augment.random_erasing)
            return dataset
        return FinetuneAugment(dataset, augment)

    def build_model(self) -> Classifier:
        recipe = self.recipe
        head = recipe.head
        model = Classifier(self.tokenizer.spec, recipe.model, len(self.classes), head.pool, bn_head=self.bn_head,
                           features=head.features, layout=encoder_layout(recipe.init))
        model.reset_parameters(head.init_std or self.default_head_std)
        self.unused_keys: list[str] = []
        if recipe.init.format != "none" and model.encoder is not None:
            weights = pretrained_encoder_state(recipe.init, self.tokenizer.spec, recipe.model,
                                               recipe.tokenizer.options)
            self.unused_keys = load_encoder(model, weights, recipe.init.checkpoint)
        return model

    def build_optimizer(self) -> torch.optim.Optimizer:
        """AdamW over layer-decayed groups: lr_scale = layer_decay^(depth + 1 - layer id); no weight decay on
        biases, norms and the cls token."""
        optim = self.recipe.optim
        groups = param_groups_layer_decay(self.model, optim.weight_decay, no_weight_decay_list=["encoder.cls_token"],
                                          layer_decay=optim.layer_decay)
        return torch.optim.AdamW(groups, lr=self.lr, betas=optim.betas, fused=self.device.type == "cuda")

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

    # --- one step ------------------------------------------------------------------------------------

    def _optimizer_step(self, micro_batches: list) -> dict[str, torch.Tensor]:
        self.schedule.step_update(self.step)
        accum = len(micro_batches)
        total = torch.zeros((), device=self.device)
        for images, labels in micro_batches:
            images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            targets = labels.float() if self.multi_label else labels
            if self.mixup is not None:
                images, targets = self.mixup(images, targets)
            if self.recipe.runtime.cuda_graphs:  # the previous micro-batch's graph outputs are no longer needed
                torch.compiler.cudagraph_mark_step_begin()
            with self.runtime.autocast():
                logits = self.step_model(self.tokenizer.tokenize(images).patches)
            loss = self.criterion(logits.float(), targets)
            self.scaler.scale(loss / accum).backward()
            total += loss.detach() / accum
        sums = {"loss": total}
        if self.recipe.optim.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            sums["grad_norm"] = nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.optim.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)
        return sums

    # --- the loop ------------------------------------------------------------------------------------

    def _next(self, batches) -> tuple:
        """The next micro-batch (images, labels); counts unreadable samples the loader skipped and stops
        above data.max_bad_fraction."""
        images, labels, failed = next(batches)
        self.samples.add(len(images), failed)
        return images, labels

    def train(self) -> dict[str, Any]:
        recipe = self.recipe
        max_steps = recipe.runtime.max_steps
        stop_at = min(self.total_steps, max_steps) if max_steps else self.total_steps
        self._write_run_files()
        log = MetricsLog(self.run_dir.path, recipe.runtime.tensorboard, resume_step=self.step)
        self.hook.on_train_start(run=self)
        bar = tqdm(total=stop_at, initial=self.step, disable=not recipe.runtime.progress_bar, unit="step",
                   dynamic_ncols=True, mininterval=1.0)
        last: dict[str, float] = {}
        window = LogWindow()
        accum = recipe.optim.accum_steps
        self.signals.install()
        try:
            while self.step < stop_at:
                epoch = self.step // self.steps_per_epoch
                self.sampler.start(epoch, (self.step % self.steps_per_epoch) * accum)
                batches = iter(self.loader)
                epoch_end = min((epoch + 1) * self.steps_per_epoch, stop_at)
                while self.step < epoch_end:
                    waited = time.perf_counter()
                    micro = [self._next(batches) for _ in range(accum)]
                    window.data_wait += time.perf_counter() - waited
                    window.add(self._optimizer_step(micro))
                    self.step += 1
                    bar.update(1)
                    if self.step % recipe.runtime.log_interval == 0 or self.step == stop_at:
                        last = self._log(window.flush(self.effective_batch), log, bar)
                    if self.signals.received is not None:
                        self.save(self.run_dir.last)
                        raise Preempted(self.signals.received, self.step, self.run_dir.last)
                del batches
                if self.step % self.steps_per_epoch == 0:
                    self._end_epoch(self.step // self.steps_per_epoch, log)
            if not self.run_dir.last.is_file() or self.step % self.steps_per_epoch:
                self.save(self.run_dir.last)
            results = self.results()
        finally:
            self.signals.restore()
            bar.close()
            log.close()
        self.hook.on_train_end(run=self, metrics=last)
        print(format_results(results))
        return results

    def _log(self, metrics: dict[str, float], log: MetricsLog, bar: tqdm) -> dict[str, float]:
        metrics["lr"] = max(group["lr"] for group in self.optimizer.param_groups)
        metrics["epoch"] = round(self.step / self.steps_per_epoch, 4)
        metrics["bad_samples"] = self.samples.bad
        if self.device.type == "cuda":
            metrics["max_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        log.write(self.step, metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}", refresh=False)
        self.hook.log_metrics(step=self.step, metrics=metrics)
        return metrics

    def evaluate(self, model: nn.Module | None = None) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
        """Headline metrics of `model` (default: the trained model) on the eval set, plus (scores, labels)."""
        scores, labels = predict(model or self.model, self.tokenizer, self.eval_set, self.device,
                                 self.recipe.data.batch_size, self.runtime.autocast, multi_label=self.multi_label)
        metrics = classification_metrics(scores, labels, self.classes, self.multi_label)
        if not self.multi_label:
            metrics["loss"] = nn.functional.cross_entropy(scores, labels).item()
        return metrics, scores, labels

    @property
    def headline(self) -> str:
        return "mAP" if self.multi_label else "top1"

    def _end_epoch(self, epochs_done: int, log: MetricsLog) -> None:
        metrics, scores, labels = self.evaluate()
        self._last_eval = (self.step, scores, labels)
        record = {"epoch": epochs_done, "step": self.step, **metrics}
        if self.ema is not None:
            ema_metrics, _, _ = self.evaluate(self.ema.module)
            record.update({f"ema_{k}": v for k, v in ema_metrics.items()})
        self.history.append(record)
        log.write(self.step, {f"eval/{k}": v for k, v in record.items() if k not in ("epoch", "step")})
        improved = self.best is None or metrics[self.headline] > self.best["value"]
        if improved:
            self.best = {"epoch": epochs_done, "step": self.step, "metric": self.headline,
                         "value": metrics[self.headline]}
        self.save(self.run_dir.last)
        if improved:
            self.save(self.run_dir.path / "best.pt")
        runtime = self.recipe.runtime
        if epochs_done % runtime.checkpoint_interval == 0 and epochs_done != self.recipe.optim.epochs:
            self.save(self.run_dir.periodic(epochs_done))
        tqdm.write(f"epoch {epochs_done}: " + ", ".join(f"{k} {v:.4g}" for k, v in record.items()
                                                        if k not in ("epoch", "step")))
        self.hook.on_epoch_end(run=self, epoch=epochs_done, metrics=record)

    def results(self) -> dict[str, Any]:
        """Final evaluation with per-class accuracy and confusion matrix; writes results.json + PNG."""
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
            "epochs": round(self.step / self.steps_per_epoch, 4),
            "dataset": {"train": len(self.train_set), "eval": len(self.eval_set), "num_classes": len(self.classes)},
            "eval_views": self.eval_views(), "final": final, "best": self.best, "history": self.history,
        }
        if self.ema is not None:
            ema_scores, ema_labels = predict(self.ema.module, self.tokenizer, self.eval_set, self.device,
                                             recipe.data.batch_size, self.runtime.autocast,
                                             multi_label=self.multi_label)
            results["ema"] = classification_metrics(ema_scores, ema_labels, self.classes, self.multi_label)
        results["path"] = str(write_results(self.run_dir.path, results, self.classes))
        return results

    def eval_views(self) -> dict[str, Any]:
        """The test views averaged per eval sample: their count and the dataset's own description
        (`view_layout`, e.g. {"clips": 5, "crops": 3})."""
        return {"views": dataset_views(self.eval_set), **dict(getattr(self.eval_set, "view_layout", {}))}

    # --- state -----------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "format": FORMAT,
            "task": self.recipe.task,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "rng": rng_state(),
            "samples": self.samples.state_dict(),
            "history": self.history,
            "best": self.best,
            "classes": self.classes,
            "recipe": self.recipe.model_dump(mode="json"),
        }

    def save(self, path: Path) -> None:
        atomic_save(self.state_dict(), path)

    def _restore(self, state: dict) -> None:
        if state.get("task") != self.recipe.task:
            raise ValueError(f"{self.run_dir.last} is a {state.get('task', 'pretrain')} checkpoint, "
                             f"not {self.recipe.task}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.module.load_state_dict(state["ema"])
        self.step = state["step"]
        self.history, self.best = state["history"], state["best"]
        self.samples.load_state_dict(state.get("samples"))
        set_rng_state(state["rng"])

    def _write_run_files(self) -> None:
        self.run_dir.write_text("recipe.yaml", dump_recipe(self.recipe))
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        facts = {
            "maeframe": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version(), "device": device_name(self.device),
            "precision": self.runtime.precision, "task": self.recipe.task, "world_size": self.world_size,
            "effective_batch": self.effective_batch, "peak_lr": self.lr, "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps, "dataset_size": {"train": len(self.train_set), "eval": len(self.eval_set)},
            "num_classes": len(self.classes), "params": {"total": count_parameters(self.model), "trainable": trainable},
            "init_unused_keys": self.unused_keys,
        }
        self.run_dir.write_text("run.json", json.dumps(facts, indent=2) + "\n")
