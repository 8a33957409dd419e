"""The plugin manager: built-ins and installed plugins via entry points, plus modules a recipe names."""
from __future__ import annotations

import importlib
import os
from collections.abc import Iterable
from importlib.metadata import entry_points

import pluggy

from . import hookspecs
from .errors import PluginError

ENTRY_POINT_GROUP = "maeframe"
COMMANDS_GROUP = "maeframe_commands"  # modules implementing `register_commands` (loaded to parse the command line)
BLOCK_ENV = "MAEFRAME_BLOCK_PLUGINS"
"""Comma-separated plugin names that must not load: entry-point names of installed plugins, or module
names listed in a recipe's `plugins:` field."""


class PluginManager(pluggy.PluginManager):
    """pluggy's manager plus the distribution ('name version') each entry-point plugin came from."""

    def __init__(self, group: str = ENTRY_POINT_GROUP):
        super().__init__(ENTRY_POINT_GROUP)
        self.group = group
        self.add_hookspecs(hookspecs)
        self.distributions: dict[str, str] = {}

    def label(self, plugin: object) -> str:
        return self.get_name(plugin) or getattr(plugin, "__name__", repr(plugin))

    def add(self, plugin: object, name: str) -> None:
        try:
            self.register(plugin, name=name)
        except pluggy.PluginValidationError as err:
            raise PluginError(f"plugin {name!r} is invalid: {err}") from err

    def load_entry_points(self) -> None:
        for ep in entry_points(group=self.group):
            if self.is_blocked(ep.name) or self.has_plugin(ep.name):
                continue
            dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist else "unknown distribution"
            try:
                plugin = ep.load()
            except Exception as err:
                raise PluginError(f"plugin {ep.name!r} ({dist}, entry point {ep.value!r}) failed to import: "
                                  f"{type(err).__name__}: {err}") from err
            self.add(plugin, ep.name)
            self.distributions[ep.name] = dist

    def load_modules(self, module_names: Iterable[str]) -> None:
        for module_name in module_names:
            if self.is_blocked(module_name) or self.has_plugin(module_name):
                continue
            try:
                module = importlib.import_module(module_name)
            except Exception as err:
                raise PluginError(f"plugin module {module_name!r} (recipe field 'plugins') failed to import: "
                                  f"{type(err).__name__}: {err}") from err
            if not self.is_registered(module):  # already loaded through its entry point
                self.add(module, module_name)


def blocked_plugins() -> set[str]:
    return {name.strip() for name in os.environ.get(BLOCK_ENV, "").split(",") if name.strip()}


def make_plugin_manager(extra_modules: Iterable[str] = ()) -> PluginManager:
    """Load every plugin from the "maeframe" entry-point group, then `extra_modules` (import names).

    Plugins named in $MAEFRAME_BLOCK_PLUGINS are skipped. Hook implementations that match no hookspec
    (usually a typo) are errors naming the plugin.
    """
    pm = PluginManager()
    for name in blocked_plugins():
        pm.set_blocked(name)
    pm.load_entry_points()
    pm.load_modules(extra_modules)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as err:
        raise PluginError(f"plugin {pm.label(err.plugin)!r} implements an unknown hook: {err}") from err
    return pm


def make_command_manager() -> PluginManager:
    """The plugins that add subcommands: the `maeframe_commands` entry-point group, block list applied."""
    pm = PluginManager(COMMANDS_GROUP)
    for name in blocked_plugins():
        pm.set_blocked(name)
    pm.load_entry_points()
    return pm


def plugin_distribution(pm: PluginManager, plugin_name: str) -> str | None:
    """'dist-name version' of the installed distribution that provided a plugin, if it came from one."""
    return pm.distributions.get(plugin_name)
