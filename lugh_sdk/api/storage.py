"""Hookspecs of a storage backend plugin (plugin API 1.x, minimal set).

The storage service calls these from one thread. ``storage_commit`` must not return
before the writes are durable: the service acknowledges a commit only after it returns.
"""

from __future__ import annotations

from lugh_sdk.api.markers import hookspec


@hookspec(firstresult=True)
def storage_open(path: str) -> bool:
    """Open (creating if needed) the data set in directory ``path``; raise on corruption."""


@hookspec(firstresult=True)
def storage_get(key: str) -> bytes | None:
    """The committed value of ``key``, or None."""


@hookspec(firstresult=True)
def storage_commit(writes: list[tuple[str, bytes | None]]) -> int:
    """Apply all ``writes`` (value None deletes) atomically and durably; return the
    commit's sequence number. Several clients' writes may arrive in one call (group
    commit): all or none of them are applied."""


@hookspec(firstresult=True)
def storage_stats() -> dict:
    """Counters for `lugh status` (keys, commits, bytes...)."""


@hookspec
def storage_close() -> None:
    """Flush and close."""
