"""Load a plugin the way the service host does: one pluggy PluginManager for the
``lugh`` project, the hookspecs of the plugin's kind and nothing else, the plugin
registered under its name, ``check_pending`` so that a hookimpl matching no hookspec is
an error (``kernel/services/host.py`` does exactly this after verifying the files).

On top, :func:`hook_coverage` says which hooks of the kind a plugin implements, and
points at the usual mistake: a method named like a hook but not marked ``@hookimpl``
(pluggy silently ignores it; an override of an inherited hook loses the marker too).
"""

from __future__ import annotations

import importlib
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pluggy

from lugh_sdk.api import KINDS, PROJECT

SPEC_MARK = PROJECT + "_spec"
IMPL_MARK = PROJECT + "_impl"


def hookspec_module(kind: str) -> types.ModuleType:
    if kind not in KINDS:
        raise ValueError(f"unknown plugin kind {kind!r} (one of {', '.join(KINDS)})")
    return importlib.import_module(f"lugh_sdk.api.{kind}")


def hook_names(kind: str) -> list[str]:
    """The hooks of ``kind``, as the running API defines them."""
    module = hookspec_module(kind)
    return sorted(n for n in dir(module) if hasattr(getattr(module, n), SPEC_MARK))


# The groups of plugin API 1.1 that a storage backend implements whole or not at all,
# as the storage service (kernel/services/storage.py, ``Backend``) tells them apart. Used
# only while lugh_sdk/api/storage.py does not publish its own ``HOOK_GROUPS``.
_STORAGE_GROUPS = {
    "transactions": ("storage_begin", "storage_put", "storage_delete", "storage_abort", "storage_commit_group"),
    "scan": ("storage_scan",),
    "versions": ("storage_history", "storage_versions", "storage_as_of"),
    "compact": ("storage_compact",),
    "handover": ("storage_export", "storage_import"),
    "check": ("storage_check",),  # API 1.2
    "position": ("storage_position",),  # API 1.3
}


def hook_groups(kind: str) -> dict[str, tuple[str, ...]]:
    """Optional groups of hooks of ``kind``: a plugin implements each whole or not at
    all (a hookspec module lists them in ``HOOK_GROUPS``); every other hook is required."""
    module = hookspec_module(kind)
    groups = getattr(module, "HOOK_GROUPS", None)
    if groups is None and kind == "storage":
        groups = _STORAGE_GROUPS
    names = set(hook_names(kind))
    return {group: tuple(h for h in hooks if h in names) for group, hooks in (groups or {}).items()}


def optional_hooks(kind: str) -> set[str]:
    """Hooks a plugin of ``kind`` may leave out (those of the optional groups)."""
    return {h for hooks in hook_groups(kind).values() for h in hooks}


def factory_of(plugin: Any) -> Callable[[], Any]:
    """A class gives a fresh instance per use (as the host instantiates it once per
    service process); any other object (a module, an instance) is used as it is."""
    if isinstance(plugin, type):
        return plugin
    return lambda: plugin


def plugin_manager(kind: str, plugin: Any, name: str | None = None) -> pluggy.PluginManager:
    """A PluginManager holding ``plugin`` (an object, or a class to instantiate) with
    the hookspecs of ``kind``, as the service host builds it."""
    obj = plugin() if isinstance(plugin, type) else plugin
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspec_module(kind))
    pm.register(obj, name=name or getattr(obj, "__name__", None) or type(obj).__name__)
    pm.check_pending()
    return pm


@dataclass(frozen=True)
class HookCoverage:
    kind: str
    implemented: tuple[str, ...]
    missing: tuple[str, ...]  # required hooks the plugin does not implement
    unmarked: tuple[str, ...]  # hooks defined as methods without @hookimpl (so not seen)
    groups: tuple[str, ...] = ()  # optional groups implemented whole
    partial: tuple[str, ...] = ()  # optional groups implemented in part: "group (missing: a, b)"

    @property
    def complete(self) -> bool:
        return not (self.missing or self.partial or self.unmarked)

    def problem(self) -> str:
        """One line saying what is wrong ('' when complete)."""
        parts = []
        if self.missing:
            parts.append(f"{self.kind} hooks not implemented: {', '.join(self.missing)}")
        if self.partial:
            parts.append(f"hook groups implemented only in part (implement each whole or not at all): "
                         f"{'; '.join(self.partial)}")
        if self.unmarked:
            parts.append(f"{', '.join(self.unmarked)} defined without @hookimpl: pluggy ignores a method "
                         "that is not marked, also when it overrides an inherited hook")
        return "; ".join(parts)


def hook_coverage(pm: pluggy.PluginManager, kind: str) -> HookCoverage:
    plugins = pm.get_plugins()
    if len(plugins) != 1:
        raise ValueError(f"expected one registered plugin, found {len(plugins)}")
    (plugin,) = plugins
    implemented = {caller.name for caller in pm.get_hookcallers(plugin) or ()}
    groups = hook_groups(kind)
    required = [n for n in hook_names(kind) if n not in optional_hooks(kind)]
    missing = tuple(n for n in required if n not in implemented)
    whole = tuple(g for g, hooks in groups.items() if hooks and all(h in implemented for h in hooks))
    partial = tuple(f"{g} (missing: {', '.join(h for h in hooks if h not in implemented)})"
                    for g, hooks in groups.items() if g not in whole and any(h in implemented for h in hooks))
    absent = missing + tuple(h for g, hooks in groups.items() if g not in whole for h in hooks)
    unmarked = tuple(n for n in absent if callable(getattr(plugin, n, None))
                     and not hasattr(getattr(plugin, n), IMPL_MARK))
    return HookCoverage(kind=kind, implemented=tuple(sorted(implemented)), missing=missing, unmarked=unmarked,
                        groups=whole, partial=partial)
