"""Plugins: models and dataset adapters that live outside the busbench package.

A plugin is an importable Python module that registers models (:func:`busbench.models.registry.register_model`)
and/or dataset adapters (:func:`busbench.data.adapters.register_adapter`) when it is imported. busbench imports
plugins from two places, the first time a registry is read:

- the ``BUSBENCH_PLUGINS`` environment variable: module names separated by commas
  (``BUSBENCH_PLUGINS=my_lab.models,my_lab.hospital``), found on the ordinary import path (``PYTHONPATH``);
- the ``busbench.plugins`` entry-point group of installed distributions, whose values name modules
  (in ``pyproject.toml``: ``[project.entry-points."busbench.plugins"]`` then ``my_lab = "my_lab.busbench_plugin"``).

A plugin that cannot be imported is one :class:`~busbench.errors.ConfigError` naming the module, where it was
declared and the fix. Every registered model and adapter records its source (:func:`source_of`), which
``busbench models`` shows.

This module sits at the bottom of the layers (it imports only the standard library and :mod:`busbench.errors`);
the registries call :func:`load_plugins`, never the other way round.
"""

from __future__ import annotations

import importlib
import os
import threading
from dataclasses import dataclass
from importlib import metadata

from busbench.errors import BusbenchError, ConfigError

ENV_VAR = "BUSBENCH_PLUGINS"
ENTRY_POINT_GROUP = "busbench.plugins"
BUILTIN_SOURCE = "busbench"


@dataclass(frozen=True)
class Plugin:
    """One imported plugin module and where it was declared."""

    module: str
    origin: str  # "BUSBENCH_PLUGINS" or "entry point <name> (<distribution>)"

    @property
    def source(self) -> str:
        return f"plugin {self.module} ({self.origin})"


_lock = threading.RLock()
_loaded: dict[str, Plugin] = {}  # module name -> plugin, in import order
_datasets: dict[str, str] = {}  # dataset key -> module of its adapter, as registered
_state = {"done": False, "loading": False}


def declared_plugins() -> list[Plugin]:
    """Plugins declared by ``$BUSBENCH_PLUGINS`` and the ``busbench.plugins`` entry points (not imported)."""
    found: dict[str, Plugin] = {}
    for name in os.environ.get(ENV_VAR, "").split(","):
        name = name.strip()
        if name and name not in found:
            found[name] = Plugin(name, ENV_VAR)
    for entry in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        module = entry.value.split(":", 1)[0].strip()
        dist = getattr(entry, "dist", None)
        where = f" ({dist.name})" if dist is not None and getattr(dist, "name", None) else ""
        if module and module not in found:
            found[module] = Plugin(module, f"entry point {entry.name}{where}")
    return list(found.values())


def load_plugins() -> list[Plugin]:
    """Import every declared plugin once; returns the plugins imported so far, in import order.

    Re-entrant: a plugin that reads a registry while it is being imported does not import itself again. Raises
    ConfigError naming the module when one cannot be imported (a missing module, or an error inside it).
    """
    with _lock:
        if _state["done"] or _state["loading"]:
            return list(_loaded.values())
        _state["loading"] = True
        try:
            for plugin in declared_plugins():
                if plugin.module in _loaded:
                    continue
                _import(plugin)
                _loaded[plugin.module] = plugin
            _state["done"] = True
        finally:
            _state["loading"] = False
        return list(_loaded.values())


def _import(plugin: Plugin) -> None:
    try:
        importlib.import_module(plugin.module)
    except ModuleNotFoundError as exc:
        if exc.name and (plugin.module == exc.name or plugin.module.startswith(exc.name + ".")):
            raise ConfigError(
                f"plugin module {plugin.module!r} (from {plugin.origin}) cannot be found; add the folder that holds "
                f"it to PYTHONPATH, install its package, or remove it from {plugin.origin.split(' ')[0]}"
            ) from None
        raise ConfigError(
            f"plugin module {plugin.module!r} (from {plugin.origin}) failed to import: it needs module "
            f"{exc.name!r}, which is not installed"
        ) from exc
    except Exception as exc:
        if isinstance(exc, BusbenchError):  # e.g. a key registered twice: its message already names the fix
            raise
        raise ConfigError(
            f"plugin module {plugin.module!r} (from {plugin.origin}) failed to import: "
            f"{type(exc).__name__}: {exc}; fix the module or remove it from {plugin.origin.split(' ')[0]}"
        ) from exc


def source_of(module: str) -> str:
    """Where code in ``module`` comes from: ``"busbench"``, ``"plugin <module> (<origin>)"`` or the module name."""
    if module == "busbench" or module.startswith("busbench."):
        return BUILTIN_SOURCE
    for plugin in _loaded.values():
        if module == plugin.module or module.startswith(plugin.module + "."):
            return plugin.source
    for plugin in declared_plugins() if _state["loading"] else ():
        if module == plugin.module or module.startswith(plugin.module + "."):
            return plugin.source
    return module


def record_dataset(key: str, module: str) -> None:
    """Note that an adapter for dataset ``key`` was registered from ``module`` (called by the adapter registry).

    Kept here, below the data layer, so that configs can accept plugin dataset keys without importing it.
    """
    _datasets[key] = module


def dataset_sources() -> dict[str, str]:
    """Dataset key -> source (:func:`source_of`) of every adapter registered so far."""
    return {key: source_of(module) for key, module in sorted(_datasets.items())}


def reset() -> None:
    """Forget which plugins were imported, so the next :func:`load_plugins` reads the declarations again.

    Already imported modules stay in ``sys.modules`` and their registrations stay; meant for tests.
    """
    with _lock:
        _loaded.clear()
        _state["done"] = False
