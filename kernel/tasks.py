"""Real-time periodic tasks: the task table, job release on the monotonic clock, the
set of ready jobs (the kernel's truth, whatever the scheduler says), accounting, and
the built-in fallback policy.

Fallback policy: earliest deadline first, ties by release time then task name then job
id. It needs no state beyond the ready set, which the kernel keeps anyway, so it can
take over at any instant (a swap, a restart, a stalled scheduler) without a handover.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Collection
from dataclasses import dataclass, field

from lugh_sdk.api.types import Job, Task

# The backlog bound: a task's unfinished jobs may cover BACKLOG_S of its releases, and
# at least MAX_BACKLOG jobs; a task further behind skips releases (counted). A bound in
# time, not in jobs: four jobs were 4 s of slack for a 1 s task but 40 ms for a 10 ms
# one, less than a worker's restart or a CPU shared with other work, after which a
# recovered kernel skipped that task's releases for as long as the machine stayed busy.
MAX_BACKLOG = 4
BACKLOG_S = 0.5
RESPONSE_SAMPLES = 512


def backlog_cap(task: Task) -> int:
    """Unfinished jobs a task may have before its releases are skipped."""
    return max(MAX_BACKLOG, math.ceil(BACKLOG_S * 1000.0 / task.period_ms))


@dataclass
class TaskStats:
    released: int = 0
    completed: int = 0
    missed: int = 0
    skipped: int = 0
    failed: int = 0
    max_response_ms: float = 0.0
    last_release: float = 0.0  # nominal release time (monotonic clock) of the latest job released
    responses_ms: deque = field(default_factory=lambda: deque(maxlen=RESPONSE_SAMPLES))

    def summary(self) -> dict:
        rs = sorted(self.responses_ms)
        pick = (lambda q: rs[min(len(rs) - 1, int(q * len(rs)))]) if rs else (lambda q: 0.0)
        return {"released": self.released, "completed": self.completed, "missed": self.missed,
                "skipped": self.skipped, "failed": self.failed,
                "response_p50_ms": round(pick(0.5), 3), "response_p99_ms": round(pick(0.99), 3),
                "response_max_ms": round(self.max_response_ms, 3),
                "last_release": self.last_release}


@dataclass
class TaskRecord:
    task: Task
    next_release: float
    serial: int = 0
    stats: TaskStats = field(default_factory=TaskStats)


@dataclass
class JobRecord:
    job: Job
    started: float | None = None
    worker: str | None = None


class LagHistogram:
    """How late things happen, in buckets (50 µs wide below 10 ms, 1 ms above, one past
    1 s), cumulative since boot: a reader takes the difference of two readings to get
    exact counts over its own window, whatever its length (a deque of samples would
    only cover the last few seconds at a few hundred jobs per second)."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}  # upper edge in µs -> count

    def add(self, seconds: float) -> None:
        us = max(0.0, seconds) * 1e6
        edge = 50 * (int(us // 50) + 1) if us < 10_000 else (1000 * (int(us // 1000) + 1) if us < 1e6 else -1)
        self.counts[edge] = self.counts.get(edge, 0) + 1

    def summary(self) -> dict[str, int]:
        """``{upper edge in µs: count}``; the key ``"-1"`` counts lags of a second or more."""
        return {str(edge): n for edge, n in sorted(self.counts.items())}


def fallback_key(job: Job):
    return (job.deadline, job.release, job.task, job.id)


class TaskTable:
    def __init__(self):
        self.tasks: dict[str, TaskRecord] = {}
        self.ready: dict[str, JobRecord] = {}  # released, not finished (queued, running or preempted)
        # Kept beside ``ready`` so that the loop's per-pass questions cost O(1), not a scan
        # of every task or ready job (thousands under overload): unfinished jobs per task
        # name, and the earliest next release (None: to be recomputed).
        self.backlog: Counter = Counter()
        self._next_release: float | None = None
        self.totals = TaskStats()
        self.recent: deque = deque(maxlen=64)  # last finished jobs, for `lugh task list`
        # Release lag: when the kernel released a job, after its ideal release time (the
        # timer's lateness). Start lag: when the job first started on a worker, after its
        # ideal release (the timer, plus waiting for the slot behind earlier deadlines).
        self.release_lag = LagHistogram()
        self.start_lag = LagHistogram()

    def add(self, task: Task, now: float) -> None:
        if task.name in self.tasks:
            raise ValueError(f"task {task.name} exists")
        if task.deadline_ms > task.period_ms:
            raise ValueError("deadline must not exceed the period (constrained-deadline tasks only)")
        if task.budget_ms > task.deadline_ms:
            raise ValueError("budget must not exceed the deadline")
        self.tasks[task.name] = TaskRecord(task=task, next_release=now + task.offset_ms / 1000.0)
        self._next_release = None

    def remove(self, name: str) -> list[JobRecord]:
        """Remove a task; its queued jobs go, one on a worker (running, preempted, or in
        a worker's deck, already sent) finishes (returned jobs are those dropped)."""
        if name not in self.tasks:
            raise KeyError(name)
        del self.tasks[name]
        self._next_release = None
        dropped = [r for r in self.ready.values() if r.job.task == name and r.worker is None]
        for record in dropped:
            del self.ready[record.job.id]
            self.backlog[name] -= 1
        return dropped

    def next_release(self) -> float:
        if self._next_release is None:
            self._next_release = min((r.next_release for r in self.tasks.values()), default=math.inf)
        return self._next_release

    def release_due(self, now: float) -> list[Job]:
        """Release every job whose time has come, at its nominal release time (on the
        period grid from the task's first release), also when the kernel comes late to
        it: a loop that woke 15 ms late for a 10 ms task releases both jobs, late, and
        their response times say so. Only the backlog bound skips releases: a task at
        :func:`backlog_cap` unfinished jobs skips the oldest of its due releases
        (counted), as the SDK's harness does, so a long outage never bursts stale work."""
        if self.next_release() > now:
            return []
        due = [r for r in self.tasks.values() if r.next_release <= now]
        self._next_release = None
        backlog = self.backlog
        jobs = []
        for record in due:
            task = record.task
            period = task.period_ms / 1000.0
            count = int((now - record.next_release) // period) + 1
            skip = max(0, count - max(0, backlog_cap(task) - backlog.get(task.name, 0)))
            if skip:
                record.stats.skipped += skip
                self.totals.skipped += skip
            for i in range(skip, count):
                release = record.next_release + i * period
                record.serial += 1
                job = Job(id=f"{task.name}#{record.serial}", task=task.name, release=release,
                          deadline=release + task.deadline_ms / 1000.0, priority=task.priority,
                          budget_ms=task.budget_ms)
                self.ready[job.id] = JobRecord(job=job)
                backlog[task.name] += 1
                self.release_lag.add(now - release)
                record.stats.released += 1
                record.stats.last_release = release
                self.totals.released += 1
                jobs.append(job)
            record.next_release += count * period
        return jobs

    def oldest_unfinished(self) -> dict[str, float]:
        """Per task, the release time of its oldest job not finished yet (a job that
        stays here while later ones finish is one that nothing runs)."""
        oldest: dict[str, float] = {}
        for r in self.ready.values():
            if r.job.release < oldest.get(r.job.task, math.inf):
                oldest[r.job.task] = r.job.release
        return oldest

    def fallback_pick(self, exclude: Collection[str] = (), busy: Collection[str] = ()) -> Job | None:
        """The ready job the fallback policy would run (queued or preempted), leaving
        out ``exclude`` (the running jobs) and the queued jobs of the ``busy`` tasks
        (another of their jobs is on a worker)."""
        return min((r.job for r in self.ready.values()
                    if r.job.id not in exclude and (r.worker is not None or r.job.task not in busy)),
                   key=fallback_key, default=None)

    def finish(self, job_id: str, now: float, ok: bool) -> JobRecord | None:
        record = self.ready.pop(job_id, None)
        if record is None:
            return None
        self.backlog[record.job.task] -= 1
        response_ms = (now - record.job.release) * 1000.0
        if record.started is not None:
            self.start_lag.add(record.started - record.job.release)
        missed = now > record.job.deadline
        owner = self.tasks.get(record.job.task)
        for stats in (self.totals, owner.stats) if owner else (self.totals,):
            stats.completed += 1
            stats.failed += 0 if ok else 1
            stats.missed += 1 if missed else 0
            stats.responses_ms.append(response_ms)
            stats.max_response_ms = max(stats.max_response_ms, response_ms)
        self.recent.append({"job": job_id, "worker": record.worker, "release": record.job.release,
                            "start": record.started, "finish": now, "response_ms": round(response_ms, 3),
                            "missed": missed, "ok": ok})
        return record
