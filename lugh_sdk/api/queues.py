"""Reusable bases for scheduler plugins, so that a scheduler supplies only its ordering.

:class:`ReadyQueueScheduler` implements every scheduler hook on top of a ready queue;
a subclass says which queue (:meth:`~ReadyQueueScheduler.make_queue`) and, if it is
preemptive, when a queued job preempts the running one (:meth:`~ReadyQueueScheduler.preempts`).
:class:`KeyedScheduler` is the common case: a total order led by ``urgency(job)``.

Two queues are provided: :class:`KeyedQueue` (a binary heap, O(log n) push and pop) and
:class:`RotationQueue` (FIFO of releases with rotation among tasks, O(1)).

pluggy finds hookimpls on an instance through ``dir()``, so the inherited methods below
are registered for every subclass. A subclass that overrides one of them must decorate
its override with ``@hookimpl`` again, or pluggy will not see it.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Protocol

from lugh_sdk.api.markers import hookimpl
from lugh_sdk.api.types import Job, SchedulerState, Task, check_state


class ReadyQueue(Protocol):
    """The ready jobs of one scheduler, in its dispatch order. Job ids are unique in it."""

    def push(self, job: Job) -> None: ...
    def peek(self) -> Job | None: ...
    def pop(self) -> Job | None: ...
    def discard(self, job_id: str) -> bool: ...
    def __contains__(self, job_id: object) -> bool: ...
    def __iter__(self) -> Iterator[Job]: ...
    def __len__(self) -> int: ...


class KeyedQueue:
    """Ready jobs ordered by ``key(job)``, smallest first.

    Removal of an arbitrary job (completion, task removal) is lazy: the heap entry stays
    until it surfaces or until stale entries outnumber live ones, so every operation
    stays O(log n) amortised.
    """

    def __init__(self, key: Callable[[Job], Any]) -> None:
        self._key = key
        self._heap: list[tuple[Any, int, Job]] = []
        self._live: dict[str, tuple[Any, int, Job]] = {}
        # The counter breaks ties between equal keys (a job id pushed again after a
        # discard) so that the heap never has to compare two Jobs.
        self._counter = itertools.count()

    def push(self, job: Job) -> None:
        entry = (self._key(job), next(self._counter), job)
        self._live[job.id] = entry
        heapq.heappush(self._heap, entry)

    def _drop_stale_head(self) -> None:
        while self._heap and self._live.get(self._heap[0][2].id) is not self._heap[0]:
            heapq.heappop(self._heap)

    def peek(self) -> Job | None:
        self._drop_stale_head()
        return self._heap[0][2] if self._heap else None

    def pop(self) -> Job | None:
        job = self.peek()
        if job is not None:
            heapq.heappop(self._heap)
            del self._live[job.id]
            self._compact()
        return job

    def discard(self, job_id: str) -> bool:
        if self._live.pop(job_id, None) is None:
            return False
        self._compact()
        return True

    def _compact(self) -> None:
        # Rebuilding costs O(n) once stale entries outnumber live ones, so it is paid for
        # by the discards that made them: still amortised O(log n) per operation.
        if len(self._heap) > 2 * len(self._live) + 16:
            self._heap = list(self._live.values())
            heapq.heapify(self._heap)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._live

    def __iter__(self) -> Iterator[Job]:
        return (entry[2] for entry in sorted(self._live.values()))

    def __len__(self) -> int:
        return len(self._live)


class RotationQueue:
    """FIFO of releases, with rotation among tasks.

    Tasks take turns in the order in which they became ready; a turn dispatches the
    task's oldest ready job, and a task with more ready jobs goes back to the end of the
    rotation. When no task has a backlog this is exactly the FIFO of releases; when one
    has (an overrun), its backlog cannot starve the other tasks.

    Pushing the jobs of :meth:`__iter__` in that order into an empty queue rebuilds the
    same dispatch order, so the exported ready list is the whole state.
    """

    def __init__(self) -> None:
        self._turns: deque[str] = deque()
        self._jobs: dict[str, deque[Job]] = {}
        self._task_of: dict[str, str] = {}

    def push(self, job: Job) -> None:
        if job.task not in self._jobs:
            self._jobs[job.task] = deque()
            self._turns.append(job.task)
        self._jobs[job.task].append(job)
        self._task_of[job.id] = job.task

    def peek(self) -> Job | None:
        return self._jobs[self._turns[0]][0] if self._turns else None

    def pop(self) -> Job | None:
        if not self._turns:
            return None
        task = self._turns.popleft()
        jobs = self._jobs[task]
        job = jobs.popleft()
        del self._task_of[job.id]
        if jobs:
            self._turns.append(task)
        else:
            del self._jobs[task]
        return job

    def discard(self, job_id: str) -> bool:
        task = self._task_of.pop(job_id, None)
        if task is None:
            return False
        jobs = self._jobs[task]
        jobs.remove(next(j for j in jobs if j.id == job_id))
        if not jobs:
            del self._jobs[task]
            self._turns.remove(task)
        return True

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._task_of

    def __iter__(self) -> Iterator[Job]:
        queues = [iter(self._jobs[task]) for task in self._turns]
        while queues:
            # One job per task per round; a task whose jobs run out leaves the rotation.
            still = []
            for jobs in queues:
                job = next(jobs, None)
                if job is not None:
                    yield job
                    still.append(jobs)
            queues = still

    def __len__(self) -> int:
        return len(self._task_of)


class ReadyQueueScheduler:
    """All scheduler hooks over a :class:`ReadyQueue`; non-preemptive unless
    :meth:`preempts` says otherwise.

    Robustness choices, since the kernel owns the truth and checks every answer:

    - a job released for a task this scheduler does not know is ignored (keeping it
      would break the invariant :meth:`sched_health` checks; the kernel still holds it);
    - a job released twice is queued once;
    - completing a job that is not queued is a no-op (the kernel's fallback may have run it);
    - ``sched_import_state`` builds the new state aside and swaps it in only once it is
      complete, so a refused import leaves the running state untouched.
    """

    KIND: ClassVar[str] = ""

    def __init__(self) -> None:
        self.tasks: dict[str, Task] = {}
        self.ready: ReadyQueue = self.make_queue()

    # -- what a subclass supplies -------------------------------------------------

    def make_queue(self) -> ReadyQueue:
        raise NotImplementedError

    def preempts(self, candidate: Job, running: Job) -> bool:
        """True when ``candidate`` must take the CPU from ``running``."""
        return False

    def export_extra(self) -> dict[str, Any]:
        """What only a scheduler of the same kind understands."""
        return {}

    def import_extra(self, extra: dict[str, Any]) -> None:
        """Called with the exporter's ``extra`` when it is of the same kind, after the
        ready queue is rebuilt; raise StateError if it cannot be taken over."""

    # -- hooks ----------------------------------------------------------------------

    @hookimpl
    def sched_task_added(self, task: Task) -> None:
        self.tasks[task.name] = task

    @hookimpl
    def sched_task_removed(self, name: str) -> None:
        self.tasks.pop(name, None)
        for job in [j for j in self.ready if j.task == name]:
            self.ready.discard(job.id)

    @hookimpl
    def sched_job_released(self, job: Job) -> None:
        if job.task in self.tasks and job.id not in self.ready:
            self.ready.push(job)

    @hookimpl
    def sched_job_completed(self, job: Job) -> None:
        self.ready.discard(job.id)

    @hookimpl
    def sched_pick_next(self, now: float, running: Job | None) -> str | None:
        if running is None:
            job = self.ready.pop()
            return job.id if job is not None else None
        best = self.ready.peek()
        if best is None or not self.preempts(best, running):
            return None
        self.ready.pop()
        # Through the same gate as a release: a running job whose task was removed
        # meanwhile is not queued again.
        self.sched_job_released(running)
        return best.id

    @hookimpl
    def sched_export_state(self) -> SchedulerState:
        return SchedulerState(
            kind=self.KIND, tasks=list(self.tasks.values()), ready=list(self.ready), extra=self.export_extra()
        )

    @hookimpl
    def sched_import_state(self, state: SchedulerState) -> bool:
        check_state(state)
        # Any kind's ready list is in its dispatch order: pushing it in that order makes a
        # FIFO keep it, while a keyed queue re-sorts it; that is the conversion.
        ready = self.make_queue()
        for job in state.ready:
            ready.push(job)
        old = self.tasks, self.ready
        self.tasks, self.ready = {t.name: t for t in state.tasks}, ready
        try:
            if state.kind == self.KIND:
                self.import_extra(state.extra)
        except Exception:
            self.tasks, self.ready = old
            raise
        return True

    @hookimpl
    def sched_health(self) -> bool:
        ids = [job.id for job in self.ready]
        return (
            len(ids) == len(set(ids)) == len(self.ready)
            and all(job.task in self.tasks for job in self.ready)
            and all(job_id in self.ready for job_id in ids)
        )


class KeyedScheduler(ReadyQueueScheduler):
    """A scheduler that ranks ready jobs by :meth:`urgency`, smaller first.

    Ties are broken by earlier release, then task name, then job id, so the dispatch
    order is total and the same on every run. A subclass supplies only ``urgency``.

    It is preemptive: a queued job preempts the running one when its urgency is strictly
    smaller. Equal urgency never preempts, whatever the tie-breaks say: switching between
    equally urgent jobs costs a context switch and buys nothing.
    """

    @staticmethod
    def urgency(job: Job) -> Any:
        raise NotImplementedError

    def key(self, job: Job) -> tuple[Any, float, str, str]:
        return (self.urgency(job), job.release, job.task, job.id)

    def make_queue(self) -> KeyedQueue:
        return KeyedQueue(self.key)

    def preempts(self, candidate: Job, running: Job) -> bool:
        return self.urgency(candidate) < self.urgency(running)
