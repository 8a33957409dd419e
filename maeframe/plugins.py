"""The plugin manager: built-ins and installed plugins via entry points, plus modules a recipe names.

Which plugins load is under the operator's control through two environment variables, each a
comma-separated list of plugin names:

* `MAEFRAME_BLOCK_PLUGINS`: these never load;
* `MAEFRAME_LOAD_PLUGINS`: when set (even to the empty string), only these load.

A plugin can be named by its plugin name (the entry point's name, or the import name of a recipe module),
by its module, or by its distribution (`maeframe` names every built-in). Both lists apply to installed
plugins and to the modules a recipe lists under `plugins:` alike; a blocked or unlisted module is not even
imported. A name that matches no plugin is a warning, never silently ignored.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, replace
from functools import lru_cache
from importlib.metadata import EntryPoint, entry_points

import pluggy

from . import hookspecs
from .errors import PluginError

ENTRY_POINT_GROUP = "maeframe"
COMMANDS_GROUP = "maeframe_commands"  # modules implementing `register_commands` (loaded to parse the command line)
BLOCK_ENV = "MAEFRAME_BLOCK_PLUGINS"
"""Comma-separated plugins that must not load (plugin, module or distribution names)."""
LOAD_ENV = "MAEFRAME_LOAD_PLUGINS"
"""Comma-separated plugins that may load; when set (even empty), no other plugin loads."""

log = logging.getLogger("maeframe.plugins")
_warned: set[tuple[str, ...]] = set()  # warnings already given in this process (one per list and value)


def normalize_distribution(name: str) -> str:
    """PEP 503 normalised distribution name: 'Maeframe_Plugin.Example' -> 'maeframe-plugin-example'."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class PluginInfo:
    """One plugin maeframe found, loaded or not.

    name: the plugin name (entry-point name, or import name of a recipe module); module: where its hook
    implementations live; distribution / version: the installed distribution that ships it (None for a
    module that is not part of one); source: "entry point", or "module" (imported by name: a recipe's
    `plugins:`, `maeframe plugins --module`); status: "loaded", "blocked"
    (named in MAEFRAME_BLOCK_PLUGINS) or "not allowed" (MAEFRAME_LOAD_PLUGINS is set and does not name it).
    """

    name: str
    module: str
    distribution: str | None
    version: str | None
    source: str
    status: str = "loaded"

    def named_by(self, name: str) -> bool:
        """Whether a block- or allow-list entry names this plugin (plugin, module or distribution name)."""
        return name in (self.name, self.module) or (
            self.distribution is not None and normalize_distribution(name) == normalize_distribution(self.distribution))

    @property
    def origin(self) -> str:
        """'maeframe 0.1.0', or 'no distribution, version 1.2' for a module that is not installed."""
        if self.distribution is None:
            return "no distribution" + (f", version {self.version}" if self.version else "")
        return f"{self.distribution} {self.version}"


@dataclass(frozen=True)
class LoadControl:
    """The block list and the allow list (None: the variable is not set)."""

    block: tuple[str, ...] = ()
    allow: tuple[str, ...] | None = None

    @classmethod
    def from_env(cls) -> LoadControl:
        allow = os.environ.get(LOAD_ENV)
        return cls(_split(os.environ.get(BLOCK_ENV, "")), None if allow is None else _split(allow))

    @property
    def active(self) -> bool:
        return bool(self.block) or self.allow is not None

    def status(self, info: PluginInfo) -> str:
        """The status a plugin gets under the lists: "loaded", "blocked" or "not allowed"."""
        if any(info.named_by(name) for name in self.block):
            return "blocked"
        if self.allow is not None and not any(info.named_by(name) for name in self.allow):
            return "not allowed"
        return "loaded"


def _split(value: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(name.strip() for name in value.split(",") if name.strip()))


class PluginManager(pluggy.PluginManager):
    """pluggy's manager plus what maeframe knows about each plugin (`infos`, by plugin name: module,
    distribution, version, loaded or skipped) and the block/allow lists it was built under (`control`)."""

    def __init__(self, control: LoadControl | None = None, group: str = ENTRY_POINT_GROUP):
        super().__init__(ENTRY_POINT_GROUP)
        self.group = group
        self.add_hookspecs(hookspecs)
        self.control = control if control is not None else LoadControl.from_env()
        self.infos: dict[str, PluginInfo] = {}

    def label(self, plugin: object) -> str:
        return self.get_name(plugin) or getattr(plugin, "__name__", repr(plugin))

    def add(self, plugin: object, name: str) -> None:
        try:
            self.register(plugin, name=name)
        except pluggy.PluginValidationError as err:
            raise PluginError(f"plugin {name!r} is invalid: {err}") from err

    def load_note(self) -> str:
        """What the block and allow lists did, for messages about components that are not there:
        'MAEFRAME_BLOCK_PLUGINS=masking blocks: masking; MAEFRAME_LOAD_PLUGINS=image is set: only the plugins
        it names load, 16 others found do not'."""
        parts = []
        if self.control.block:
            blocked = [info.name for info in self.infos.values() if info.status == "blocked"]
            parts.append(f"{BLOCK_ENV}={','.join(self.control.block)} blocks: {', '.join(blocked) or 'no plugin found'}")
        if self.control.allow is not None:
            others = sum(info.status == "not allowed" for info in self.infos.values())
            if self.control.allow:
                parts.append(f"{LOAD_ENV}={','.join(self.control.allow)} is set: only the plugins it names load, "
                             f"{others} other{'s' if others != 1 else ''} found {'do' if others != 1 else 'does'} not")
            else:
                parts.append(f"{LOAD_ENV} is set and empty: none of the {others} plugins found loads")
        return "; ".join(parts)

    def _admit(self, info: PluginInfo) -> bool:
        """Record `info` with its status under the lists; True when it may load."""
        status = self.control.status(info)
        self.infos[info.name] = replace(info, status=status)
        if status != "loaded":
            self.set_blocked(info.name)
        return status == "loaded"

    def load_entry_points(self) -> None:
        for ep in _entry_points(self.group):
            if ep.name in self.infos:  # the same distribution visible twice on sys.path
                continue
            dist = ep.dist
            info = PluginInfo(ep.name, ep.module, dist.name if dist else None, dist.version if dist else None,
                              "entry point")
            if not self._admit(info):
                continue
            where = info.origin if dist else "unknown distribution"
            try:
                plugin = ep.load()
            except Exception as err:
                raise PluginError(f"plugin {ep.name!r} ({where}, entry point {ep.value!r}) failed to import: "
                                  f"{type(err).__name__}: {err}") from err
            self.add(plugin, ep.name)

    def load_modules(self, module_names: Iterable[str]) -> None:
        for module_name in module_names:
            if self.has_plugin(module_name) or module_name in self.infos:
                continue
            if any(info.source == "entry point" and info.module == module_name for info in self.infos.values()):
                # an installed plugin's module: loaded through its entry point, or skipped under one of the
                # names it shares with it (plugin, module, distribution), so blocked whatever the recipe says
                continue
            info = PluginInfo(module_name, module_name, *_module_distribution(module_name), "module")
            if not self._admit(info):
                continue
            try:
                module = importlib.import_module(module_name)
            except Exception as err:
                raise PluginError(f"plugin module {module_name!r} (recipe field 'plugins') failed to import: "
                                  f"{type(err).__name__}: {err}") from err
            if not self.is_registered(module):  # already loaded through its entry point
                self.add(module, module_name)
            if info.version is None and isinstance(getattr(module, "__version__", None), str):
                self.infos[module_name] = replace(self.infos[module_name], version=module.__version__)

    def warn_unknown_names(self) -> None:
        """A warning for every block- or allow-list entry that names no plugin found here (nor an importable
        module, which another recipe's `plugins:` may list): probably a typo."""
        for env, names in ((BLOCK_ENV, self.control.block), (LOAD_ENV, self.control.allow or ())):
            unknown = [name for name in names
                       if not any(info.named_by(name) for info in self.infos.values()) and not _importable(name)]
            key = (env, ",".join(names), *unknown)
            if unknown and key not in _warned:
                _warned.add(key)
                known = sorted({info.name for info in self.infos.values()})
                log.warning("%s names no plugin: %s (plugins found: %s; a plugin is named by its plugin name, "
                            "its module or its distribution)", env, ", ".join(map(repr, unknown)),
                            ", ".join(known) or "none")


def _entry_points(group: str = ENTRY_POINT_GROUP) -> list[EntryPoint]:
    return list(entry_points(group=group))


def _importable(name: str) -> bool:
    """A top-level module that exists (checked without importing anything)."""
    if "." in name or not name.isidentifier():
        return False
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@lru_cache(maxsize=4)
def _packages_distributions(search_path: tuple[str, ...]) -> dict[str, list[str]]:
    """Top-level import name -> distributions, for one sys.path (scanning every distribution is slow)."""
    from importlib.metadata import packages_distributions

    return packages_distributions()


def _module_distribution(module_name: str) -> tuple[str | None, str | None]:
    """(distribution, version) of the installed distribution that ships `module_name`'s top-level package,
    or (None, None) for a module that is not installed (a file on PYTHONPATH)."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in _packages_distributions(tuple(sys.path)).get(module_name.partition(".")[0], []):
        try:
            return dist, version(dist)
        except PackageNotFoundError:
            continue
    return None, None


def make_plugin_manager(extra_modules: Iterable[str] = (), control: LoadControl | None = None) -> PluginManager:
    """Load every plugin from the "maeframe" entry-point group, then `extra_modules` (import names).

    Plugins named in $MAEFRAME_BLOCK_PLUGINS, or left out of $MAEFRAME_LOAD_PLUGINS when that is set, are
    skipped (and recorded in `pm.infos`). Hook implementations that match no hookspec (usually a typo) are
    errors naming the plugin. `control` replaces the lists read from the environment.
    """
    pm = PluginManager(control)
    pm.load_entry_points()
    pm.load_modules(extra_modules)
    pm.warn_unknown_names()
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as err:
        raise PluginError(f"plugin {pm.label(err.plugin)!r} implements an unknown hook: {err}") from err
    return pm


def make_command_manager() -> PluginManager:
    """The plugins that add subcommands: the `maeframe_commands` entry-point group, under the same block and
    allow lists as every plugin."""
    pm = PluginManager(group=COMMANDS_GROUP)
    pm.load_entry_points()
    return pm


def plugin_info(pm: pluggy.PluginManager, plugin_name: str) -> PluginInfo | None:
    return pm.infos.get(plugin_name) if isinstance(pm, PluginManager) else None


def plugin_distribution(pm: pluggy.PluginManager, plugin_name: str) -> str | None:
    """'dist-name version' of the installed distribution that provided a plugin, if it came from one."""
    info = plugin_info(pm, plugin_name)
    return f"{info.distribution} {info.version}" if info is not None and info.distribution else None


def plugin_hooks(pm: pluggy.PluginManager, plugin: object) -> list[str]:
    """The names of the hooks a loaded plugin implements, sorted."""
    return sorted(caller.name for caller in pm.get_hookcallers(plugin) or [])
