"""The training loop every task shares (pretraining, fine-tuning, linear probing).

`Trainer` owns the world and device, the data order, epochs, micro-batches and accumulation, the logging
window, step and epoch checkpoints (one file under ddp, a DCP directory under fsdp), keep-K, preemption
(SIGTERM/SIGUSR1 -> `last` + exit 75), the non-finite policy, bad-sample accounting, the progress bar and the
lifecycle hooks. A task subclasses it and supplies only:

    build_train_set()            the training dataset (default: the recipe's data.train, augmented)
    setup()                      what it needs before its step (eval set, classes, monitor)
    build_step()                 its `OptimizerStep` (model, optimizer, losses)
    end_epoch(epochs, final, metrics, log) -> (record, improved)
                                 its epoch-end work: pictures and monitor, or evaluation (and a new best)
    finish(metrics) -> dict      what the run returns (and writes) once training ends
    extra_state() / load_extra_state(state), run_facts()

Under torchrun every process runs the loop; only rank 0 writes files (all ranks write DCP shards).
"""
from __future__ import annotations

import json
import platform
import signal
import time
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor
from tqdm import tqdm

from .. import __version__
from ..build import Prepared, build_dataset, warn_provenance_changes
from ..errors import MaeframeError
from ..recipe import dump_recipe
from .checkpoint import (FORMAT, TENSOR_KEYS, atomic_save, load_checkpoint, prune, read_run_state, remove,
                         remove_stale_temporaries, save_dcp)
from .data import DEVICE_AUGMENT_STREAM, ResumableBatchSampler, make_loader, stream_seed
from .distributed import any_rank, average, barrier, shutdown_world
from .optim import peak_lr
from .resume_check import check_resume
from .rundir import MetricsLog, RunDirectory
from .runtime import rng_state, set_rng_state, start_process
from .step import OptimizerStep
from .window import LogWindow, device_name

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(MaeframeError):
    """SIGTERM/SIGUSR1 arrived; last.pt was written at a step boundary. Exit code 75: requeue and resume."""

    exit_code = 75

    def __init__(self, signal_name: str, step: int, checkpoint):
        super().__init__(f"stopped by signal {signal_name} at step {step}; {checkpoint} holds it: rerun with --resume")


class NonFiniteError(MaeframeError):
    """A step had a non-finite loss or gradient (it was not applied) and the recipe says stop."""


class SampleCount:
    """Sample reads of a run and how many failed (`SeededDataset` skips unreadable files and reports them
    per sample). The run stops once the failed reads exceed `max_bad_fraction` of the reads so far, or of
    one epoch's reads (`epoch_reads`, this process's share of the dataset) while fewer have been made: an
    early unlucky batch cannot stop a run whose dataset is within the limit (1 bad file in 800 read in the
    first batch of 32), and a dataset far over it still stops within its first epoch, as `maeframe pack`
    judges the whole dataset."""

    def __init__(self, max_bad_fraction: float, epoch_reads: int = 0, unreadable: list[str] = (),
                 world_size: int = 1):
        """`unreadable`: files the dataset passed over when it was built (`Dataset.unreadable()`): failed
        reads of the whole dataset, each process carrying its share of them."""
        self.limit, self.epoch_reads = max_bad_fraction, epoch_reads
        self.unreadable = len(unreadable)
        self.share = self.unreadable / world_size
        self.seen = self.bad = 0
        total = epoch_reads * world_size + self.unreadable
        if self.unreadable > self.limit * total:
            raise MaeframeError(f"{self.unreadable} of {total} files of the training set cannot be read (more than "
                                f"data.max_bad_fraction={self.limit}); first: {unreadable[0]}")

    def add(self, items: int, failed: Tensor) -> None:
        """`items` delivered dataset items (reads; k samples each under repeated sampling), failed [items]
        reads skipped before each of them."""
        bad = int(failed.sum())
        self.bad += bad
        self.seen += items + bad
        reads = max(self.seen, self.epoch_reads) + self.share
        if self.bad + self.share > self.limit * reads:
            raise MaeframeError(f"{self.bad} of {self.seen} sample reads failed"
                                f"{f' (and {self.unreadable} files were unreadable when listed)' if self.unreadable else ''}: "
                                f"more than data.max_bad_fraction={self.limit} of {round(reads)}; see the warnings "
                                f"for their paths")

    def state_dict(self) -> Tensor:
        return torch.tensor([self.seen, self.bad])

    def load_state_dict(self, state: Tensor | None) -> None:
        self.seen, self.bad = (int(v) for v in (state if state is not None else torch.zeros(2)))


class PreemptionSignals:
    """Between `install()` and `restore()`, SIGTERM / SIGUSR1 only record their name in `received`; the loop
    checks it at a step boundary, writes last.pt and raises `Preempted`. `restore()` puts the previous
    handlers back."""

    def __init__(self):
        self.received: str | None = None

    def _record(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def install(self) -> None:
        self._previous = {s: signal.signal(s, self._record) for s in PREEMPT_SIGNALS}

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """Builds a run from a prepared recipe; `train()` runs the loop and returns `finish()`'s result.

    Resuming (`resume=True`, or "auto" for a requeued job: see `RunDirectory`) restores model, optimizer,
    grad scaler, step counter, every RNG, the sample counts, the task's own state and the data position from
    the run's `last` checkpoint (either format, any world size), so the run continues as if never stopped.
    The recipe may change only in fields that leave the trajectory alone (`resume_check`)."""

    def __init__(self, prepared: Prepared, resume: bool | str = False):
        self.prepared = prepared
        self.recipe = recipe = prepared.recipe
        self.hook = prepared.pm.hook
        self.world, self.runtime = start_process(recipe.runtime, recipe.seed)
        self.device = self.runtime.device

        self.dataset = self.build_train_set()
        data, optim = recipe.data, recipe.optim
        self.sampler, self.loader = self.build_loader(self.dataset)
        self.steps_per_epoch = self.sampler.batches_per_epoch // optim.accum_steps
        self.total_steps = optim.epochs * self.steps_per_epoch
        self.world_size = self.world.world_size
        self.effective_batch = data.batch_size * optim.accum_steps * self.world_size
        self.lr = peak_lr(optim, self.effective_batch)
        self.setup()
        self.train_step = self.build_step()
        self.model, self.optimizer = self.train_step.model, self.train_step.optimizer
        self.sharded = self.train_step.sharded
        self.step = 0
        self.samples = SampleCount(data.max_bad_fraction, len(self.dataset) // self.world_size,
                                   self.dataset.unreadable(), self.world_size)
        self.signals = PreemptionSignals()

        self.run_dir = RunDirectory(Path(recipe.runtime.output_dir) / recipe.name, resume, self.world.is_main,
                                    ".dcp" if self.sharded else ".pt")
        self.resume_changes: dict[str, tuple[Any, Any]] | None = None  # set by a resume
        if self.run_dir.resuming:
            if self.world.is_main:
                remove_stale_temporaries(self.run_dir.path)
            self._restore(self.run_dir.resume_from)
        barrier(self.world)  # every rank has checked the run directory before rank 0 writes into it

    # --- what a task supplies ----------------------------------------------------------------------------

    def build_train_set(self):
        return build_dataset(self.prepared, "train")

    def build_loader(self, dataset):
        """(sampler, loader) of the training data: a `ResumableBatchSampler` whose `start(epoch, batch)` positions
        it and whose `batches_per_epoch` fixes the epoch, and the loader drawing batches through it."""
        data, optim = self.recipe.data, self.recipe.optim
        sampler = ResumableBatchSampler(len(dataset), data.batch_size, self.recipe.seed, self.world.rank,
                                        self.world.world_size, batches_multiple=optim.accum_steps,
                                        repeats=dataset.repeats)
        return sampler, make_loader(dataset, data, sampler, pin_memory=self.device.type == "cuda")

    def setup(self) -> None:
        """Build what the task needs before its step (runs after the data, before `build_step`)."""

    def build_step(self) -> OptimizerStep:
        raise NotImplementedError

    def end_epoch(self, epochs_done: int, final: bool, metrics: dict[str, float],
                  log: MetricsLog | None) -> tuple[dict[str, Any], bool]:
        """The task's work after an epoch, before its checkpoints: (record for on_epoch_end, whether this is
        a new best, saved as `best`)."""
        return metrics, False

    def finish(self, metrics: dict[str, float]) -> dict[str, Any]:
        """Once the last step is done and `last` written: the run's result."""
        return metrics

    def extra_state(self) -> dict[str, Any]:
        """The task's own entries of a checkpoint (plain values and full tensors)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what `extra_state` saved."""

    def run_facts(self) -> dict[str, Any]:
        """The task's own entries of run.json."""
        return {}

    # --- the loop ----------------------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        runtime = self.recipe.runtime
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
        accum = self.recipe.optim.accum_steps
        self.signals.install()
        try:
            while self.step < stop_at:
                epoch = self.step // self.steps_per_epoch
                self.sampler.start(epoch, (self.step % self.steps_per_epoch) * accum)
                batches = iter(self.loader)
                epoch_end = min((epoch + 1) * self.steps_per_epoch, stop_at)
                try:
                    while self.step < epoch_end:
                        waited = time.perf_counter()
                        micro = [self._next(batches, i) for i in range(accum)]
                        window.data_wait += time.perf_counter() - waited
                        window.add(self.train_step(self.step, micro))
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
                finally:
                    del batches  # stops the loader workers now, also when the run stops on an error
                if self.step % self.steps_per_epoch == 0:
                    self._end_epoch(self.step // self.steps_per_epoch, last, log)
            if self.step % self.steps_per_epoch or not self.run_dir.last.exists():
                self.save(self.run_dir.last)
            result = self.finish(last)
            barrier(self.world)
        finally:
            self.signals.restore()
            bar.close()
            if log is not None:
                log.close()
        self.hook.on_train_end(run=self, metrics=last)
        shutdown_world(self.world)
        return result

    def _next(self, batches, micro: int) -> tuple[Tensor, Tensor]:
        """The next micro-batch (inputs, labels) on the device, after the dataset's `device_transform` if it
        has one; counts unreadable samples the loader skipped and stops above the limit."""
        inputs, labels, failed = next(batches)
        self.samples.add(len(failed), failed)
        if isinstance(inputs, dict):  # a joint recipe: {modality: [B, *input_shape]}
            inputs = {name: x.to(self.device, non_blocking=True) for name, x in inputs.items()}
        else:
            inputs = inputs.to(self.device, non_blocking=True)
        labels = torch.as_tensor(labels).to(self.device, non_blocking=True)
        transform = self.dataset.device_transform
        if transform is None:
            return inputs, labels
        # one draw per global micro-batch, a function of (seed, step, micro-batch): every process draws the
        # same and keeps its rows, as with masks; exact on resume and across world sizes
        seed = stream_seed(self.recipe.seed, self.step, micro, DEVICE_AUGMENT_STREAM)
        generator = torch.Generator(self.device).manual_seed(seed)
        size = len(next(iter(inputs.values()))) if isinstance(inputs, dict) else len(inputs)
        rows = (self.world.rank * size, self.world.world_size * size)
        return transform(inputs, generator, rows=rows), labels

    def _preempted(self, every_step: bool) -> bool:
        """Ranks agree on stopping only at logging steps (one collective), a single process every step."""
        return every_step and any_rank(self.signals.received is not None, self.world, self.device)

    def _log(self, metrics: dict[str, float], log: MetricsLog | None, bar: tqdm) -> dict[str, float]:
        step = self.train_step
        metrics = average(metrics, self.world, self.device)
        metrics["lr"] = max(group["lr"] for group in self.optimizer.param_groups)
        metrics["epoch"] = round(self.step / self.steps_per_epoch, 4)
        metrics["nonfinite_steps"] = int(step.nonfinite)
        metrics["bad_samples"] = self.samples.bad
        metrics["unreadable_at_build"] = self.samples.unreadable
        for prefix, component in self.prepared.all_components():
            metrics.update({f"{component.kind}/{prefix}{key}": value for key, value in component.metrics().items()})
        if self.device.type == "cuda":
            metrics["max_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        if log is not None:
            log.write(self.step, metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}", img_s=f"{metrics['img_s']:.0f}",
                        refresh=False)
        self.hook.log_metrics(step=self.step, metrics=metrics)
        if metrics["nonfinite_steps"] and self.recipe.runtime.nonfinite == "stop":
            latest = self.run_dir.latest()
            where = (f"the last checkpoint is {latest} (step {self._checkpoint_step(latest)})" if latest
                     else "no checkpoint was written yet")
            raise NonFiniteError(f"non-finite loss or gradients at step {int(step.first_nonfinite)}: that update "
                                 f"was not applied; stopping (runtime.nonfinite=stop); {where}. Lower the lr, "
                                 f"enable optim.clip_grad, or set runtime.nonfinite=skip")
        return metrics

    def _end_epoch(self, epochs_done: int, metrics: dict[str, float], log: MetricsLog | None) -> None:
        runtime = self.recipe.runtime
        final = epochs_done == self.recipe.optim.epochs
        record, improved = self.end_epoch(epochs_done, final, metrics, log)
        self.save(self.run_dir.last)
        if improved:
            self.save(self.run_dir.best)
        if epochs_done % runtime.checkpoint_interval == 0 or final:
            self.save(self.run_dir.periodic(epochs_done))
            if self.world.is_main:
                prune(self.run_dir.periodic_checkpoints(), runtime.keep_checkpoints)
        self.hook.on_epoch_end(run=self, epoch=epochs_done, metrics=record)

    # --- state -------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "task": self.recipe.task,
            "step": self.step,
            "world_size": self.world_size,
            **self.train_step.state_dict(),
            "samples": self.samples.state_dict(),
            "rng": rng_state(),
            **self.extra_state(),
            "recipe": self.recipe.model_dump(mode="json"),
            "plugins": self.prepared.provenance(),
        }

    def save(self, path: Path) -> None:
        """Write `path` atomically; a model with non-finite weights is never written. ddp: rank 0 writes one
        file; fsdp: every rank writes its shards into the DCP directory `path`. Once `last` is written, a
        `last` of the other format (left by a run that changed strategy) is stale and removed."""
        if not self.train_step.model_is_finite():
            raise NonFiniteError(f"refusing to write {path}: the model has non-finite weights at step {self.step}")
        if self.sharded:
            state = self.state_dict()
            save_dcp(path, {key: state.pop(key) for key in TENSOR_KEYS}, state, self.world)
        elif self.world.is_main:
            atomic_save(self.state_dict(), path)
        if path == self.run_dir.last and self.world.is_main:
            for stale in self.run_dir.stale_lasts():
                remove(stale)

    def _restore(self, path: Path) -> None:
        """Continue from a checkpoint of either format, written by any strategy and world size. Read onto the
        CPU: RNG states must be CPU tensors, and weights and optimizer state are copied onto their devices."""
        state = read_run_state(path) if path.is_dir() else load_checkpoint(path)
        task = state.get("task", "pretrain")
        if task != self.recipe.task:
            raise MaeframeError(f"--resume: {path} is a {task} checkpoint, not {self.recipe.task}")
        self.resume_changes = check_resume(state["recipe"], self.recipe.model_dump(mode="json"),
                                           state.get("world_size"), self.world_size, path)
        self.train_step.load_state_dict(state, shards=path if path.is_dir() else None)
        self.step = state["step"]
        self.samples.load_state_dict(state.get("samples"))
        self.load_extra_state(state)
        set_rng_state(state["rng"])
        warn_provenance_changes(state.get("plugins"), self.prepared.provenance(), path)

    @staticmethod
    def _checkpoint_step(path: Path) -> int:
        state = read_run_state(path) if path.is_dir() else torch.load(path, map_location="cpu", weights_only=True)
        return state["step"]

    def _write_run_files(self) -> None:
        """recipe.yaml and run.json at the start; a resume keeps the original recipe.yaml, adds the recipe it
        was resumed with (`recipe-resumed-stepN.yaml`) and appends what it changed to run.json's `resumes`."""
        resumes = []
        if self.resume_changes is None:
            self.run_dir.write_text("recipe.yaml", dump_recipe(self.recipe))
        else:
            self.run_dir.write_text(f"recipe-resumed-step{self.step:07d}.yaml", dump_recipe(self.recipe))
            previous = self.run_dir.path / "run.json"
            resumes = json.loads(previous.read_text()).get("resumes", []) if previous.is_file() else []
            resumes.append({"step": self.step, "world_size": self.world_size,
                            "changed": {k: list(v) for k, v in self.resume_changes.items()}})
        facts = {
            "maeframe": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version(), "device": device_name(self.device),
            "precision": self.runtime.precision, "task": self.recipe.task, "strategy": self.recipe.runtime.strategy,
            "world_size": self.world_size, "effective_batch": self.effective_batch, "peak_lr": self.lr,
            "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
            "unreadable_at_build": {"count": self.samples.unreadable, "first": self.dataset.unreadable()[:20]},
            "repeats": self.dataset.repeats, **self.run_facts(),
            **({"resumes": resumes} if resumes else {}),
            "plugins": self.prepared.provenance(),
        }
        self.run_dir.write_text("run.json", json.dumps(facts, indent=2) + "\n")
