"""Helpers for testing maeframe plugins, in the spirit of pytest's `pytester`: build a component by name,
check a masker's contract, check that a component resumes exactly, and train a few steps on synthetic data.

```python
from maeframe import testing

def test_my_masker():
    masker = testing.build_component("masker", "stripes", {"ratio": 0.75}, plugins=["my_plugin"])
    testing.check_masker(masker)                                   # Mask contract, static shapes, no host sync
    testing.check_masker_resume(lambda: testing.build_component("masker", "stripes", plugins=["my_plugin"]))

def test_my_masker_trains(tmp_path):
    run = testing.train_steps("masker", "stripes", plugins=["my_plugin"], directory=tmp_path)
    assert run.final["loss"] > 0
```

Everything runs on the CPU. What `check_masker` can tell there (see its docstring): the `Mask` contract, the
same shapes on every call, the requested device, and — by calling the masker on PyTorch's `meta` device,
where tensors have shapes but no values — that `__call__` never reads a value of a device tensor (`.item()`,
`.tolist()`, `.cpu()`, `bool()`/`int()`/`float()` of a tensor, `.numpy()`), never makes a shape depend on
values (boolean indexing, `nonzero`, `masked_select`, `unique`) and does not copy host data to the device on
every call. On a machine with CUDA it also runs the masker under `torch.cuda.set_sync_debug_mode("error")`.

The module is also a plugin (list `maeframe.testing` under a recipe's `plugins:`) that registers two
components with no data behind them: the tokenizer `testing.patch` (non-overlapping patches of an N-D
input [C, *grid·patch_size], any number of axes) and the dataset `testing.synthetic` (seeded random
samples of whatever shape the tokenizer asks for). `train_steps` uses them.
"""
from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import Field, model_validator
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .component import Component, Options
from .dataset import Dataset
from .hookspecs import hookimpl
from .masker import Mask, Masker
from .plugins import make_plugin_manager
from .registry import KINDS, Registry
from .tokenizer import Tokenizer, Tokens, TokenSpec

__all__ = ["PatchTokenizer", "SyntheticDataset", "TrainRun", "build_component", "check_mask", "check_masker",
           "check_masker_resume", "check_state_roundtrip", "load_registry", "make_batch", "make_tokenizer",
           "make_tokens", "roundtrip_state", "train_steps"]

PLUGIN_MODULE = __name__  # "maeframe.testing": list it under `plugins:` to use the two components below
CPU = torch.device("cpu")


# --- a tokenizer and a dataset without data ---------------------------------------------------------

class PatchOptions(Options):
    channels: int = Field(3, ge=1, description="input channels")
    grid: tuple[int, ...] = Field((4, 4), min_length=1, description="tokens along each axis")
    patch_size: tuple[int, ...] = Field((4, 4), min_length=1, description="input elements per token along "
                                                                          "each axis (as many axes as grid)")

    @model_validator(mode="after")
    def _same_axes(self) -> PatchOptions:
        if len(self.grid) != len(self.patch_size) or min(self.grid + self.patch_size) < 1:
            raise ValueError(f"grid {self.grid} and patch_size {self.patch_size} need the same number of "
                             f"positive sizes")
        return self


class PatchTokenizer(Tokenizer):
    """Non-overlapping patches of an input [C, g1·p1, g2·p2, ...] with any number of axes, each patch laid
    out (*patch_size, channels) as `Tokens` requires. Default: a 4×4 grid of 4×4 patches of 3 channels."""

    Options = PatchOptions

    def __init__(self, options: PatchOptions | None = None):
        options = options if options is not None else PatchOptions()
        super().__init__(options)
        self._spec = TokenSpec(tuple(options.grid), tuple(options.patch_size), options.channels)

    @property
    def spec(self) -> TokenSpec:
        return self._spec

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self._spec.channels, *(g * p for g, p in zip(self._spec.grid, self._spec.patch_size)))

    def tokenize(self, batch: Tensor) -> Tokens:
        spec, axes = self._spec, len(self._spec.grid)
        split = [batch.shape[0], spec.channels, *(n for pair in zip(spec.grid, spec.patch_size) for n in pair)]
        order = [0, *(2 + 2 * i for i in range(axes)), *(3 + 2 * i for i in range(axes)), 1]
        patches = batch.reshape(split).permute(order).reshape(batch.shape[0], spec.num_tokens, spec.patch_dim)
        return Tokens(patches, batch)

    def untokenize(self, patches: Tensor) -> Tensor:
        spec, axes = self._spec, len(self._spec.grid)
        grouped = patches.reshape(patches.shape[0], *spec.grid, *spec.patch_size, spec.channels)
        order = [0, 2 * axes + 1, *(n for i in range(axes) for n in (1 + i, 1 + axes + i))]
        return grouped.permute(order).reshape(patches.shape[0], *self.input_shape)


class SyntheticOptions(Options):
    size: int = Field(16, ge=1, description="samples in the dataset")
    classes: int = Field(4, ge=1, description="labels cycle through 0..classes-1")
    seed: int = Field(0, description="sample i is drawn from a generator seeded with seed + i")


class SyntheticDataset(Dataset):
    """`size` seeded random samples in [0, 1) of the tokenizer's input shape; label i % classes."""

    Options = SyntheticOptions

    def __len__(self) -> int:
        return self.options.size

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        generator = torch.Generator().manual_seed(self.options.seed + int(index))
        return torch.rand(self.input_shape, generator=generator), int(index) % self.options.classes


@hookimpl
def register_tokenizers(register):
    register("testing.patch", PatchTokenizer)


@hookimpl
def register_datasets(register):
    register("testing.synthetic", SyntheticDataset)


# --- building components ----------------------------------------------------------------------------

def load_registry(plugins: Iterable[str] = ()) -> Registry:
    """The registry of every installed plugin plus the modules `plugins` (import names), as a recipe's
    `plugins:` list loads them; honours MAEFRAME_BLOCK_PLUGINS and MAEFRAME_LOAD_PLUGINS."""
    return Registry(make_plugin_manager(list(plugins)))


def make_tokenizer(grid: Sequence[int] = (4, 4), patch_size: Sequence[int] = (4, 4), channels: int = 3) -> PatchTokenizer:
    """A `PatchTokenizer` (token grid `grid`, input [channels, *grid·patch_size])."""
    return PatchTokenizer(PatchOptions(channels=channels, grid=tuple(grid), patch_size=tuple(patch_size)))


def make_batch(tokenizer: Tokenizer, batch_size: int = 4, seed: int = 0, device: str | torch.device = CPU) -> Tensor:
    """Seeded random inputs [batch_size, *tokenizer.input_shape] in [0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((batch_size, *tokenizer.input_shape), generator=generator).to(device)


def make_tokens(tokenizer: Tokenizer, batch_size: int = 4, seed: int = 0) -> Tokens:
    """`tokenizer.tokenize` of `make_batch`: what a target or loss receives."""
    return tokenizer.tokenize(make_batch(tokenizer, batch_size, seed))


def build_component(kind: str, name: str, options: dict[str, Any] | None = None, *, plugins: Iterable[str] = (),
                    spec: TokenSpec | None = None, tokenizer: Tokenizer | None = None,
                    input_shape: tuple[int, ...] | None = None, train: bool = True,
                    registry: Registry | None = None) -> Component:
    """Construct the registered component `name` of `kind` (tokenizer, masker, target, loss, dataset) from
    `options` exactly as a recipe does: looked up in the registry (installed plugins plus the modules in
    `plugins`), options validated against its `Options` (pydantic's ValidationError when they are wrong),
    constructed with the arguments of its kind, with the registry active so it can build others by name.
    A masker gets `spec` (default: `tokenizer`'s, else `make_tokenizer()`'s 4×4 grid), a target or loss
    `tokenizer` (default `make_tokenizer()`), a dataset `input_shape` (default the tokenizer's) and `train`.
    A constructor's ValueError (or OptionError) propagates unchanged."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; kinds: {', '.join(KINDS)}")
    registry = registry if registry is not None else load_registry(plugins)
    options = dict(options or {})
    tokenizer = tokenizer if tokenizer is not None else make_tokenizer()
    with registry.active():
        if kind == "tokenizer":
            return registry.construct(kind, name, options)
        if kind == "masker":
            return registry.construct(kind, name, options, spec if spec is not None else tokenizer.spec)
        if kind == "dataset":
            return registry.construct(kind, name, options, input_shape or tokenizer.input_shape, train)
        return registry.construct(kind, name, options, tokenizer)


# --- the Mask contract, static shapes, host syncs ---------------------------------------------------

def check_mask(mask: Mask, batch_size: int, num_tokens: int, device: str | torch.device | None = None) -> None:
    """Assert what every `Mask` must satisfy: ids_keep [B, V] long, ids_restore [B, N] long, masked [B, N]
    float32; 0 < V < N; ids_restore a permutation of 0..N-1 with ids_restore.gather(1, ids_keep) == 0..V-1;
    masked 0 exactly at ids_keep (so every sample hides N - V tokens); on `device` when given."""
    visible = mask.num_visible
    assert mask.ids_keep.shape == (batch_size, visible), f"ids_keep {tuple(mask.ids_keep.shape)}, want [B={batch_size}, V]"
    assert mask.ids_restore.shape == (batch_size, num_tokens), \
        f"ids_restore {tuple(mask.ids_restore.shape)}, want [B={batch_size}, N={num_tokens}]"
    assert mask.masked.shape == (batch_size, num_tokens), \
        f"masked {tuple(mask.masked.shape)}, want [B={batch_size}, N={num_tokens}]"
    assert mask.ids_keep.dtype == torch.long and mask.ids_restore.dtype == torch.long, "index tensors must be long"
    assert mask.masked.dtype == torch.float32, f"masked must be float32, is {mask.masked.dtype}"
    assert 0 < visible < num_tokens, f"V={visible}: a mask must keep at least one token and hide at least one"
    if device is not None:
        for tensor_name in ("ids_keep", "ids_restore", "masked"):
            where = getattr(mask, tensor_name).device
            assert where.type == torch.device(device).type, f"{tensor_name} is on {where}, the masker was asked for {device}"
    if mask.ids_keep.device.type == "meta":
        return  # shapes only
    ids_keep, ids_restore, masked = mask.ids_keep.cpu(), mask.ids_restore.cpu(), mask.masked.cpu()
    positions = torch.arange(num_tokens).expand(batch_size, -1)
    assert torch.equal(ids_restore.sort(dim=1).values, positions), "ids_restore is not a permutation of 0..N-1"
    assert torch.equal(ids_restore.gather(1, ids_keep), torch.arange(visible).expand(batch_size, -1)), \
        "ids_restore.gather(1, ids_keep) must be 0..V-1: the kept tokens come first in the restored order"
    assert torch.equal(masked, (ids_restore >= visible).float()), \
        "masked must be 0 exactly at ids_keep and 1 elsewhere (ids_restore >= V)"


_READS = {"item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "__complex__"}
_DYNAMIC = {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "bincount"}
_COPIES = {"to", "cuda", "as_tensor", "copy_", "tensor", "new_tensor"}  # host data -> device tensor


class _HostSyncSpy(TorchFunctionMode):
    """Turns a host read of a tensor on `device` (a sync on a GPU), a value-dependent shape and, unless
    `copies` allows them, a copy of host data to the device (blocking on a GPU) into an AssertionError
    naming the operation."""

    def __init__(self, device: torch.device, what: str, copies: bool):
        super().__init__()
        self.device, self.what, self.copies = device, what, copies

    def _on_device(self, args: Sequence[Any]) -> bool:
        return any(isinstance(a, Tensor) and a.device.type == self.device.type for a in args)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _READS and self._on_device(args):
            raise AssertionError(f"{self.what} calls {'Tensor.' + name if not name.startswith('__') else name}"
                                 f"() on a tensor on the device it was asked for: reading a value on the host "
                                 f"is a host sync on a GPU; keep the computation on the device (gather, where, "
                                 f"argsort), or precompute host-side tables in __init__")
        if (name in _DYNAMIC or name == "__getitem__" and any(
                isinstance(a, Tensor) and a.dtype == torch.bool for a in _flat(args[1:]))) and self._on_device(args):
            op = "boolean indexing" if name == "__getitem__" else name
            raise AssertionError(f"{self.what} uses {op} on a device tensor: the result's shape depends on the "
                                 f"values (a host sync, and shapes that change between steps); build index tensors "
                                 f"of fixed size (argsort, topk, gather) instead")
        result = func(*args, **(kwargs or {}))
        if (not self.copies and name in _COPIES and isinstance(result, Tensor)
                and result.device.type == self.device.type and self._from_host(name, args)):
            raise AssertionError(f"{self.what} copies host data to the device on every call ({name}): a blocking "
                                 f"copy on a GPU; move tables to the device once and keep them (e.g. a dict by "
                                 f"device filled on the first call), or create them there (torch.arange, full)")
        return result

    @staticmethod
    def _from_host(name: str, args: Sequence[Any]) -> bool:
        if name in ("tensor", "new_tensor"):
            return True
        sources = args[1:2] if name == "copy_" else args[:1]
        return any(isinstance(a, Tensor) and a.device.type == "cpu" for a in sources)


def _flat(items: Sequence[Any]) -> list[Any]:
    out = []
    for item in items:
        out += _flat(item) if isinstance(item, (tuple, list)) else [item]
    return out


def check_masker(masker: Masker, batch_sizes: Sequence[int] = (1, 4), calls: int = 3, meta: bool = True) -> Mask:
    """Assert a masker's per-step contract on the CPU and return its last mask:

    * every call returns a valid `Mask` (`check_mask`) on the requested device;
    * static shapes: `calls` calls per batch size give the same [B, V] and [B, N] shapes, V is the same
      for every batch size, and equals `masker.visible_tokens()` when that is not None; `check_counts()`
      accepts the options (as recipe validation does);
    * no host sync and no value-dependent shape in `__call__` (`meta=True`): the masker is called on the
      `meta` device, where tensors have shapes but no values, under a guard that names the offending
      operation (`.item()`, `.tolist()`, `.cpu()`, `.numpy()`, `bool/int/float(tensor)`, boolean indexing,
      `nonzero`, `masked_select`, `unique`) or that copies host data to the device on every call (`.to`,
      `torch.tensor(..., device=...)`, `copy_` from a CPU tensor: blocking on a GPU); a first call per
      batch size may copy (to set up device tables that it keeps). Its masks must have the CPU masks'
      shapes. An operation without a meta implementation fails this check too: then pass meta=False and
      rely on a GPU run;
    * with CUDA available, after a warm-up call, one call per batch size under
      `torch.cuda.set_sync_debug_mode("error")`.

    It calls the masker several times (and `check_counts`); build a fresh one for other checks.
    """
    masker.check_counts()
    num_tokens = masker.spec.num_tokens
    what = f"{type(masker).__name__}.__call__"
    visible: int | None = None
    mask = None
    for batch_size in batch_sizes:
        for call in range(calls):
            mask = masker(batch_size, CPU)
            check_mask(mask, batch_size, num_tokens, CPU)
            if visible is None:
                visible = mask.num_visible
            assert mask.num_visible == visible, (f"{what}: call {call + 1} with batch size {batch_size} keeps "
                                                 f"{mask.num_visible} tokens, an earlier call kept {visible}: "
                                                 f"shapes must be static (every mask keeps the same V)")
    expected = masker.visible_tokens()
    assert expected is None or expected == visible, \
        f"{type(masker).__name__}.visible_tokens() says {expected}, but its masks keep {visible}"
    devices = ([torch.device("meta")] if meta else []) + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        for batch_size in batch_sizes:
            on_device = _call_on(masker, batch_size, device, what)
            check_mask(on_device, batch_size, num_tokens, device)
            assert on_device.num_visible == visible, \
                f"{what} on {device} keeps {on_device.num_visible} tokens, on the CPU {visible}"
    return mask


def _call_on(masker: Masker, batch_size: int, device: torch.device, what: str) -> Mask:
    """One checked call on `device`; a first, unchecked-for-copies call may set up device tables."""
    if device.type == "cuda":
        masker(batch_size, device)  # warm-up: device tables, generator state
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return masker(batch_size, device)
        except RuntimeError as err:
            raise AssertionError(f"{what} synchronises with the host on {device}: {err}") from err
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    try:
        with _HostSyncSpy(device, what, copies=True):
            masker(batch_size, device)  # warm-up: the first call may move host tables to the device
        with _HostSyncSpy(device, what, copies=False):
            return masker(batch_size, device)
    except AssertionError:
        raise
    except Exception as err:
        raise AssertionError(f"{what} failed on the meta device (shapes without values): {type(err).__name__}: "
                             f"{err}. A masker must not read device values or make shapes depend on them; if this "
                             f"operation merely lacks a meta implementation, call check_masker(..., meta=False)") from err


# --- state and resume -------------------------------------------------------------------------------

def roundtrip_state(state: Any) -> Any:
    """`state` through torch.save and torch.load(weights_only=True), as a checkpoint stores it: fails for
    values a checkpoint cannot hold (arbitrary objects; use tensors, numbers, strings, lists, dicts)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _assert_same(a: Any, b: Any, where: str = "state") -> None:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        assert isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and a.dtype == b.dtype \
            and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            _assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)), \
            f"{where}: {a!r} != {b!r}"


def check_state_roundtrip(component: Component, build: Callable[[], Component]) -> dict[str, Any]:
    """Assert that `component.state_dict()` survives a checkpoint (`roundtrip_state`) and that a fresh
    `build()` that loads it reports the same state. Returns the loaded state."""
    state = roundtrip_state(component.state_dict())
    fresh = build()
    fresh.load_state_dict(state)
    _assert_same(roundtrip_state(fresh.state_dict()), state, f"{type(component).__name__} state after loading")
    return state


def check_masker_resume(build: Callable[[], Masker], progress: Sequence[tuple[int, float]] = ((0, 0.0), (3, 0.5), (7, 1.0)),
                        batch_size: int = 4, calls: int = 2, seed: int = 0) -> None:
    """Assert that a masker resumes exactly, as the engine resumes it: one masker `build()` runs the steps
    of `progress` but the last (set_progress, then a mask), its state goes through a checkpoint round trip
    into a second `build()`; then, each from the same RNG state (a checkpoint restores it), both get
    `set_progress` of the last entry and must draw identical masks `calls` times in a row."""
    original = build()
    for step, epoch in progress[:-1]:
        original.set_progress(step, epoch)
        original(batch_size, CPU)
    state = check_state_roundtrip(original, build)
    resumed = build()
    resumed.load_state_dict(state)
    step, epoch = progress[-1]
    masks = []
    for masker in (original, resumed):
        with torch.random.fork_rng(devices=[]):  # the engine restores the RNG before the next set_progress
            torch.manual_seed(seed)
            masker.set_progress(step, epoch)
            masks.append([masker(batch_size, CPU) for _ in range(calls)])
    for i, (a, b) in enumerate(zip(*masks)):
        for tensor_name in ("ids_keep", "ids_restore", "masked"):
            assert torch.equal(getattr(a, tensor_name), getattr(b, tensor_name)), (
                f"after resuming, call {i + 1} at step {step} gives another {tensor_name} than the run that went "
                f"on: the masker's state_dict() misses state that decides its masks")


# --- a few training steps ---------------------------------------------------------------------------

@dataclass
class TrainRun:
    """What `train_steps` leaves: the recipe file, the run directory, the final logged metrics, every
    metrics.jsonl line, run.json, and the engine's trainer (model, components, state_dict())."""

    recipe_path: Path
    run_dir: Path
    final: dict[str, float]
    metrics: list[dict[str, Any]]
    facts: dict[str, Any]
    trainer: Any = field(repr=False)


_SLOTS = {"tokenizer": "tokenizer", "masker": "masker", "target": "target", "loss": "losses", "dataset": "data.train"}


def tiny_recipe(name: str, output_dir: str | Path, plugins: Iterable[str] = (), steps: int = 4,
                batch_size: int = 4) -> dict[str, Any]:
    """A pretraining recipe (as a dict) that trains `steps` CPU steps of a one-block ViT on
    `testing.synthetic` data through `testing.patch` (a 4×4 grid of 4×4 patches, 3 channels) with the
    built-in `random` masker, `pixel` target and `mse` loss: one epoch, a checkpoint and a picture."""
    return {
        "task": "pretrain", "name": name, "seed": 0, "plugins": list(dict.fromkeys([PLUGIN_MODULE, *plugins])),
        "tokenizer": {"name": "testing.patch", "options": {}},
        "masker": {"name": "random", "options": {"ratio": 0.75}},
        "target": {"name": "pixel", "options": {}},
        "losses": [{"name": "mse", "weight": 1.0}],
        "model": {"embed_dim": 32, "depth": 1, "num_heads": 2, "decoder_embed_dim": 16, "decoder_depth": 1,
                  "decoder_num_heads": 2},
        "data": {"train": {"name": "testing.synthetic", "options": {"size": steps * batch_size}},
                 "batch_size": batch_size, "num_workers": 0, "pin_memory": False},
        "optim": {"epochs": 1, "lr": 1e-3},
        "runtime": {"device": "cpu", "output_dir": str(output_dir), "log_interval": 1, "progress_bar": False,
                    "tensorboard": False, "visualize_samples": 2},
    }


def train_steps(kind: str | None = None, name: str | None = None, options: dict[str, Any] | None = None, *,
                directory: str | Path, plugins: Iterable[str] = (), steps: int = 4, batch_size: int = 4,
                overrides: Sequence[str] = ()) -> TrainRun:
    """Train `steps` optimizer steps (one epoch, on the CPU, a few seconds) of `tiny_recipe` with the
    component `name` of `kind` swapped in (a loss replaces the `mse` term; a dataset replaces
    `testing.synthetic` and must yield the tokenizer's input shape [3, 16, 16]), through the engine's
    real entry point (`make_task(prepare(recipe.yaml, overrides)).train()`): recipe validation, the
    training loop, the checkpoint, run.json and the epoch's reconstruction picture. `overrides` are
    dotted recipe overrides, e.g. "tokenizer.options.grid=[8, 8]". Writes `directory`/<name>.yaml and
    runs under `directory`/runs/. Fails on any error, on a non-finite loss, or when a step was skipped."""
    from .build import prepare
    from .engine.run import make_task

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    label = re.sub(r"[^A-Za-z0-9_.\-]", "-", f"steps-{kind}-{name}" if kind else "steps")
    recipe = tiny_recipe(label, directory / "runs", plugins, steps, batch_size)
    if kind is not None:
        if kind not in _SLOTS:
            raise ValueError(f"unknown kind {kind!r}; kinds: {', '.join(_SLOTS)}")
        ref = {"name": name, "options": dict(options or {})}
        if kind == "loss":
            recipe["losses"] = [{**ref, "weight": 1.0}]
        elif kind == "dataset":
            recipe["data"]["train"] = ref
        else:
            recipe[kind] = ref
    path = directory / f"{label}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    trainer = make_task(prepare(path, list(overrides)))
    final = trainer.train()
    run_dir = directory / "runs" / label
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics, f"{run_dir}/metrics.jsonl is empty"
    assert math.isfinite(final["loss"]), f"non-finite final loss {final['loss']}"
    assert not final.get("nonfinite_steps"), f"{final['nonfinite_steps']} steps had a non-finite loss or gradient"
    facts = json.loads((run_dir / "run.json").read_text())
    return TrainRun(path, run_dir, final, metrics, facts, trainer)
