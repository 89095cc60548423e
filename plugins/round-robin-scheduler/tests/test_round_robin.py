"""The round-robin plugin driven through a real pluggy PluginManager. Being the plain
FIFO, it also carries the tests of the behaviour every ReadyQueueScheduler shares."""

import pluggy
import pytest

import lugh_sdk.api.scheduler
from lugh_sdk.api import Job, SchedulerState, StateError, Task
from lugh_round_robin_scheduler.plugin import RoundRobinScheduler

TASKS = [Task(name=n, period_ms=10, deadline_ms=10, budget_ms=1, priority=p) for n, p in (("a", 1), ("b", 9), ("c", 5))]


def rel(job_id: str, release: float = 0.0, deadline: float = 100.0, priority: int = 0) -> Job:
    """A job of the task named by the id's first letter."""
    return Job(id=job_id, task=job_id[0], release=release, deadline=deadline, priority=priority)


def make_hook():
    pm = pluggy.PluginManager("lugh")
    pm.add_hookspecs(lugh_sdk.api.scheduler)
    plugin = RoundRobinScheduler()
    pm.register(plugin)
    for task in TASKS:
        pm.hook.sched_task_added(task=task)
    return pm, plugin


@pytest.fixture
def hook():
    return make_hook()[0].hook


def release_all(hook, ids):
    for i, job_id in enumerate(ids):
        hook.sched_job_released(job=rel(job_id, release=float(i)))


def drain(hook) -> list[str]:
    order = []
    while (job_id := hook.sched_pick_next(now=0.0, running=None)) is not None:
        order.append(job_id)
    return order


def test_pluggy_sees_every_inherited_hookimpl():
    pm, plugin = make_hook()
    names = {caller.name for caller in pm.get_hookcallers(plugin)}
    assert names == {n for n in dir(lugh_sdk.api.scheduler) if n.startswith("sched_")}


def test_fifo_of_releases_ignores_priority_and_deadline(hook):
    hook.sched_job_released(job=rel("a1", release=0, deadline=50, priority=1))
    hook.sched_job_released(job=rel("b1", release=1, deadline=5, priority=9))
    hook.sched_job_released(job=rel("c1", release=2, deadline=1, priority=5))
    assert drain(hook) == ["a1", "b1", "c1"]
    assert hook.sched_pick_next(now=0.0, running=None) is None


def test_a_backlogged_task_takes_turns_with_the_others(hook):
    release_all(hook, ["a1", "a2", "a3", "b1", "c1"])
    assert drain(hook) == ["a1", "b1", "c1", "a2", "a3"]


def test_never_preempts(hook):
    release_all(hook, ["b1"])
    assert hook.sched_pick_next(now=1.0, running=rel("a0", priority=0, deadline=999)) is None
    assert drain(hook) == ["b1"]


def test_removing_a_task_drops_its_jobs_only(hook):
    release_all(hook, ["a1", "b1", "a2", "c1"])
    hook.sched_task_removed(name="a")
    hook.sched_job_released(job=rel("a3"))  # a release racing the removal
    assert drain(hook) == ["b1", "c1"]
    assert hook.sched_health()


def test_completion_of_a_queued_job_forgets_it_and_is_idempotent(hook):
    release_all(hook, ["a1", "b1", "c1"])
    for _ in range(2):
        hook.sched_job_completed(job=rel("b1"))
    hook.sched_job_completed(job=rel("c9"))
    assert drain(hook) == ["a1", "c1"]


def test_a_job_released_twice_is_queued_once(hook):
    release_all(hook, ["a1", "a1"])
    assert drain(hook) == ["a1"]


def test_export_is_dispatch_order_and_round_trips_mid_rotation(hook):
    release_all(hook, ["a1", "a2", "b1", "b2", "c1"])
    assert hook.sched_pick_next(now=0.0, running=None) == "a1"
    state = hook.sched_export_state()
    assert state.kind == "round-robin"
    assert [j.id for j in state.ready] == ["b1", "c1", "a2", "b2"]
    other = make_hook()[0].hook
    assert other.sched_import_state(state=state) is True
    assert other.sched_health()
    assert other.sched_export_state() == state
    assert drain(other) == drain(hook) == ["b1", "c1", "a2", "b2"]


@pytest.mark.parametrize(
    "state, problem",
    [
        (SchedulerState(tasks=TASKS, ready=[rel("z1")]), "unknown task"),
        (SchedulerState(tasks=TASKS, ready=[rel("a1"), rel("a1")]), "twice"),
        (SchedulerState(format=99, tasks=TASKS), "format"),
        (SchedulerState(tasks=TASKS + TASKS[:1]), "twice"),
    ],
)
def test_a_bad_state_is_refused_and_changes_nothing(hook, state, problem):
    release_all(hook, ["a1", "b1"])
    before = hook.sched_export_state()
    with pytest.raises(StateError, match=problem):
        hook.sched_import_state(state=state)
    assert hook.sched_export_state() == before


def test_health_sees_a_job_whose_task_is_gone():
    pm, plugin = make_hook()
    release_all(pm.hook, ["a1"])
    del plugin.tasks["a"]
    assert pm.hook.sched_health() is False
