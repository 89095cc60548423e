"""Values that cross the plugin API. They are msgspec Structs so that the very same
objects travel over IPC, schema-checked, without a conversion layer.

Times are seconds on the kernel's monotonic clock (or on the simulated clock of the SDK
harness); a plugin must never read the wall clock to make a decision.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

Name = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")]
PositiveMs = Annotated[float, msgspec.Meta(gt=0, le=3_600_000)]
Priority = Annotated[int, msgspec.Meta(ge=0, le=255)]


class Task(msgspec.Struct, frozen=True, kw_only=True):
    """A periodic real-time task. Larger ``priority`` means more important."""

    name: Name
    period_ms: PositiveMs
    deadline_ms: PositiveMs
    budget_ms: PositiveMs
    priority: Priority = 0
    action: Annotated[str, msgspec.Meta(max_length=256)] = "noop"
    offset_ms: Annotated[float, msgspec.Meta(ge=0, le=3_600_000)] = 0.0  # first release, after the task is added


class Job(msgspec.Struct, frozen=True, kw_only=True):
    """One release of a task. ``id`` is unique for the kernel's lifetime."""

    id: Annotated[str, msgspec.Meta(max_length=128)]
    task: Name
    release: float
    deadline: float  # absolute: release + relative deadline
    priority: Priority = 0
    budget_ms: float = 0.0


STATE_FORMAT = 1


class SchedulerState(msgspec.Struct, kw_only=True):
    """The versioned state a scheduler exports and its successor imports.

    The common part (tasks, ready jobs in the exporter's dispatch order) is meaningful to
    every kind, which is what makes conversion between kinds possible: a priority
    scheduler builds its priority queues from a round-robin run queue. ``extra`` carries
    what only the same kind understands (e.g. a rotation cursor); a different kind ignores it.
    """

    format: int = STATE_FORMAT
    kind: str = ""
    tasks: list[Task] = []
    ready: list[Job] = []
    extra: dict[str, Any] = {}


class StateError(ValueError):
    """Raised by ``sched_import_state`` when the offered state cannot be taken over."""


def check_state(state: SchedulerState) -> None:
    """Validation every importer must run first: format known, jobs refer to known tasks,
    no job twice. Raises :class:`StateError` with what is wrong."""
    if state.format != STATE_FORMAT:
        raise StateError(f"state format {state.format} is not supported (this API reads format {STATE_FORMAT})")
    names = {t.name for t in state.tasks}
    if len(names) != len(state.tasks):
        raise StateError("state lists a task twice")
    seen: set[str] = set()
    for job in state.ready:
        if job.task not in names:
            raise StateError(f"ready job {job.id} belongs to unknown task {job.task}")
        if job.id in seen:
            raise StateError(f"ready job {job.id} is listed twice")
        seen.add(job.id)


# --- storage (plugin API 1.1) ------------------------------------------------------------

class Commit(msgspec.Struct, kw_only=True):
    """One committed transaction, as ``storage_history`` lists it. ``keys`` are the
    first keys it changed (sorted, at most ``HISTORY_KEYS``); ``changed`` counts them all."""

    seq: int
    at: float  # wall-clock seconds, for people reading the history; never for decisions
    label: str = ""  # who or what: the client peer, "ctl", "rollback to 42"...
    changed: int = 0
    keys: list[str] = []


class Version(msgspec.Struct, kw_only=True):
    """What commit ``seq`` did to one key: its value before and after (None: absent)."""

    seq: int
    at: float
    label: str = ""
    before: bytes | None = None
    after: bytes | None = None


HISTORY_KEYS = 32


class StorageError(RuntimeError):
    """A storage request that cannot be carried out; the message says why. Backends raise
    it (or a subclass) for expected refusals; anything else is an internal failure."""


class RollbackUnavailable(StorageError):
    """The state asked for is older than the history a backend still keeps (compacted),
    or newer than its last commit."""
