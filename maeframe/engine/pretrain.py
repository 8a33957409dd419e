"""The MAE pretraining engine: data, run directory, checkpoints and the loop around `TrainStep`."""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import timm
import torch
from tqdm import tqdm

from .. import __version__
from ..build import Prepared, build_dataset
from ..errors import MaeframeError
from ..model.mae import count_parameters
from ..recipe import dump_recipe
from .checkpoint import FORMAT, atomic_save, load_checkpoint, prune, remove, remove_stale_temporaries
from .data import ResumableBatchSampler, SeededDataset, make_loader, sample_seed
from .dcp_checkpoint import TENSOR_KEYS, read_run_state, save_dcp
from .distributed import any_rank, average, barrier, init_world, shutdown_world
from .fsdp import root_gathered
from .monitor import KnnMonitor, describe as describe_monitor
from .optim import peak_lr
from .loop import Preempted, PreemptionSignals, SampleCount
from .rundir import MetricsLog, RunDirectory
from .runtime import rng_state, seed_everything, select_runtime, set_rng_state
from .step import TrainStep
from .visualize import reconstruction_panels
from .window import LogWindow, device_name

class NonFiniteError(MaeframeError):
    """A step had a non-finite loss or gradient (it was not applied) and the recipe says stop."""


class Pretrainer:
    """Builds everything a pretraining run needs from a prepared recipe; `train()` runs it.

    Resuming (`resume=True`) restores model, optimizer, grad scaler, step counter, every RNG, component
    state and the data position from `<run>/last.pt`, so the run continues as if never stopped. Under
    torchrun every process runs this; only rank 0 writes files.
    """

    def __init__(self, prepared: Prepared, resume: bool = False):
        self.prepared = prepared
        self.recipe = recipe = prepared.recipe
        self.components = prepared.components
        self.hook = prepared.pm.hook
        wants_cuda = recipe.runtime.device == "cuda" or (recipe.runtime.device == "auto" and torch.cuda.is_available())
        self.world = init_world("cuda" if wants_cuda else "cpu")
        self.runtime = select_runtime(recipe.runtime, self.world.local_rank)
        self.device = self.runtime.device
        seed_everything(recipe.seed)

        self.dataset = build_dataset(prepared, "train")
        data, optim = recipe.data, recipe.optim
        self.sampler = ResumableBatchSampler(len(self.dataset), data.batch_size, recipe.seed, self.world.rank,
                                             self.world.world_size, batches_multiple=optim.accum_steps)
        self.loader = make_loader(self.dataset, data, self.sampler, pin_memory=self.device.type == "cuda")
        self.steps_per_epoch = self.sampler.batches_per_epoch // optim.accum_steps
        self.total_steps = optim.epochs * self.steps_per_epoch
        self.world_size = self.world.world_size
        self.effective_batch = data.batch_size * optim.accum_steps * self.world_size
        self.lr = peak_lr(optim, self.effective_batch)
        self.engine = TrainStep(prepared, self.runtime, self.world, self.lr, self.steps_per_epoch)
        self.model, self.optimizer = self.engine.model, self.engine.optimizer
        evaluates = self.world.is_main or self.engine.sharded  # a sharded encoder's forward needs every rank
        self.monitor = (KnnMonitor(prepared, recipe.monitor, self.device, self.runtime.autocast)
                        if recipe.monitor is not None and evaluates else None)
        self.step = 0
        self.samples = SampleCount(recipe.data.max_bad_fraction)

        self.run_dir = RunDirectory(Path(recipe.runtime.output_dir) / recipe.name, resume, self.world.is_main,
                                    ".dcp" if self.engine.sharded else ".pt")
        if resume:
            if self.world.is_main:
                remove_stale_temporaries(self.run_dir.path)
            self._restore(self.run_dir.resume_from)
        barrier(self.world)  # every rank has checked the run directory before rank 0 writes into it
        self._visual_data = None
        self.signals = PreemptionSignals()

    # --- the loop ------------------------------------------------------------------------------------

    def train(self) -> dict[str, float]:
        recipe, runtime = self.recipe, self.recipe.runtime
        stop_at = min(self.total_steps, runtime.max_steps) if runtime.max_steps else self.total_steps
        log = None
        if self.world.is_main:
            self._write_run_files()
            log = MetricsLog(self.run_dir.path, runtime.tensorboard, resume_step=self.step)
        self.hook.on_train_start(run=self)
        bar = tqdm(total=stop_at, initial=self.step, disable=not (runtime.progress_bar and self.world.is_main),
                   unit="step", dynamic_ncols=True, mininterval=1.0)
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
                    micro = [self._next(batches, i) for i in range(accum)]
                    window.data_wait += time.perf_counter() - waited
                    window.add(self.engine(self.step, micro))
                    self.step += 1
                    bar.update(1)
                    at_log = self.step % runtime.log_interval == 0 or self.step == stop_at
                    if at_log:
                        last = self._log(window.flush(self.effective_batch), log, bar)
                    if runtime.checkpoint_every_steps and self.step % runtime.checkpoint_every_steps == 0:
                        self.save(self.run_dir.last)
                    if self._preempted(every_step=not self.world.distributed or at_log):
                        self.save(self.run_dir.last)
                        raise Preempted(self.signals.received, self.step, self.run_dir.last)
                del batches
                if self.step % self.steps_per_epoch == 0:
                    self._end_epoch(self.step // self.steps_per_epoch, last, log)
            if self.step % self.steps_per_epoch or not self.run_dir.last.exists():
                self.save(self.run_dir.last)
            barrier(self.world)
        finally:
            self.signals.restore()
            bar.close()
            if log is not None:
                log.close()
        self.hook.on_train_end(run=self, metrics=last)
        shutdown_world(self.world)
        return last

    def _next(self, batches, micro: int) -> torch.Tensor:
        """The next micro-batch on the device, after the dataset's `device_transform` if it has one; counts
        unreadable samples the loader skipped and stops above the limit."""
        batch, _, failed = next(batches)
        self.samples.add(len(batch), failed)
        batch = batch.to(self.device, non_blocking=True)
        transform = self.dataset.device_transform
        if transform is None:
            return batch
        # one draw per global micro-batch, a function of (seed, step, micro-batch): every process draws the
        # same and keeps its rows, as with masks; exact on resume and across world sizes
        generator = torch.Generator(self.device).manual_seed(sample_seed(self.recipe.seed, self.step, micro))
        rows = (self.world.rank * len(batch), self.world.world_size * len(batch))
        return transform(batch, generator, rows=rows)

    def _preempted(self, every_step: bool) -> bool:
        """Ranks agree on stopping only at logging steps (one collective), a single process every step."""
        return every_step and any_rank(self.signals.received is not None, self.world, self.device)

    def _log(self, metrics: dict[str, float], log: MetricsLog | None, bar: tqdm) -> dict[str, float]:
        metrics = average(metrics, self.world, self.device)
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        metrics["epoch"] = round(self.step / self.steps_per_epoch, 4)
        metrics["nonfinite_steps"] = int(self.engine.nonfinite)
        metrics["bad_samples"] = self.samples.bad
        for component in self.components.all():
            metrics.update({f"{component.kind}/{key}": value for key, value in component.metrics().items()})
        if self.device.type == "cuda":
            metrics["max_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        if log is not None:
            log.write(self.step, metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}", img_s=f"{metrics['img_s']:.0f}",
                        refresh=False)
        self.hook.log_metrics(step=self.step, metrics=metrics)
        if metrics["nonfinite_steps"] and self.recipe.runtime.nonfinite == "stop":
            raise NonFiniteError(f"non-finite loss or gradients at step {int(self.engine.first_nonfinite)}: that "
                                 f"update was not applied; stopping (runtime.nonfinite=stop). The last checkpoint "
                                 f"is {self.run_dir.last}; lower the lr, enable optim.clip_grad, or set "
                                 f"runtime.nonfinite=skip")
        return metrics

    def _end_epoch(self, epochs_done: int, metrics: dict[str, float], log: MetricsLog | None = None) -> None:
        runtime = self.recipe.runtime
        final = epochs_done == self.recipe.optim.epochs
        if self.recipe.monitor is not None and (final or epochs_done % self.recipe.monitor.knn_every_epochs == 0):
            metrics = {**metrics, **self._monitor(epochs_done, log)}
        pictures = self.world.is_main or self.engine.sharded  # a sharded model's forward needs every rank
        if pictures and (epochs_done % runtime.visualize_interval == 0 or final):
            self.visualize(self.run_dir.path / "reconstructions" / f"epoch{epochs_done:04d}.png")
        self.save(self.run_dir.last)
        if epochs_done % runtime.checkpoint_interval == 0 or final:
            self.save(self.run_dir.periodic(epochs_done))
            if self.world.is_main:
                prune(self.run_dir.periodic_checkpoints(), runtime.keep_checkpoints)
        self.hook.on_epoch_end(run=self, epoch=epochs_done, metrics=metrics)

    def _monitor(self, epochs_done: int, log: MetricsLog | None) -> dict[str, float]:
        """The k-NN monitor on rank 0 (under fsdp on every rank, the encoder's forward being collective; the
        others wait at a barrier): one metrics line at this step, written by rank 0."""
        results = {}
        if self.monitor is not None:
            with root_gathered(self.model, self.engine.sharded):
                results = self.monitor.evaluate(self.model.encoder, self.components.tokenizer)
        barrier(self.world)
        if self.world.is_main:
            if log is not None:
                log.write(self.step, {"epoch": epochs_done, **results})
            tqdm.write(describe_monitor(epochs_done, results))
        return results

    # --- state -----------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        c = self.components
        return {
            "format": FORMAT,
            "step": self.step,
            **self.engine.state_dict(),
            "samples": self.samples.state_dict(),
            "rng": rng_state(),
            "components": {"masker": c.masker.state_dict(), "target": c.target.state_dict(),
                           **{f"loss.{i}": loss.state_dict() for i, (_, _, loss) in enumerate(c.losses)}},
            "recipe": self.recipe.model_dump(mode="json"),
        }

    def save(self, path: Path) -> None:
        """Write `path` atomically; a model with non-finite weights is never written. ddp: rank 0 writes one
        file; fsdp: every rank writes its shards into the DCP directory `path`. Once `last` is written, a
        `last` of the other format (left by a run that changed strategy) is stale and removed."""
        if not self.engine.model_is_finite():
            raise NonFiniteError(f"refusing to write {path}: the model has non-finite weights at step {self.step}")
        if self.engine.sharded:
            state = self.state_dict()
            save_dcp(path, {key: state.pop(key) for key in TENSOR_KEYS}, state, self.world)
        elif self.world.is_main:
            atomic_save(self.state_dict(), path)
        if path == self.run_dir.last and self.world.is_main:
            for stale in self.run_dir.stale_lasts():
                remove(stale)

    def _restore(self, path: Path) -> None:
        """Continue from a checkpoint of either format, written by any strategy and world size. Read onto the
        CPU: RNG states must be CPU tensors, and weights and AdamW state are copied onto their devices."""
        c = self.components
        if path.is_dir():
            state = read_run_state(path)
            self.engine.load_state_dict(state, shards=path)
        else:
            state = load_checkpoint(path)
            self.engine.load_state_dict(state)
        c.masker.load_state_dict(state["components"]["masker"])
        c.target.load_state_dict(state["components"]["target"])
        for i, (_, _, loss) in enumerate(c.losses):
            loss.load_state_dict(state["components"][f"loss.{i}"])
        self.step = state["step"]
        self.samples.load_state_dict(state.get("samples"))
        set_rng_state(state["rng"])

    def _write_run_files(self) -> None:
        self.run_dir.write_text("recipe.yaml", dump_recipe(self.recipe))
        registry = self.prepared.registry
        facts = {
            "maeframe": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version(), "device": device_name(self.device),
            "precision": self.runtime.precision, "world_size": self.world_size,
            "effective_batch": self.effective_batch, "peak_lr": self.lr, "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps, "dataset_size": len(self.dataset),
            "params": {"encoder": count_parameters(self.model.encoder), "decoder": count_parameters(self.model.decoder)},
            "components": {f"{kind}/{name}": entry.plugin for kind, table in registry.entries.items()
                           for name, entry in table.items()},
        }
        self.run_dir.write_text("run.json", json.dumps(facts, indent=2) + "\n")

    # --- compatibility with the step object ------------------------------------------------------------

    def predict(self, batch: torch.Tensor, mask=None):
        return self.engine.predict(batch, mask, self.step)

    def forward_losses(self, batch: torch.Tensor, mask=None):
        return self.engine.forward_losses(batch, mask, self.step)

    # --- pictures --------------------------------------------------------------------------------------

    @torch.no_grad()
    def visualize(self, path: Path) -> list[Path]:
        """Save reconstructions of the first held-out samples under a fixed mask; returns the files."""
        if self._visual_data is None:  # skips unreadable files like training does
            self._visual_data = SeededDataset(build_dataset(self.prepared, "eval"))
        count = min(self.recipe.runtime.visualize_samples, len(self._visual_data))
        batch = torch.stack([self._visual_data[(i, self.recipe.seed)][0] for i in range(count)]).to(self.device)
        was_training = self.model.training
        self.model.eval()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.recipe.seed)
            mask = self.components.masker(count, self.device)
        tokens, mask, prediction = self.engine.predict(batch, mask, self.step, model=self.model)
        self.model.train(was_training)
        if not self.world.is_main:  # fsdp: the other ranks only took part in the forward
            return []
        panels = reconstruction_panels(self.components, self._visual_data.dataset, tokens, mask, prediction)
        if panels is None:
            return []
        return self.components.tokenizer.save_pictures(panels.cpu(), path)
