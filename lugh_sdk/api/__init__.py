"""The LughOS plugin API: what a plugin vendor programs against.

A plugin is one object (a class, instantiated once per service process, or a module)
whose methods carry ``@hookimpl`` and implement the hookspecs of its kind:
:mod:`lugh_sdk.api.scheduler`, :mod:`lugh_sdk.api.storage`, :mod:`lugh_sdk.api.monitor`.

The API is versioned as MAJOR.MINOR (:data:`PLUGIN_API_VERSION`). A plugin's manifest
names the range it needs (e.g. ``>=1.0,<2``); the host refuses a plugin whose range does
not contain the running version, before it imports a single line of the plugin.
"""

from lugh_sdk.api.markers import hookimpl, hookspec, PROJECT
from lugh_sdk.api.types import Commit, Job, SchedulerState, StateError, StorageError, Task, Version

PLUGIN_API_VERSION = "1.3"  # 1.1: the storage hooks beyond the minimal set; 1.2: storage_check; 1.3: storage_position (lugh_sdk.api.storage)
KINDS = ("scheduler", "storage", "monitor")

__all__ = [
    "PLUGIN_API_VERSION",
    "KINDS",
    "PROJECT",
    "hookimpl",
    "hookspec",
    "Job",
    "Task",
    "SchedulerState",
    "StateError",
    "Commit",
    "Version",
    "StorageError",
]
