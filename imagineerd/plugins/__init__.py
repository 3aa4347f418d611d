"""Plugin loading, in one place: hookspecs, built-in default plugins, entry points."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable

import pluggy

from .. import hookspecs

log = logging.getLogger(__name__)

#: Built-in plugins, registered before third-party entry points. Their hookimpls use
#: ``trylast=True`` where a third party should be able to take precedence.
DEFAULT_PLUGINS = (
    "imagineerd.backends.diffusers_backend",
    "imagineerd.plugins.yaml_prompts",
    "imagineerd.plugins.txt_prompts",
)


def get_plugin_manager(
    extra_plugins: Iterable[object] = (), *, entry_points: bool = True
) -> pluggy.PluginManager:
    """Build the PluginManager: hookspecs, defaults, ``imagineerd`` entry points, extras.

    ``check_pending()`` makes a misspelt hook name in any plugin fail here, at start-up,
    instead of silently never being called.
    """
    pm = pluggy.PluginManager("imagineerd")
    pm.add_hookspecs(hookspecs)
    for name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    if entry_points:
        loaded = pm.load_setuptools_entrypoints("imagineerd")
        if loaded:
            log.info("loaded %d plugin(s) from entry points", loaded)
    for plugin in extra_plugins:
        pm.register(plugin)
    pm.check_pending()
    return pm
