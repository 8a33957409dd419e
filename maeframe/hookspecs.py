"""Every hook a maeframe plugin can implement. Bodies are docstrings only; grouped by phase.

Registration hooks receive a `register(name, cls)` callback; the core checks names, base classes and
duplicates, and records which plugin supplied each component. No hook is called per training step.
"""
from __future__ import annotations

from typing import Any, Callable

import pluggy

hookspec = pluggy.HookspecMarker("maeframe")
hookimpl = pluggy.HookimplMarker("maeframe")

Register = Callable[[str, type], None]


# --- registration (called once, when the registry is built) ---------------------------------------

@hookspec
def register_tokenizers(register: Register) -> None:
    """Register `maeframe.Tokenizer` subclasses: register("image_patch", ImagePatchTokenizer)."""


@hookspec
def register_maskers(register: Register) -> None:
    """Register `maeframe.Masker` subclasses."""


@hookspec
def register_targets(register: Register) -> None:
    """Register `maeframe.Target` subclasses."""


@hookspec
def register_losses(register: Register) -> None:
    """Register `maeframe.Loss` subclasses."""


@hookspec
def register_datasets(register: Register) -> None:
    """Register `maeframe.Dataset` subclasses."""


@hookspec
def register_weight_formats(register: Register) -> None:
    """Register `maeframe.WeightFormat` subclasses: file formats of pretrained encoder weights that a
    downstream recipe's `init.format` names, e.g. register("official_videomae", VideoMAEWeights)."""


@hookspec
def register_loggers(register: Register) -> None:
    """Register `maeframe.RunLogger` subclasses: experiment trackers a recipe lists in `runtime.loggers`,
    e.g. register("mlflow", MLflowLogger)."""


# --- command line ---------------------------------------------------------------------------------

@hookspec
def register_commands(subparsers: Any) -> None:
    """Add `maeframe` subcommands: `parser = subparsers.add_parser(name, help=...)`, its arguments, and
    `parser.set_defaults(func=fn)` with `fn(args) -> exit code`. Implemented in modules of the
    `maeframe_commands` entry-point group, which the CLI loads to build its parser: keep them light and
    import heavy modules inside `fn`. A `MaeframeError` raised by `fn` is printed as `error: ...`, exit 2."""


# --- recipe ---------------------------------------------------------------------------------------

@hookspec
def validate_recipe(recipe: Any, layout: Any) -> None:
    """Inspect a fully validated `Recipe`; raise ValueError("field.path: message") to reject it. `layout`:
    the `EncoderLayout` the model will run in (maeframe's own, unless a tool runs another project's weights,
    e.g. `maeframe reconstruct` on VideoMAE's, whose position table is not the grid's sin-cos); an
    implementation may leave it out of its parameters."""


# --- lifecycle (coarse: per run and per epoch, never per step) -------------------------------------

@hookspec
def on_train_start(run: Any) -> None:
    """The run is built (model, data, optimizer) and about to train. `run` is the engine's `Run`."""


@hookspec
def log_metrics(step: int, metrics: dict[str, float]) -> None:
    """Called at each logging interval with the values written to metrics.jsonl."""


@hookspec
def on_epoch_end(run: Any, epoch: int, metrics: dict[str, float]) -> None:
    """An epoch finished (after its checkpoint, if one was due)."""


@hookspec
def on_train_end(run: Any, metrics: dict[str, float]) -> None:
    """Training finished normally; `metrics` holds the last logged values."""
