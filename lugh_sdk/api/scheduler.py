"""Hookspecs of a scheduler plugin (plugin API 1.x).

The kernel owns the truth (the task table and the set of ready jobs) and asks the
scheduler for decisions. It tells the plugin about every event in order, then asks
``sched_pick_next`` whenever the CPU is free or a new job is released while one runs.
The kernel checks every answer: a job id that is not ready is ignored and the kernel's
own fallback policy decides instead, so a buggy plugin can delay work but not lose it.

A hook must return quickly: the kernel's watchdog ejects a scheduler that leaves a
decision unanswered (see docs/scheduler-api.md).
"""

from __future__ import annotations

from lugh_sdk.api.markers import hookspec
from lugh_sdk.api.types import Job, SchedulerState, Task


@hookspec
def sched_task_added(task: Task) -> None:
    """A periodic task was added."""


@hookspec
def sched_task_removed(name: str) -> None:
    """A task was removed; drop its ready jobs."""


@hookspec
def sched_job_released(job: Job) -> None:
    """A job became ready."""


@hookspec
def sched_job_completed(job: Job) -> None:
    """A job finished (whoever dispatched it). Forget it if it is still queued: the
    kernel's fallback may have run it while this scheduler was being swapped in."""


@hookspec(firstresult=True)
def sched_pick_next(now: float, running: Job | None) -> str | None:
    """The decision.

    With ``running`` None: return the id of the ready job to start now (and take it off
    the queue), or None when nothing is ready.

    With ``running`` set (a job was just released while ``running`` executes): return
    the id of a ready job that must preempt it, taking that job off the queue and
    putting ``running`` back on it; or None to let ``running`` continue.

    A kernel with several dispatch slots (``--slots``) runs several jobs at once: it may
    ask with ``running`` None again before the last job returned completes, and may ask
    about each running job in turn until one is preempted. Answer about the one job
    named; a None answer must leave the queue as it was. A pick whose task has another
    job on a worker is handed back at once (``sched_job_released``) and the question put
    again: a task's jobs run one after the other.
    """


@hookspec(firstresult=True)
def sched_export_state() -> SchedulerState:
    """Return the full state, ready jobs in this scheduler's dispatch order."""


@hookspec(firstresult=True)
def sched_import_state(state: SchedulerState) -> bool:
    """Take over ``state`` (possibly exported by another kind); call
    ``lugh_sdk.api.types.check_state`` first and raise ``StateError`` if it cannot be
    taken over. Return True."""


@hookspec(firstresult=True)
def sched_health() -> bool:
    """Self-check after a state import: True when the plugin's invariants hold."""
