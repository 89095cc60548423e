"""Real-time periodic tasks: the task table, job release on the monotonic clock, the
set of ready jobs (the kernel's truth, whatever the scheduler says), accounting, and
the built-in fallback policy.

Fallback policy: earliest deadline first, ties by release time then task name then job
id. It needs no state beyond the ready set, which the kernel keeps anyway, so it can
take over at any instant (a swap, a restart, a stalled scheduler) without a handover.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from lugh_sdk.api.types import Job, Task

MAX_BACKLOG = 4  # ready jobs per task; a task further behind skips releases (counted)
RESPONSE_SAMPLES = 512


@dataclass
class TaskStats:
    released: int = 0
    completed: int = 0
    missed: int = 0
    skipped: int = 0
    failed: int = 0
    max_response_ms: float = 0.0
    responses_ms: deque = field(default_factory=lambda: deque(maxlen=RESPONSE_SAMPLES))

    def summary(self) -> dict:
        rs = sorted(self.responses_ms)
        pick = (lambda q: rs[min(len(rs) - 1, int(q * len(rs)))]) if rs else (lambda q: 0.0)
        return {"released": self.released, "completed": self.completed, "missed": self.missed,
                "skipped": self.skipped, "failed": self.failed,
                "response_p50_ms": round(pick(0.5), 3), "response_p99_ms": round(pick(0.99), 3),
                "response_max_ms": round(self.max_response_ms, 3)}


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


def fallback_key(job: Job):
    return (job.deadline, job.release, job.task, job.id)


class TaskTable:
    def __init__(self):
        self.tasks: dict[str, TaskRecord] = {}
        self.ready: dict[str, JobRecord] = {}  # released, not finished (queued, running or preempted)
        self.totals = TaskStats()
        self.recent: deque = deque(maxlen=64)  # last finished jobs, for `lugh task list`

    def add(self, task: Task, now: float) -> None:
        if task.name in self.tasks:
            raise ValueError(f"task {task.name} exists")
        if task.deadline_ms > task.period_ms:
            raise ValueError("deadline must not exceed the period (constrained-deadline tasks only)")
        if task.budget_ms > task.deadline_ms:
            raise ValueError("budget must not exceed the deadline")
        self.tasks[task.name] = TaskRecord(task=task, next_release=now + task.offset_ms / 1000.0)

    def remove(self, name: str) -> list[JobRecord]:
        """Remove a task; its queued jobs go, a running one finishes (returned jobs are
        those dropped)."""
        if name not in self.tasks:
            raise KeyError(name)
        del self.tasks[name]
        dropped = [r for r in self.ready.values() if r.job.task == name and r.started is None]
        for record in dropped:
            del self.ready[record.job.id]
        return dropped

    def next_release(self) -> float:
        return min((r.next_release for r in self.tasks.values()), default=math.inf)

    def release_due(self, now: float) -> list[Job]:
        jobs = []
        for record in self.tasks.values():
            if record.next_release > now:
                continue
            task = record.task
            period = task.period_ms / 1000.0
            release = record.next_release
            # A kernel that fell behind releases one job now and counts the periods it
            # skipped rather than bursting a backlog of stale jobs.
            behind = int((now - release) // period)
            if behind:
                record.stats.skipped += behind
                self.totals.skipped += behind
                release += behind * period
            record.next_release = release + period
            backlog = sum(1 for r in self.ready.values() if r.job.task == task.name)
            if backlog >= MAX_BACKLOG:
                record.stats.skipped += 1
                self.totals.skipped += 1
                continue
            record.serial += 1
            job = Job(id=f"{task.name}#{record.serial}", task=task.name, release=release,
                      deadline=release + task.deadline_ms / 1000.0, priority=task.priority,
                      budget_ms=task.budget_ms)
            self.ready[job.id] = JobRecord(job=job)
            record.stats.released += 1
            self.totals.released += 1
            jobs.append(job)
        return jobs

    def fallback_pick(self, running: str | None = None) -> Job | None:
        """The ready job the fallback policy would run (queued or preempted)."""
        return min((r.job for r in self.ready.values() if r.job.id != running), key=fallback_key, default=None)

    def finish(self, job_id: str, now: float, ok: bool) -> JobRecord | None:
        record = self.ready.pop(job_id, None)
        if record is None:
            return None
        response_ms = (now - record.job.release) * 1000.0
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
