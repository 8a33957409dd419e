"""The MAE pretraining engine: one optimizer step = tokenize -> mask -> target -> model -> losses."""
from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path

import timm
import torch
from tqdm import tqdm

from .. import __version__
from ..build import Prepared, build_dataset
from ..masker import Mask
from ..model import MaskedAutoencoder
from ..model.mae import count_parameters
from ..recipe import dump_recipe
from .checkpoint import FORMAT, atomic_save, load_checkpoint
from .data import ResumableBatchSampler, make_loader
from .optim import build_optimizer, build_schedule, peak_lr
from .rundir import MetricsLog, RunDirectory
from .runtime import rng_state, seed_everything, select_runtime, set_rng_state
from .visualize import reconstruction_panels


class Pretrainer:
    """Builds everything a pretraining run needs from a prepared recipe; `train()` runs it.

    Resuming (`resume=True`) restores model, optimizer, grad scaler, step counter, every RNG, component
    state and the data position from `<run>/last.pt`, so the run continues as if never stopped.
    """

    def __init__(self, prepared: Prepared, resume: bool = False):
        self.prepared = prepared
        self.recipe = recipe = prepared.recipe
        self.components = prepared.components
        self.hook = prepared.pm.hook
        self.runtime = select_runtime(recipe.runtime)
        self.device = self.runtime.device
        seed_everything(recipe.seed)

        self.dataset = build_dataset(prepared, "train")
        data, optim = recipe.data, recipe.optim
        self.sampler = ResumableBatchSampler(len(self.dataset), data.batch_size, recipe.seed,
                                             batches_multiple=optim.accum_steps)
        self.loader = make_loader(self.dataset, data, self.sampler, pin_memory=self.device.type == "cuda")
        self.steps_per_epoch = self.sampler.batches_per_epoch // optim.accum_steps
        self.total_steps = optim.epochs * self.steps_per_epoch
        self.world_size = 1
        self.effective_batch = data.batch_size * optim.accum_steps * self.world_size
        self.lr = peak_lr(optim, self.effective_batch)

        spec = self.components.tokenizer.spec
        self.model = MaskedAutoencoder(spec, self.components.target.out_dim, recipe.model).to(self.device)
        self.step_model = torch.compile(self.model) if recipe.runtime.compile else self.model
        for component in self.components.all():
            component.attach(self.model)
        self.optimizer = build_optimizer(self.model, optim, self.lr, self.device)
        self.schedule = build_schedule(self.optimizer, optim, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.runtime.uses_scaler)
        self.step = 0

        self.run_dir = RunDirectory(Path(recipe.runtime.output_dir) / recipe.name, resume)
        if resume:
            self._restore(load_checkpoint(self.run_dir.last, self.device))
        self._visual_data = None

    # --- one step ------------------------------------------------------------------------------------

    def predict(self, batch: torch.Tensor, mask: Mask | None = None):
        """batch [B, *input_shape] on device -> (tokens, mask, prediction); a new mask unless given."""
        tokens = self.components.tokenizer.tokenize(batch)
        mask = mask if mask is not None else self.components.masker(batch.shape[0], batch.device)
        with self.runtime.autocast():
            prediction = self.step_model(tokens.patches, mask)
        return tokens, mask, prediction

    def forward_losses(self, batch: torch.Tensor, mask: Mask | None = None):
        """batch [B, *input_shape] on device -> (total loss, {label: term}, tokens, mask, prediction)."""
        c = self.components
        tokens, mask, prediction = self.predict(batch, mask)
        with torch.no_grad(), self.runtime.autocast():
            target = c.target(tokens, mask)
        terms = {name: loss(prediction, target, mask) for name, _, loss in c.losses}
        total = sum(weight * terms[name] for name, weight, _ in c.losses)
        return total, terms, tokens, mask, prediction

    def _optimizer_step(self, micro_batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Accumulates gradients over the micro-batches and steps once. Returns detached sums on device."""
        self.schedule.step_update(self.step)
        for component in self.components.all():
            component.set_progress(self.step, self.step / self.steps_per_epoch)
        sums: dict[str, torch.Tensor] = {}
        accum = len(micro_batches)
        for batch in micro_batches:
            batch = batch.to(self.device, non_blocking=True)
            total, terms, *_ = self.forward_losses(batch)
            self.scaler.scale(total / accum).backward()
            for key, value in {"loss": total, **{f"loss/{k}": v for k, v in terms.items()}}.items():
                sums[key] = sums.get(key, 0) + value.detach() / accum
        if self.recipe.optim.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            sums["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.optim.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return sums

    # --- the loop ------------------------------------------------------------------------------------

    def train(self) -> dict[str, float]:
        recipe = self.recipe
        max_steps = recipe.runtime.max_steps
        stop_at = min(self.total_steps, max_steps) if max_steps else self.total_steps
        self._write_run_files()
        log = MetricsLog(self.run_dir.path, recipe.runtime.tensorboard)
        self.hook.on_train_start(run=self)
        bar = tqdm(total=stop_at, initial=self.step, disable=not recipe.runtime.progress_bar, unit="step",
                   dynamic_ncols=True, mininterval=1.0)
        last: dict[str, float] = {}
        window = _Window(self.step)
        accum = recipe.optim.accum_steps
        try:
            while self.step < stop_at:
                epoch = self.step // self.steps_per_epoch
                self.sampler.start(epoch, (self.step % self.steps_per_epoch) * accum)
                batches = iter(self.loader)
                epoch_end = min((epoch + 1) * self.steps_per_epoch, stop_at)
                while self.step < epoch_end:
                    waited = time.perf_counter()
                    micro = [next(batches)[0] for _ in range(accum)]
                    window.data_wait += time.perf_counter() - waited
                    window.add(self._optimizer_step(micro))
                    self.step += 1
                    bar.update(1)
                    if self.step % recipe.runtime.log_interval == 0 or self.step == stop_at:
                        last = self._log(window.flush(self.step, self.effective_batch), log, bar)
                del batches
                if self.step % self.steps_per_epoch == 0:
                    self._end_epoch(self.step // self.steps_per_epoch, last)
            if not self.run_dir.last.is_file() or self.step % self.steps_per_epoch:
                self.save(self.run_dir.last)
        finally:
            bar.close()
            log.close()
        self.hook.on_train_end(run=self, metrics=last)
        return last

    def _log(self, metrics: dict[str, float], log: MetricsLog, bar: tqdm) -> dict[str, float]:
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        for component in self.components.all():
            metrics.update({f"{component.kind}/{key}": value for key, value in component.metrics().items()})
        metrics["epoch"] = round(self.step / self.steps_per_epoch, 4)
        if self.device.type == "cuda":
            metrics["max_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        log.write(self.step, metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}", img_s=f"{metrics['img_s']:.0f}",
                        refresh=False)
        self.hook.log_metrics(step=self.step, metrics=metrics)
        return metrics

    def _end_epoch(self, epochs_done: int, metrics: dict[str, float]) -> None:
        runtime = self.recipe.runtime
        final = epochs_done == self.recipe.optim.epochs
        if epochs_done % runtime.visualize_interval == 0 or final:
            self.visualize(self.run_dir.path / "reconstructions" / f"epoch{epochs_done:04d}.png")
        self.save(self.run_dir.last)
        if epochs_done % runtime.checkpoint_interval == 0 or final:
            self.save(self.run_dir.periodic(epochs_done))
        self.hook.on_epoch_end(run=self, epoch=epochs_done, metrics=metrics)

    # --- state -----------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        c = self.components
        return {
            "format": FORMAT,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "components": {"masker": c.masker.state_dict(), "target": c.target.state_dict(),
                           **{f"loss.{i}": loss.state_dict() for i, (_, _, loss) in enumerate(c.losses)}},
            "recipe": self.recipe.model_dump(mode="json"),
        }

    def save(self, path: Path) -> None:
        atomic_save(self.state_dict(), path)

    def _restore(self, state: dict) -> None:
        c = self.components
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        c.masker.load_state_dict(state["components"]["masker"])
        c.target.load_state_dict(state["components"]["target"])
        for i, (_, _, loss) in enumerate(c.losses):
            loss.load_state_dict(state["components"][f"loss.{i}"])
        self.step = state["step"]
        set_rng_state(state["rng"])

    def _write_run_files(self) -> None:
        self.run_dir.write_text("recipe.yaml", dump_recipe(self.recipe))
        registry = self.prepared.registry
        facts = {
            "maeframe": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version(), "device": _device_name(self.device),
            "precision": self.runtime.precision, "world_size": self.world_size,
            "effective_batch": self.effective_batch, "peak_lr": self.lr, "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps, "dataset_size": len(self.dataset),
            "params": {"encoder": count_parameters(self.model.encoder), "decoder": count_parameters(self.model.decoder)},
            "components": {f"{kind}/{name}": entry.plugin for kind, table in registry.entries.items()
                           for name, entry in table.items()},
        }
        self.run_dir.write_text("run.json", json.dumps(facts, indent=2) + "\n")

    # --- pictures --------------------------------------------------------------------------------------

    @torch.no_grad()
    def visualize(self, path: Path) -> list[Path]:
        """Save reconstructions of the first samples of the un-augmented dataset under a fixed mask."""
        if self._visual_data is None:
            self._visual_data = build_dataset(self.prepared, "eval")
        count = min(self.recipe.runtime.visualize_samples, len(self._visual_data))
        batch = torch.stack([self._visual_data[i][0] for i in range(count)]).to(self.device)
        was_training = self.model.training
        self.model.eval()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.recipe.seed)
            mask = self.components.masker(count, self.device)
        tokens, mask, prediction = self.predict(batch, mask)
        self.model.train(was_training)
        panels = reconstruction_panels(self.components, self._visual_data, tokens, mask, prediction)
        if panels is None:
            return []
        return self.components.tokenizer.save_pictures(panels.cpu(), path)


class _Window:
    """Sums of per-step device tensors between two log lines; one host sync when flushed."""

    def __init__(self, step: int):
        self.sums: dict[str, torch.Tensor] = {}
        self.steps, self.start_step, self.start, self.data_wait = 0, step, time.perf_counter(), 0.0

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0) + value
        self.steps += 1

    def flush(self, step: int, effective_batch: int) -> dict[str, float]:
        metrics = {key: float(value) / self.steps for key, value in self.sums.items()}  # the host sync
        elapsed = time.perf_counter() - self.start
        metrics["img_s"] = round(self.steps * effective_batch / elapsed, 2)
        metrics["data_wait"] = round(self.data_wait / elapsed, 4)
        if not all(math.isfinite(v) for v in metrics.values()):
            metrics["nonfinite"] = 1.0
        self.__init__(step)
        return metrics


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
