"""Name -> component class tables, filled by the plugins' registration hooks."""
from __future__ import annotations

import contextlib
import inspect
import re
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import pluggy

from .component import Component
from .dataset import Dataset
from .errors import PluginError
from .loss import CrossModalLoss, Loss
from .masker import Masker
from .plugins import PluginManager, plugin_info
from .recipe import component_refs
from .target import Target
from .tokenizer import Tokenizer
from .weights import WeightFormat

KINDS: dict[str, tuple[str, type[Component] | tuple[type[Component], ...]]] = {
    # kind: (registration hook, required base class or classes)
    "tokenizer": ("register_tokenizers", Tokenizer),
    "masker": ("register_maskers", Masker),
    "target": ("register_targets", Target),
    "loss": ("register_losses", (Loss, CrossModalLoss)),  # per-modality losses and joint_losses
    "dataset": ("register_datasets", Dataset),
    "weight_format": ("register_weight_formats", WeightFormat),
}
_ACTIVE: ContextVar[Registry | None] = ContextVar("maeframe_registry", default=None)
_NAME = re.compile(r"^[a-z][a-z0-9_.\-]*$")


def plural(kind: str) -> str:
    """'masker' -> 'maskers', 'loss' -> 'losses' (for messages and listings)."""
    return f"{kind}es" if kind.endswith("s") else f"{kind}s"


@dataclass(frozen=True)
class Entry:
    """One registered component: its class and the plugin that registered it."""

    name: str
    cls: type[Component]
    plugin: str


class Registry:
    """Looks up components by kind and name; unknown and duplicate names are errors naming plugins."""

    def __init__(self, pm: pluggy.PluginManager):
        self.pm = pm
        self.entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
        self.built: dict[tuple[str, str], None] = {}  # (kind, name) that `build` constructed, in order
        for kind, (hook_name, base) in KINDS.items():
            for impl in getattr(pm.hook, hook_name).get_hookimpls():
                self._collect(kind, base, hook_name, impl)

    def _collect(self, kind: str, base: type | tuple[type, ...], hook_name: str, impl: pluggy.HookImpl) -> None:
        plugin = impl.plugin_name
        bases = " or ".join(f"maeframe.{b.__name__}" for b in (base if isinstance(base, tuple) else (base,)))
        table = self.entries[kind]

        def register(name: str, cls: type) -> None:
            if not isinstance(name, str) or not _NAME.match(name):
                raise PluginError(f"plugin {plugin!r}: {kind} name {name!r} must be lower-case letters, digits, _ . -")
            if not (isinstance(cls, type) and issubclass(cls, base)):
                raise PluginError(
                    f"plugin {plugin!r} registered {kind} {name!r} as {cls!r}, which is not a subclass of "
                    f"{bases}"
                )
            if inspect.isabstract(cls):
                missing = ", ".join(sorted(cls.__abstractmethods__))
                raise PluginError(f"plugin {plugin!r} registered {kind} {name!r} as {cls.__qualname__}, which does "
                                  f"not implement {missing} of {bases}")
            if name in table:
                raise PluginError(
                    f"{kind} {name!r} is registered twice: by plugin {table[name].plugin!r} and by plugin {plugin!r}"
                )
            table[name] = Entry(name, cls, plugin)

        try:
            impl.function(register=register)
        except PluginError:
            raise
        except Exception as err:
            raise PluginError(f"plugin {plugin!r} failed in {hook_name}: {type(err).__name__}: {err}") from err

    def get(self, kind: str, name: str) -> Entry:
        table = self.entries[kind]
        if name not in table:
            known = ", ".join(sorted(table)) or "none"
            raise PluginError(f"unknown {kind} {name!r}; registered {plural(kind)}: {known}{self._load_note()}")
        return table[name]

    def _load_note(self) -> str:
        """' (MAEFRAME_BLOCK_PLUGINS=masking blocks: masking)' when a block or allow list is in force."""
        if not isinstance(self.pm, PluginManager) or not self.pm.control.active:
            return ""
        return f" ({self.pm.load_note()})"

    def provenance(self, recipe: Any) -> dict[str, dict[str, str | None]]:
        """Where each component the recipe uses comes from, by field path ("masker", "losses.0",
        "data.train"): {"name", "plugin", "distribution", "version", "module"}, where distribution and
        version are those of the installed distribution that ships the plugin (None for a module that is
        not installed; version then falls back to the module's `__version__`) and module is the class's
        `module.qualname`. Components that others built by name while the recipe was prepared (a
        curriculum's strategies) follow under "built/<kind>/<name>". Recorded in run.json and checkpoints."""
        used = [(path, kind, ref.name) for path, kind, ref in component_refs(recipe)]
        used += [(f"built/{kind}/{name}", kind, name) for kind, name in self.built]
        out: dict[str, dict[str, str | None]] = {}
        for path, kind, name in used:
            entry = self.get(kind, name)
            info = plugin_info(self.pm, entry.plugin)
            out[path] = {"name": name, "plugin": entry.plugin,
                         "distribution": info.distribution if info else None,
                         "version": info.version if info else None,
                         "module": f"{entry.cls.__module__}.{entry.cls.__qualname__}"}
        return out

    @contextlib.contextmanager
    def active(self):
        """Make this registry the one `build` uses (the engine does this while constructing components)."""
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)

    def construct(self, kind: str, name: str, options: dict[str, Any], *args: Any) -> Component:
        """Validate `options` for component `name` and construct it with `args` (spec or tokenizer)."""
        entry = self.get(kind, name)
        self.built[(kind, name)] = None
        return entry.cls(entry.cls.Options.model_validate(options), *args)


def _current() -> Registry:
    """The registry a recipe is being prepared with, else one of every installed plugin."""
    registry = _ACTIVE.get()
    if registry is None:
        from .plugins import make_plugin_manager

        registry = Registry(make_plugin_manager())
    return registry


def component_class(kind: str, name: str) -> type[Component]:
    """The class registered as `name` of `kind` ("masker", "dataset", ...): the recipe's registry while one is
    being prepared, else the installed plugins'. Unknown names are a PluginError listing the known ones."""
    return _current().get(kind, name).cls


def build_component(kind: str, name: str, options: dict[str, Any], *args: Any) -> Component:
    """Construct a registered component by name, its `options` validated (pydantic's ValidationError
    otherwise), e.g. the maskers a curriculum masker wraps, or a dataset a command reads. `args` are the
    kind's constructor arguments (spec, tokenizer, or input_shape and train)."""
    return _current().construct(kind, name, options, *args)
