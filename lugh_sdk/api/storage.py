"""Hookspecs of a storage backend plugin (plugin API 1.x).

The storage service calls these from one thread, so a backend needs no locking. Keys are
``str``, values ``bytes``; the service enforces the size limits before a backend sees a
write. Keys starting with ``.lugh/`` belong to the service (its stream position): a
backend stores them like any key, but writes them only through ``bookkeeping`` (never
versioned, never rolled back).

**API 1.0** (the minimal set, still accepted): ``storage_open``, ``storage_get``,
``storage_commit``, ``storage_stats``, ``storage_close``. A 1.0 backend gets one sequence
number per group commit and no history, scan, rollback or swap; the service refuses those
requests with a clear error.

**API 1.1** adds, in groups a backend implements whole (the service checks which):

- transactions: ``storage_begin``, ``storage_put``, ``storage_delete``, ``storage_abort``,
  ``storage_commit_group`` (group commit: several transactions, one sync, one sequence
  number each);
- ``storage_scan`` (by key prefix, in key order, paged);
- versions: ``storage_history``, ``storage_versions``, ``storage_as_of`` (what a rollback
  needs), ``storage_compact``;
- handover: ``storage_export``, ``storage_import`` (live swap; the neutral snapshot
  format of :mod:`lugh_sdk.api.storage_base`).

**API 1.2** adds ``storage_check``: the integrity check of ``storage_open``, on its own,
which a hot standby runs while it waits so that the open at its promotion need not (on
a large data set the check is most of an open).

**API 1.3** adds ``storage_position``: what the service needs of ``storage_stats`` to
open (the last sequence number, the horizon, durability) without the counts that grow
with the data set (sqlite-storage: 0.7-1.5 ms for 100 000 keys, warm, more from a cold cache; the position alone 0.02-0.05 ms).

:class:`lugh_sdk.api.storage_base.StagedTransactions` implements the transaction hooks for
a backend that supplies only ``apply_group``. docs/storage.md has the guarantees.
"""

from __future__ import annotations

from lugh_sdk.api.markers import hookspec
from lugh_sdk.api.types import Commit, Version

# The hooks added by API 1.1: a backend may leave them out (in the groups above), and the
# service then refuses what needs them. The 1.0 set is required.
OPTIONAL_HOOKS = (
    "storage_begin", "storage_put", "storage_delete", "storage_abort", "storage_commit_group",
    "storage_scan", "storage_history", "storage_versions", "storage_as_of", "storage_compact",
    "storage_export", "storage_import",
    "storage_check",  # 1.2
    "storage_position",  # 1.3
)

# --- API 1.0 -------------------------------------------------------------------------


@hookspec(firstresult=True)
def storage_open(path: str) -> bool:
    """Open (creating if needed) the data set in directory ``path``. Raise if it is corrupt
    or truncated: a backend must never serve a data set it cannot vouch for."""


@hookspec(firstresult=True)
def storage_get(key: str) -> bytes | None:
    """The committed value of ``key``, or None."""


@hookspec(firstresult=True)
def storage_commit(writes: list[tuple[str, bytes | None]]) -> int:
    """Apply all ``writes`` (value None deletes) atomically and durably; return the
    commit's sequence number. Must not return before the writes are on disk."""


@hookspec(firstresult=True)
def storage_stats() -> dict:
    """Counters for `lugh kv stats`. Expected keys: ``keys``, ``last_seq``; from 1.1 also
    ``horizon`` (the oldest commit a rollback can return to), ``durable`` (False only for
    a backend that keeps nothing across a crash, such as memory-storage) and ``bytes``."""


@hookspec
def storage_close() -> None:
    """Flush and close."""


# --- API 1.1: transactions -------------------------------------------------------------


@hookspec
def storage_begin(txn: int) -> None:
    """Open transaction ``txn`` (a number the service chooses, unique while it is open)."""


@hookspec
def storage_put(txn: int, key: str, value: bytes) -> None:
    """Stage ``key = value`` in open transaction ``txn`` (nothing is visible until commit).
    Raise TypeError for a key that is not str or a value that is not bytes."""


@hookspec
def storage_delete(txn: int, key: str) -> None:
    """Stage the deletion of ``key`` in open transaction ``txn``."""


@hookspec
def storage_abort(txn: int) -> None:
    """Forget open transaction ``txn`` and what it staged (no-op if it is not open)."""


@hookspec(firstresult=True)
def storage_commit_group(txns: list[int], labels: list[str], bookkeeping: dict[str, bytes]) -> list[int]:
    """Commit the open transactions ``txns``, in this order, with one sync (group
    commit), and write ``bookkeeping`` (unversioned) in the same atomic unit.

    Each transaction gets the next sequence number (returned in order) and keeps, for
    every key it changes, the key's value before it (its before-image) with ``label``,
    for history and rollback. Return only once all of it is durable. A crash at any
    moment leaves all of the group or none of it. If this raises, nothing was applied
    and the transactions are still open (the service aborts them). ``txns`` may be empty
    (bookkeeping only): that takes no sequence number."""


# --- API 1.1: reading ------------------------------------------------------------------


@hookspec(firstresult=True)
def storage_scan(prefix: str, after: str, limit: int) -> list[tuple[str, bytes]]:
    """Committed pairs whose key starts with ``prefix`` and sorts after ``after`` (""
    from the start), in key order (code points), at most ``limit`` of them."""


# --- API 1.1: versions -----------------------------------------------------------------


@hookspec(firstresult=True)
def storage_history(limit: int, before: int) -> list[Commit]:
    """The last ``limit`` commits with a sequence number below ``before`` (0: no bound),
    newest first, as far back as history is kept."""


@hookspec(firstresult=True)
def storage_versions(key: str, limit: int) -> list[Version]:
    """The last ``limit`` commits that changed ``key``, newest first, with its value
    before and after each."""


@hookspec(firstresult=True)
def storage_as_of(seq: int) -> list[tuple[str, bytes | None]]:
    """For every key some commit after ``seq`` changed: its value as of commit ``seq``
    (None: it did not exist), sorted by key. Committing these writes restores the state
    as of ``seq``. Raise ``RollbackUnavailable`` if ``seq`` is older than the kept
    history (see ``storage_compact``) or newer than the last commit."""


@hookspec(firstresult=True)
def storage_compact(keep: int) -> dict:
    """Drop the before-images of all but the last ``keep`` commits (rollback cannot go
    further back afterwards) and reclaim space; durable like a commit. Return
    ``{"horizon": oldest seq a rollback can still reach, "removed": commits dropped}``."""


# --- API 1.1: handover (live swap) -----------------------------------------------------


@hookspec(firstresult=True)
def storage_export(path: str) -> dict:
    """Write the whole data set (every key, the last sequence number, the history kept)
    to the file ``path`` in the neutral snapshot format
    (:func:`lugh_sdk.api.storage_base.write_snapshot`), durably. Return
    ``{"last_seq": ..., "keys": ...}``."""


@hookspec(firstresult=True)
def storage_import(path: str) -> dict:
    """Replace this backend's data set with the snapshot at ``path`` (validate it first:
    :func:`lugh_sdk.api.storage_base.read_snapshot` does), durably, keeping its sequence
    numbers and history. Return ``{"last_seq": ..., "keys": ...}``."""


# --- API 1.2 -------------------------------------------------------------------------


@hookspec(firstresult=True)
def storage_check(path: str) -> None:
    """Check the data set in directory ``path`` as ``storage_open`` would, without opening
    it for this process's use (another process may be serving it: a hot standby checks
    while the active incarnation writes). Raise :class:`StorageError` if it is corrupt;
    a data set that does not exist yet passes. After a check of ``path`` that passed, in
    the same process, ``storage_open(path)`` may skip its own check: what was written
    since went through the backend itself."""


# --- API 1.3: the position alone ----------------------------------------------------------


@hookspec(firstresult=True)
def storage_position() -> dict:
    """The open data set's ``last_seq``, ``horizon`` and ``durable``, as ``storage_stats``
    gives them, in a time that does not grow with the data set (no count of keys or
    commits). The service asks for it when it opens the data set, on every restart and
    takeover; a backend without it is asked for ``storage_stats``."""
