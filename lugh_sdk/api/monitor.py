"""Hookspecs of a monitor plugin (plugin API 1.x).

The kernel sends a monitor events (service up/down, deadline misses, swaps) on the LOW
lane; a monitor must never be able to slow the kernel down.
"""

from __future__ import annotations

from lugh_sdk.api.markers import hookspec


@hookspec
def monitor_event(kind: str, data: dict, at: float) -> None:
    """An event happened at ``at`` (kernel monotonic seconds)."""


@hookspec(firstresult=True)
def monitor_report() -> dict:
    """What the monitor has to say, shown by `lugh status`."""
