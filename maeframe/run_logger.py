"""Experiment trackers (TensorBoard, MLflow, Weights & Biases, ...): the `logger` component kind.

A recipe lists its trackers under `runtime.loggers`; plugins register them with `register_loggers`. The
engine drives them on the main process only (rank 0 under torchrun; the other ranks construct them for
validation but never start them), at the same moments it writes the run directory:

    start(run)                      once, before the first step (after a resume: continue `state_dict()`'s run)
    log_metrics(step, metrics)      every line of metrics.jsonl, with its step
    log_files(step, paths, folder)  files the run wrote: an epoch's reconstruction pictures, results.json
    finish(status)                  "finished", "failed", or "stopped" (a signal or Ctrl-C: to be resumed)

`state_dict()` (what identifies the tracker's run, e.g. its id) is saved in every checkpoint and run.json, and
given back through `load_state_dict` before `start` when the run resumes, so the tracker continues its run.
Constructing a logger (at validation) must not import its library, touch the network or write anything.
"""
from __future__ import annotations

import importlib.util
import logging
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from .component import Component

STATUSES = ("finished", "failed", "stopped")
log = logging.getLogger("maeframe.recipe")


@dataclass(frozen=True)
class RunStart:
    """What a tracker knows when its run starts.

    run_dir: the run directory (`<output_dir>/<name>`); name: the recipe's name; task: pretrain, finetune,
    linprobe or knn; params: the resolved recipe as {dotted field path: value} (`losses.0.weight`),
    values as a recipe holds them (str, int, float, bool, None, lists); resume_step: the step the run resumes
    from, None for a new run (metrics logged after it before a crash are logged again)."""

    run_dir: Path
    name: str
    task: str
    params: dict[str, Any]
    resume_step: int | None = None


class RunLogger(Component):
    """An experiment tracker a recipe names in `runtime.loggers`. Subclasses declare `Options` and implement
    `start` and `log_metrics`; `log_files` and `finish` do nothing unless overridden (say so in the class's
    docstring when a tracker keeps no files). Options are validated at `runtime.loggers.<i>.options`."""

    kind = "logger"
    requires: ClassVar[tuple[str, ...]] = ()  # top-level modules `start` imports, e.g. ("mlflow",)
    install: ClassVar[str] = ""  # what `pip install` needs to get them, e.g. "maeframe[mlflow]"

    def missing(self) -> list[str]:
        """The modules this logger needs with its options that are not installed (default: those of
        `requires`). Checked at validation: a missing one is a recipe error naming `install`."""
        return [name for name in self.requires if importlib.util.find_spec(name) is None]

    @abstractmethod
    def start(self, run: RunStart) -> None:
        """Open the tracker's run (or continue the one `load_state_dict` restored) and record `run.params`."""

    @abstractmethod
    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Record one line of metrics.jsonl: its numbers (int or float, maybe NaN) at optimizer step `step`."""

    def log_files(self, step: int, paths: list[Path], folder: str) -> None:
        """Keep files the run wrote at step `step` under `folder` of the tracker's run: "reconstructions" (the
        pictures of one epoch, PNG or GIF, and the tokenizer's other files, e.g. WAV) or "results"
        (results.json of a downstream run)."""

    def finish(self, status: str) -> None:
        """Close the tracker's run with one of `STATUSES`."""


def spell_out_loggers(runtime: Any) -> Any:
    """A recipe's `runtime` mapping with `loggers` entries as {name, ...} (a bare name is short for {name}) and
    the older `tensorboard: true|false` folded in: without `loggers` it means [tensorboard] or []; beside
    `loggers`, the list decides, and a `tensorboard` that disagrees with it is named in a warning. So every
    recipe written before `loggers` keeps its meaning, and `runtime.loggers=[...]` on the command line says
    exactly which trackers run. The resolved recipe holds `loggers` only; anything else is left for the
    schema to judge."""
    if not isinstance(runtime, dict):
        return runtime
    runtime = dict(runtime)
    if "tensorboard" in runtime:
        flag = runtime.pop("tensorboard")
        if not isinstance(flag, bool):
            raise ValueError(f"runtime.tensorboard: must be true or false, got {flag!r}")
        if "loggers" not in runtime:
            runtime["loggers"] = ["tensorboard"] if flag else []
        elif isinstance(runtime["loggers"], list):
            names = [item.get("name") if isinstance(item, dict) else item for item in runtime["loggers"]]
            if flag != ("tensorboard" in names):
                log.warning("runtime.tensorboard: %s is ignored: runtime.loggers %s says which trackers run "
                            "(remove runtime.tensorboard, or make it agree)", str(flag).lower(), names)
    if isinstance(runtime.get("loggers"), list):
        runtime["loggers"] = [{"name": item} if isinstance(item, str) else item for item in runtime["loggers"]]
    return runtime
