"""The plugin manager: built-ins and installed plugins via entry points, plus modules a recipe names."""
from __future__ import annotations

import importlib
import os
from collections.abc import Iterable

import pluggy

from . import hookspecs
from .errors import PluginError

ENTRY_POINT_GROUP = "maeframe"
BLOCK_ENV = "MAEFRAME_BLOCK_PLUGINS"
"""Comma-separated plugin names (entry-point names or module names) that must not load."""


def blocked_plugins() -> set[str]:
    return {name.strip() for name in os.environ.get(BLOCK_ENV, "").split(",") if name.strip()}


def make_plugin_manager(extra_modules: Iterable[str] = ()) -> pluggy.PluginManager:
    """Load every plugin from the "maeframe" entry-point group and then `extra_modules` (import names).

    Plugins named in $MAEFRAME_BLOCK_PLUGINS are skipped. Hook implementations that match no hookspec
    (usually a typo) are errors naming the plugin.
    """
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    for name in blocked_plugins():
        pm.set_blocked(name)
    try:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    except pluggy.PluginValidationError as err:
        raise PluginError(f"plugin {err.plugin_name!r} is invalid: {err}") from err
    for module_name in extra_modules:
        if pm.is_blocked(module_name) or pm.has_plugin(module_name):
            continue
        try:
            module = importlib.import_module(module_name)
        except Exception as err:
            raise PluginError(f"plugin module {module_name!r} (recipe field 'plugins') failed to import: {err}") from err
        try:
            pm.register(module, name=module_name)
        except pluggy.PluginValidationError as err:
            raise PluginError(f"plugin {module_name!r} is invalid: {err}") from err
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as err:
        raise PluginError(f"plugin {err.plugin_name!r} implements an unknown hook: {err}") from err
    return pm


def plugin_distribution(pm: pluggy.PluginManager, plugin_name: str) -> str | None:
    """'dist-name version' of the installed distribution that provided a plugin, if it came from one."""
    plugin = pm.get_plugin(plugin_name)
    for plugin_obj, dist in pm.list_plugin_distinfo():
        if plugin_obj is plugin:
            return f"{dist.project_name} {dist.version}"
    return None
