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
from .loss import Loss
from .masker import Masker
from .target import Target
from .tokenizer import Tokenizer

KINDS: dict[str, tuple[str, type[Component]]] = {
    # kind: (registration hook, required base class)
    "tokenizer": ("register_tokenizers", Tokenizer),
    "masker": ("register_maskers", Masker),
    "target": ("register_targets", Target),
    "loss": ("register_losses", Loss),
    "dataset": ("register_datasets", Dataset),
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
        for kind, (hook_name, base) in KINDS.items():
            for impl in getattr(pm.hook, hook_name).get_hookimpls():
                self._collect(kind, base, hook_name, impl)

    def _collect(self, kind: str, base: type, hook_name: str, impl: pluggy.HookImpl) -> None:
        plugin = impl.plugin_name
        table = self.entries[kind]

        def register(name: str, cls: type) -> None:
            if not isinstance(name, str) or not _NAME.match(name):
                raise PluginError(f"plugin {plugin!r}: {kind} name {name!r} must be lower-case letters, digits, _ . -")
            if not (isinstance(cls, type) and issubclass(cls, base)):
                raise PluginError(
                    f"plugin {plugin!r} registered {kind} {name!r} as {cls!r}, which is not a subclass of "
                    f"maeframe.{base.__name__}"
                )
            if inspect.isabstract(cls):
                missing = ", ".join(sorted(cls.__abstractmethods__))
                raise PluginError(f"plugin {plugin!r} registered {kind} {name!r} as {cls.__qualname__}, which does "
                                  f"not implement {missing} of maeframe.{base.__name__}")
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
            raise PluginError(f"unknown {kind} {name!r}; registered {plural(kind)}: {known}")
        return table[name]

    @contextlib.contextmanager
    def active(self):
        """Make this registry the one `build` uses (the engine does this while constructing components)."""
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)

    def build(self, kind: str, name: str, options: dict[str, Any], *args: Any) -> Component:
        """Validate `options` for component `name` and construct it with `args` (spec or tokenizer)."""
        entry = self.get(kind, name)
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
    return _current().build(kind, name, options, *args)
