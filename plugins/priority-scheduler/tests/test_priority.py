"""The priority plugin driven through a real pluggy PluginManager: its order, its
preemption decisions and its conversion of other kinds' state. The behaviour it shares
with every ReadyQueueScheduler is tested with the round-robin plugin."""

import pluggy
import pytest

import lugh_sdk.api.scheduler
from lugh_sdk.api import Job, SchedulerState, Task
from lugh_priority_scheduler.plugin import PriorityScheduler

PRIORITIES = {"low": 1, "mid": 5, "mid2": 5, "top": 200}
TASKS = [Task(name=n, period_ms=20, deadline_ms=20, budget_ms=2, priority=p) for n, p in PRIORITIES.items()]


def job(job_id: str, task: str, release: float) -> Job:
    return Job(id=job_id, task=task, release=release, deadline=release + 0.02, priority=PRIORITIES[task])


@pytest.fixture
def pm():
    manager = pluggy.PluginManager("lugh")
    manager.add_hookspecs(lugh_sdk.api.scheduler)
    manager.register(PriorityScheduler())
    for task in TASKS:
        manager.hook.sched_task_added(task=task)
    return manager


def picks(pm) -> list[str]:
    out = []
    while (picked := pm.hook.sched_pick_next(now=9.0, running=None)) is not None:
        out.append(picked)
    return out


def test_highest_priority_first_then_release_task_and_id(pm):
    for j in [job("l1", "low", 0.0), job("m3", "mid", 2.0), job("n1", "mid2", 1.0),
              job("m2", "mid", 1.0), job("m1", "mid", 1.0), job("t1", "top", 3.0)]:
        pm.hook.sched_job_released(job=j)
    assert picks(pm) == ["t1", "m1", "m2", "n1", "m3", "l1"]


@pytest.mark.parametrize(
    "candidate, preempts",
    [(job("t1", "top", 5.0), True), (job("n1", "mid2", 0.0), False), (job("l1", "low", 0.0), False)],
)
def test_only_a_strictly_higher_priority_preempts(pm, candidate, preempts):
    running = job("m1", "mid", 1.0)
    pm.hook.sched_job_released(job=candidate)
    picked = pm.hook.sched_pick_next(now=5.0, running=running)
    assert picked == (candidate.id if preempts else None)
    # The loser of the decision is queued, ready to run when the CPU is free.
    assert picks(pm) == [running.id if preempts else candidate.id]


def test_nothing_queued_means_no_preemption(pm):
    assert pm.hook.sched_pick_next(now=0.0, running=job("l1", "low", 0.0)) is None


def test_round_trip_within_the_kind(pm):
    for j in [job("l1", "low", 0.0), job("t1", "top", 1.0), job("m1", "mid", 2.0)]:
        pm.hook.sched_job_released(job=j)
    state = pm.hook.sched_export_state()
    assert (state.kind, [j.id for j in state.ready]) == ("priority", ["t1", "m1", "l1"])
    successor = PriorityScheduler()
    assert successor.sched_import_state(state) and successor.sched_health()
    assert successor.sched_export_state() == state


def test_a_round_robin_run_queue_becomes_priority_order(pm):
    fifo = [job("l1", "low", 0.0), job("m1", "mid", 1.0), job("t1", "top", 2.0), job("n1", "mid2", 3.0)]
    rr = SchedulerState(kind="round-robin", tasks=TASKS, ready=fifo, extra={"cursor": "not for us"})
    assert pm.hook.sched_import_state(state=rr)
    assert pm.hook.sched_health()
    assert picks(pm) == ["t1", "m1", "n1", "l1"]
