"""Run a scheduler plugin in simulated time: one CPU, exact preemption, deterministic.

This is a discrete-event simulation of what the kernel does on the real clock
(``kernel/core.py``), through the same protocol:

- at start every task is announced (``sched_task_added``), in the order given;
- at each instant, in this order: the running job completes if its execution time is
  used up (``sched_job_completed``), tasks due for removal are removed (queued jobs
  dropped, ``sched_task_removed``), due jobs are released (``sched_job_released``; a
  task with 4 unfinished jobs skips the release, as in the kernel);
- then one decision: with the CPU free and a job ready, ``sched_pick_next(now, None)``;
  with a job running and a job just released, ``sched_pick_next(now, running)``;
- every answer is checked as the kernel checks it. An id that is not a ready job is an
  *invalid decision*; None while the CPU is free and jobs are ready is a *refusal*. Both
  are counted, and, exactly like the kernel, the built-in fallback policy (EDF,
  ``kernel.tasks.fallback_key``) dispatches instead, so the run always finishes;
- a job runs for its execution time: its budget, or what ``execution`` says. A preempted
  job later continues where it stopped (the kernel stops and continues the worker process, here exact).

Releases happen in ``[0, duration_ms)``; then the simulation runs until every released
job has finished. Time is kept in integer nanoseconds, so a run is exact and the same
input always gives the same trace. The plugin sees the kernel's units: ``now``,
``Job.release`` and ``Job.deadline`` in seconds (from 0), ``budget_ms`` in ms.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from kernel.tasks import backlog_cap, fallback_key
from lugh_sdk.api import Job, Task
from lugh_sdk.harness.loader import plugin_manager

NS_PER_MS = 1_000_000
NS_PER_S = 1_000_000_000

#: What the simulated kernel did after a decision (``Decision.action``).
ACTIONS = {
    "dispatch": "the answered job starts (or resumes) on the free CPU",
    "preempt": "the answered job takes the CPU; the running one goes back to ready",
    "continue": "None while a job runs: it runs on",
    "refused": "None while the CPU is free and jobs are ready: the fallback dispatches",
    "invalid": "the answer is not a ready job: ignored (CPU busy) or the fallback dispatches (CPU free)",
    "error": "the hook raised: as for an invalid answer",
}


def _ns(ms: float) -> int:
    return round(ms * NS_PER_MS)


def _ms(ns: int) -> float:
    return ns / NS_PER_MS


@dataclass(frozen=True)
class Decision:
    """One call of ``sched_pick_next`` and what the simulated kernel did with it."""

    at_ms: float
    running: str | None  # the running job when asked; None: the CPU was free
    answer: str | None  # what the plugin returned (repr() of anything but a str or None)
    action: str  # a key of ACTIONS
    job: str | None  # the job on the CPU after the decision


@dataclass(frozen=True)
class JobOutcome:
    id: str
    task: str
    release_ms: float
    deadline_ms: float
    start_ms: float
    finish_ms: float
    preemptions: int  # how often this job lost the CPU

    @property
    def response_ms(self) -> float:
        return self.finish_ms - self.release_ms

    @property
    def missed(self) -> bool:
        return self.finish_ms > self.deadline_ms

    @property
    def late_ms(self) -> float:
        return max(0.0, self.finish_ms - self.deadline_ms)


@dataclass(frozen=True)
class ResponseStats:
    """Response times (finish - release) in ms; percentiles are nearest-rank, as the
    kernel's `lugh task list` computes them."""

    count: int
    mean_ms: float
    p50_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of(cls, values: Iterable[float]) -> ResponseStats:
        rs = sorted(values)
        if not rs:
            return cls(0, 0.0, 0.0, 0.0, 0.0)
        rank = lambda q: rs[min(len(rs) - 1, int(q * len(rs)))]  # noqa: E731
        return cls(len(rs), sum(rs) / len(rs), rank(0.5), rank(0.99), rs[-1])


@dataclass(frozen=True)
class TaskReport:
    released: int
    completed: int
    missed: int
    skipped: int  # releases skipped: the task was at its backlog bound (kernel.tasks.backlog_cap)
    dropped: int  # queued jobs dropped when the task was removed
    response: ResponseStats


@dataclass
class SimResult:
    """What happened. ``trace`` is the full decision trace, ``jobs`` the finished jobs
    in completion order; times in ms from the start of the run."""

    jobs: list[JobOutcome]
    trace: list[Decision]
    tasks: dict[str, TaskReport]
    overall: TaskReport
    preemptions: int
    invalid_decisions: int
    refusals: int
    hook_errors: list[str]
    healthy: bool | None  # sched_health() at the end
    end_ms: float

    @property
    def misses(self) -> int:
        return self.overall.missed

    @property
    def missed_jobs(self) -> list[JobOutcome]:
        return [j for j in self.jobs if j.missed]

    @property
    def fallback_decisions(self) -> int:
        """Decisions the kernel's fallback had to take (the CPU was free)."""
        return sum(1 for d in self.trace if d.running is None and d.action != "dispatch")

    @property
    def protocol_ok(self) -> bool:
        """The plugin answered every question validly, raised nothing and ends healthy."""
        return not (self.invalid_decisions or self.refusals or self.hook_errors) and self.healthy is True

    def trace_digest(self) -> str:
        """sha256 of the decision trace: equal digests, equal traces."""
        h = hashlib.sha256()
        for d in self.trace:
            h.update(repr((d.at_ms, d.running, d.answer, d.action, d.job)).encode())
        return h.hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {
            "misses": self.misses, "preemptions": self.preemptions, "invalid_decisions": self.invalid_decisions,
            "refusals": self.refusals, "hook_errors": list(self.hook_errors), "healthy": self.healthy,
            "end_ms": self.end_ms, "overall": asdict(self.overall),
            "tasks": {name: asdict(rep) for name, rep in self.tasks.items()},
            "trace_digest": self.trace_digest(), "decisions": len(self.trace),
        }

    def summary(self) -> str:
        """A short text report (what a failing vendor test wants to print)."""
        lines = [f"{'task':<16}{'released':>9}{'done':>6}{'missed':>7}{'skipped':>8}{'resp p50':>10}"
                 f"{'p99':>9}{'max ms':>9}"]
        for name, rep in [*self.tasks.items(), ("(all)", self.overall)]:
            r = rep.response
            lines.append(f"{name:<16}{rep.released:>9}{rep.completed:>6}{rep.missed:>7}{rep.skipped:>8}"
                         f"{r.p50_ms:>10.3f}{r.p99_ms:>9.3f}{r.max_ms:>9.3f}")
        lines.append(f"preemptions {self.preemptions}, invalid decisions {self.invalid_decisions}, "
                     f"refusals {self.refusals}, hook errors {len(self.hook_errors)}, healthy {self.healthy}")
        lines += [f"  error: {e}" for e in self.hook_errors[:5]]
        return "\n".join(lines)


@dataclass
class _Run:
    job: Job
    release: int
    deadline: int
    remaining: int
    started: int | None = None
    preemptions: int = 0


@dataclass
class _TaskState:
    task: Task
    next_release: int
    serial: int = 0
    released: int = 0
    skipped: int = 0
    dropped: int = 0
    finished: list[JobOutcome] = field(default_factory=list)


Execution = Callable[[Job], float] | Mapping[str, float] | None


def _execution_of(execution: Execution) -> Callable[[Job], float]:
    if execution is None:
        return lambda job: job.budget_ms
    if isinstance(execution, Mapping):
        return lambda job: execution.get(job.task, job.budget_ms)
    return execution


class _Simulation:
    def __init__(self, hook, tasks: list[Task], duration_ms: float, execution: Execution,
                 remove: Mapping[str, float]) -> None:
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError("two tasks have the same name")
        unknown = set(remove) - set(names)
        if unknown:
            raise ValueError(f"cannot remove unknown task(s): {', '.join(sorted(unknown))}")
        self.hook = hook
        self.horizon = _ns(duration_ms)
        self.execution = _execution_of(execution)
        self.tasks = {t.name: _TaskState(task=t, next_release=_ns(t.offset_ms)) for t in tasks}
        self.removals = sorted((_ns(ms), name) for name, ms in remove.items())
        self.ready: dict[str, _Run] = {}  # released, not finished: queued, running or preempted
        self.running: str | None = None
        self.now = 0
        self.trace: list[Decision] = []
        self.finished: list[JobOutcome] = []
        self.preemptions = self.invalid = self.refusals = 0
        self.errors: list[str] = []

    # -- calls into the plugin, errors counted as the scheduler service reports them --

    def call(self, hook_name: str, **kwargs) -> Any:
        try:
            return getattr(self.hook, hook_name)(**kwargs)
        except Exception as exc:
            self.errors.append(f"{hook_name} at {_ms(self.now):.3f} ms: {type(exc).__name__}: {exc}")
            return _RAISED

    # -- the loop ------------------------------------------------------------------

    def run(self) -> None:
        for state in self.tasks.values():
            self.call("sched_task_added", task=state.task)
        while True:
            times = [s.next_release for s in self.tasks.values() if s.next_release < self.horizon]
            if self.running is not None:
                times.append(self.now + self.ready[self.running].remaining)
            if self.removals:
                times.append(self.removals[0][0])
            if not times:
                break
            at = min(times)
            if self.running is not None:
                self.ready[self.running].remaining -= at - self.now
            self.now = at
            if self.running is not None and self.ready[self.running].remaining <= 0:
                self.complete()
            while self.removals and self.removals[0][0] <= self.now:
                self.remove(self.removals.pop(0)[1])
            released = self.release_due()
            if self.running is None:
                if self.ready:
                    self.decide(None)
            elif released:
                self.decide(self.ready[self.running])

    def release_due(self) -> bool:
        released = False
        for state in self.tasks.values():
            if state.next_release > self.now or state.next_release >= self.horizon:
                continue
            task = state.task
            release = state.next_release
            state.next_release = release + _ns(task.period_ms)
            if sum(1 for r in self.ready.values() if r.job.task == task.name) >= backlog_cap(task):
                state.skipped += 1
                continue
            state.serial += 1
            deadline = release + _ns(task.deadline_ms)
            job = Job(id=f"{task.name}#{state.serial}", task=task.name, release=release / NS_PER_S,
                      deadline=deadline / NS_PER_S, priority=task.priority, budget_ms=task.budget_ms)
            run = _Run(job=job, release=release, deadline=deadline, remaining=max(0, _ns(self.execution(job))))
            self.ready[job.id] = run
            state.released += 1
            released = True
            self.call("sched_job_released", job=job)
        return released

    def complete(self) -> None:
        run = self.ready.pop(self.running)
        self.running = None
        outcome = JobOutcome(id=run.job.id, task=run.job.task, release_ms=_ms(run.release),
                             deadline_ms=_ms(run.deadline), start_ms=_ms(run.started), finish_ms=_ms(self.now),
                             preemptions=run.preemptions)
        self.finished.append(outcome)
        self.tasks[run.job.task].finished.append(outcome)
        self.call("sched_job_completed", job=run.job)

    def remove(self, name: str) -> None:
        state = self.tasks[name]  # its report stays; it releases nothing more
        state.next_release = self.horizon
        for run in [r for r in self.ready.values() if r.job.task == name and r.started is None]:
            del self.ready[run.job.id]
            state.dropped += 1
        self.call("sched_task_removed", name=name)

    def decide(self, running: _Run | None) -> None:
        answer = self.call("sched_pick_next", now=self.now / NS_PER_S, running=running.job if running else None)
        valid = isinstance(answer, str) and answer in self.ready and answer != self.running
        if answer is _RAISED:
            action = "error"
        elif valid:
            action = "dispatch" if running is None else "preempt"
        elif answer is None:
            action = "continue" if running is not None else "refused"
        else:
            action = "invalid"
            self.invalid += 1
        if running is None:
            if action == "refused":
                self.refusals += 1
            chosen = answer if valid else min((r.job for r in self.ready.values()), key=fallback_key).id
            self.start(chosen)
        elif valid:
            running.preemptions += 1
            self.preemptions += 1
            self.start(answer)
        shown = answer if answer is None or isinstance(answer, str) else ("<raised>" if answer is _RAISED else repr(answer))
        self.trace.append(Decision(at_ms=_ms(self.now), running=running.job.id if running else None,
                                   answer=shown, action=action, job=self.running))

    def start(self, job_id: str) -> None:
        run = self.ready[job_id]
        if run.started is None:
            run.started = self.now
        self.running = job_id

    def result(self) -> SimResult:
        healthy = self.call("sched_health")
        reports = {name: _report(s.released, s.skipped, s.dropped, s.finished) for name, s in self.tasks.items()}
        overall = _report(sum(s.released for s in self.tasks.values()), sum(s.skipped for s in self.tasks.values()),
                          sum(s.dropped for s in self.tasks.values()), self.finished)
        return SimResult(jobs=self.finished, trace=self.trace, tasks=reports, overall=overall,
                         preemptions=self.preemptions, invalid_decisions=self.invalid, refusals=self.refusals,
                         hook_errors=self.errors, healthy=None if healthy is _RAISED else bool(healthy),
                         end_ms=_ms(self.now))


_RAISED = object()


def _report(released: int, skipped: int, dropped: int, finished: list[JobOutcome]) -> TaskReport:
    return TaskReport(released=released, completed=len(finished), missed=sum(1 for j in finished if j.missed),
                      skipped=skipped, dropped=dropped, response=ResponseStats.of(j.response_ms for j in finished))


def simulate(plugin: Any, tasks: Iterable[Task], duration_ms: float, *, execution: Execution = None,
             remove: Mapping[str, float] | None = None) -> SimResult:
    """Run scheduler ``plugin`` (a class, instantiated once, or a plugin object) over
    periodic ``tasks`` whose jobs are released during ``duration_ms``.

    ``execution``: each job's execution time in ms: None (its budget), a mapping task
    name -> ms, or a function ``job -> ms`` (called once per job, at its release; keep
    it deterministic, e.g. a seeded ``random.Random``). ``remove``: task name -> the ms
    at which it is removed.

    The plugin is registered in a real pluggy PluginManager with the scheduler hookspecs,
    as the service host does (:func:`lugh_sdk.harness.loader.plugin_manager`).
    """
    pm = plugin_manager("scheduler", plugin)
    sim = _Simulation(pm.hook, list(tasks), duration_ms, execution, remove or {})
    sim.run()
    return sim.result()


def utilisation(tasks: Iterable[Task]) -> float:
    """Sum of budget / period: at most 1 is necessary for any scheduler to meet every
    deadline on one CPU, and sufficient for EDF with deadlines equal to periods."""
    return sum(t.budget_ms / t.period_ms for t in tasks)


# ---------------------------------------------------------------------------------
# Conformance cases: what every scheduler must do, whatever its policy.

from lugh_sdk.api import SchedulerState, StateError  # noqa: E402
from lugh_sdk.harness.conformance import ConformanceError, Context, case, expect  # noqa: E402

#: Utilisation 0.6, implicit and constrained deadlines, releases while jobs run.
LIGHT_LOAD = (
    Task(name="relay", period_ms=5, deadline_ms=5, budget_ms=1, priority=200),
    Task(name="feeder", period_ms=10, deadline_ms=10, budget_ms=2, priority=100),
    Task(name="meter", period_ms=20, deadline_ms=15, budget_ms=4, priority=50),
)
#: Utilisation 1.4: deadlines are missed and releases skipped whatever the policy.
OVERLOAD = (
    Task(name="relay", period_ms=5, deadline_ms=5, budget_ms=2, priority=200),
    Task(name="feeder", period_ms=10, deadline_ms=10, budget_ms=4, priority=100),
    Task(name="meter", period_ms=20, deadline_ms=20, budget_ms=8, priority=50),
)


def _job(task: Task, n: int, release: float) -> Job:
    return Job(id=f"{task.name}#{n}", task=task.name, release=release, deadline=release + task.deadline_ms / 1000,
               priority=task.priority, budget_ms=task.budget_ms)


def _drain(hook, now: float = 1.0) -> list[str]:
    """Ask "what runs now?" until the plugin says None; each answer must be new."""
    order: list[str] = []
    for _ in range(10_000):
        job_id = hook.sched_pick_next(now=now, running=None)
        if job_id is None:
            return order
        expect(isinstance(job_id, str), f"sched_pick_next returned {job_id!r}, not a job id or None")
        expect(job_id not in order, f"sched_pick_next returned {job_id} twice: a picked job must leave the queue")
        order.append(job_id)
    raise ConformanceError("sched_pick_next never returned None")


def _fill(hook, tasks=LIGHT_LOAD, rounds: int = 2) -> list[Job]:
    for task in tasks:
        hook.sched_task_added(task=task)
    jobs = [_job(t, n, release=n * t.period_ms / 1000) for n in range(1, rounds + 1) for t in tasks]
    for job in jobs:
        hook.sched_job_released(job=job)
    return jobs


def _protocol(result: SimResult, what: str) -> None:
    expect(result.protocol_ok and result.overall.completed == result.overall.released - result.overall.dropped,
           f"{what}: the plugin broke the scheduling protocol\n{result.summary()}")


@case("scheduler", "protocol-light-load")
def _light(ctx: Context) -> None:
    """Utilisation 0.6 for 200 ms: every answer names a ready job, the CPU is never
    refused while jobs are ready, no hook raises, every job finishes, healthy at the end."""
    _protocol(simulate(ctx.instance(), LIGHT_LOAD, 200), "light load")


@case("scheduler", "protocol-overload")
def _overload(ctx: Context) -> None:
    """Utilisation 1.4 for 200 ms, with execution times over budget: misses are the
    policy's business, but the protocol must hold and no job may be lost."""
    result = simulate(ctx.instance(), OVERLOAD, 200, execution=lambda job: job.budget_ms * 1.25)
    _protocol(result, "overload")


@case("scheduler", "deterministic")
def _deterministic(ctx: Context) -> None:
    """The same workload twice gives the same decision trace (no wall clock, no
    unseeded randomness, no iteration over unordered sets)."""
    ctx.require_fresh()
    first = simulate(ctx.instance(), LIGHT_LOAD, 100, remove={"feeder": 50})
    second = simulate(ctx.instance(), LIGHT_LOAD, 100, remove={"feeder": 50})
    if first.trace != second.trace:
        at = next(i for i, (a, b) in enumerate(zip(first.trace + [None], second.trace + [None])) if a != b)
        raise ConformanceError(f"two runs of the same workload differ at decision {at}: "
                               f"{first.trace[at:at + 1]} vs {second.trace[at:at + 1]}")


@case("scheduler", "task-removal")
def _removal(ctx: Context) -> None:
    """Removing a task drops its queued jobs; a late release of it is not queued."""
    hook = ctx.new()
    jobs = _fill(hook)
    hook.sched_task_removed(name="feeder")
    hook.sched_job_released(job=_job(LIGHT_LOAD[1], 9, 0.5))
    left = _drain(hook)
    expect(sorted(left) == sorted(j.id for j in jobs if j.task != "feeder"),
           f"after removing task 'feeder' the plugin dispatches {left}")
    expect(hook.sched_health() is True, "sched_health is not True after a task removal")


@case("scheduler", "completion-forgets")
def _completion(ctx: Context) -> None:
    """A job completed while still queued (the kernel's fallback ran it) is forgotten;
    completing it twice, or an unknown job, changes nothing."""
    hook = ctx.new()
    jobs = _fill(hook, rounds=1)
    for _ in range(2):
        hook.sched_job_completed(job=jobs[0])
    hook.sched_job_completed(job=_job(LIGHT_LOAD[0], 99, 0.0))
    left = _drain(hook)
    expect(sorted(left) == sorted(j.id for j in jobs[1:]), f"after completing {jobs[0].id} the plugin dispatches {left}")


@case("scheduler", "state-round-trip")
def _round_trip(ctx: Context) -> None:
    """The exported state lists the task table and every queued job; a fresh instance
    that imports it is healthy and dispatches the same jobs in the same order."""
    ctx.require_fresh()
    old = ctx.new()
    jobs = _fill(old, rounds=3)
    first = old.sched_pick_next(now=0.0, running=None)
    state = old.sched_export_state()
    expect(isinstance(state, SchedulerState), f"sched_export_state returned {type(state).__name__}, not SchedulerState")
    expect(sorted(t.name for t in state.tasks) == sorted(t.name for t in LIGHT_LOAD), "exported tasks are not the task table")
    queued = sorted(j.id for j in jobs if j.id != first)
    expect(sorted(j.id for j in state.ready) == queued, "the exported ready list is not the queued jobs")
    new = ctx.new()
    expect(new.sched_import_state(state=state) is True, "sched_import_state did not return True")
    expect(new.sched_health() is True, "sched_health is not True after importing a state")
    theirs, ours = _drain(new), _drain(old)
    expect(theirs == ours, f"after a state transfer the new instance dispatches {theirs}, the old one {ours}")


@case("scheduler", "imports-other-kinds")
def _other_kinds(ctx: Context) -> None:
    """A state exported by another kind of scheduler (here the kernel's own) is taken
    over: every job it lists is dispatched, nothing else."""
    ready = [_job(t, n, n * t.period_ms / 1000) for n in (1, 2) for t in LIGHT_LOAD]
    state = SchedulerState(kind="some-other-kind", tasks=list(LIGHT_LOAD), ready=ready, extra={"cursor": [1, 2]})
    hook = ctx.new()
    expect(hook.sched_import_state(state=state) is True, "sched_import_state did not return True")
    expect(hook.sched_health() is True, "sched_health is not True after importing another kind's state")
    left = _drain(hook)
    expect(sorted(left) == sorted(j.id for j in ready), f"after importing, the plugin dispatches {left}")


@case("scheduler", "refuses-bad-state")
def _bad_state(ctx: Context) -> None:
    """A state naming a job of an unknown task is refused with StateError and leaves
    the current state untouched."""
    hook = ctx.new()
    jobs = _fill(hook, rounds=1)
    before = hook.sched_export_state()
    stray = Job(id="ghost#1", task="ghost", release=0.0, deadline=1.0)
    try:
        hook.sched_import_state(state=SchedulerState(kind="x", tasks=list(LIGHT_LOAD), ready=[stray]))
    except StateError:
        pass
    else:
        raise ConformanceError("a state with a job of an unknown task was accepted (call check_state first)")
    expect(hook.sched_export_state() == before, "a refused import changed the plugin's state")
    expect(sorted(_drain(hook)) == sorted(j.id for j in jobs), "a refused import changed what the plugin dispatches")

