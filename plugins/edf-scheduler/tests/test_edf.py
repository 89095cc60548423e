"""The EDF plugin driven through a real pluggy PluginManager: its order, its preemption
decisions, its conversion of other kinds' state, and its heap against a plain model. The
behaviour it shares with every ReadyQueueScheduler is tested with the round-robin plugin."""

import random

import pluggy
import pytest

import lugh_sdk.api.scheduler
from lugh_sdk.api import Job, SchedulerState, Task
from lugh_edf_scheduler.plugin import EdfScheduler

TASKS = [Task(name=n, period_ms=100, deadline_ms=100, budget_ms=5) for n in ("adc", "bus", "cam")]


def j(job_id: str, deadline: float, release: float = 0.0) -> Job:
    """Job ids start with the task name."""
    return Job(id=job_id, task=job_id[:3], release=release, deadline=deadline)


class Edf:
    """An EdfScheduler behind a PluginManager, with the calls a test needs."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("lugh")
        self.pm.add_hookspecs(lugh_sdk.api.scheduler)
        self.plugin = EdfScheduler()
        self.pm.register(self.plugin)
        for task in TASKS:
            self.pm.hook.sched_task_added(task=task)

    def release(self, *jobs: Job) -> None:
        for job in jobs:
            self.pm.hook.sched_job_released(job=job)

    def pick(self, running: Job | None = None) -> str | None:
        return self.pm.hook.sched_pick_next(now=0.0, running=running)

    def order(self) -> list[str]:
        return list(iter(self.pick, None))


@pytest.fixture
def edf() -> Edf:
    return Edf()


def test_earliest_deadline_first_then_release_task_and_id(edf):
    edf.release(j("cam1", 9.0), j("bus2", 4.0, release=1.0), j("adc1", 4.0, release=1.0),
                j("bus1", 4.0, release=0.5), j("bus0", 4.0, release=1.0), j("adc0", 2.0))
    assert edf.order() == ["adc0", "bus1", "adc1", "bus0", "bus2", "cam1"]


def test_a_strictly_earlier_deadline_preempts_and_the_running_job_waits(edf):
    running = j("cam1", 5.0)
    edf.release(j("bus1", 5.0, release=-1.0))
    assert edf.pick(running) is None  # same deadline, even if released earlier
    edf.release(j("adc1", 3.0, release=1.0))
    assert edf.pick(running) == "adc1"
    assert edf.order() == ["bus1", "cam1"]


def test_round_trip_within_the_kind(edf):
    edf.release(j("cam1", 3.0), j("adc1", 1.0), j("bus1", 2.0))
    exported = edf.pm.hook.sched_export_state()
    assert exported.kind == "edf" and [x.id for x in exported.ready] == ["adc1", "bus1", "cam1"]
    again = Edf()
    again.pm.hook.sched_import_state(state=exported)
    assert again.pm.hook.sched_export_state() == exported


@pytest.mark.parametrize("kind", ["round-robin", "priority"])
def test_other_kinds_run_queues_become_deadline_order(edf, kind):
    theirs = [j("adc1", 30.0), j("bus1", 10.0, release=1.0), j("cam1", 20.0, release=2.0)]
    assert edf.pm.hook.sched_import_state(state=SchedulerState(kind=kind, tasks=TASKS, ready=theirs))
    assert edf.pm.hook.sched_health()
    assert edf.order() == ["bus1", "cam1", "adc1"]


def test_heap_matches_a_sorted_list_under_random_churn(edf):
    rng = random.Random(7)
    model: dict[str, Job] = {}
    for n in range(3000):
        op = rng.random()
        if op < 0.5:
            job = j(f"{rng.choice(['adc', 'bus', 'cam'])}{n}", float(rng.randrange(50)), float(rng.randrange(50)))
            edf.release(job)
            model[job.id] = job
        elif op < 0.8 and model:
            gone = model.pop(rng.choice(sorted(model)))
            edf.pm.hook.sched_job_completed(job=gone)
        else:
            best = min(model.values(), key=edf.plugin.key, default=None)
            assert edf.pick() == (best and best.id)
            model.pop(best and best.id, None)
        # Lazily discarded entries are compacted away: memory follows the live jobs.
        assert len(edf.plugin.ready._heap) <= 2 * len(model) + 16
    assert edf.pm.hook.sched_health()
    assert edf.order() == [x.id for x in sorted(model.values(), key=edf.plugin.key)]
