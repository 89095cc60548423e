"""Periodic tasks on a running kernel: add, list, remove; jobs run in worker processes,
are accounted, preempted under a preemptive scheduler, and write through storage."""

from __future__ import annotations

import time

import msgspec
import pytest

from conftest import running_kernel
from kernel import protocol
from lugh_sdk.api.types import Task
from lugh_sdk.client import LughError


def add(kernel, **kw):
    kw.setdefault("deadline_ms", kw["period_ms"])
    kw.setdefault("budget_ms", 1.0)
    kernel.request(protocol.TaskAddReq(task=Task(**kw)))


def test_jobs_are_released_dispatched_and_accounted(kernel):
    add(kernel, name="volt", period_ms=20, action="sample:voltage:f1.01", priority=5)
    add(kernel, name="idle", period_ms=50, action="noop")
    st = kernel.wait_for(lambda s: s["tasks"]["completed"] >= 40, what="40 completed jobs")
    assert st["tasks"]["count"] == 2
    listing = kernel.request(protocol.TaskListReq())
    rows = {r["name"]: r for r in listing["tasks"]}
    assert rows["volt"]["released"] >= 1 and rows["volt"]["completed"] >= 1
    assert rows["volt"]["response_max_ms"] > 0
    job = listing["recent"][-1]
    assert job["start"] >= job["release"] and job["finish"] >= job["start"]
    assert job["response_ms"] == pytest.approx((job["finish"] - job["release"]) * 1000, abs=0.01)
    # executed in a worker process, not in the kernel
    workers = {s["peer"]: s["pid"] for s in st["services"] if s["kind"] == "worker"}
    assert job["worker"] in workers and workers[job["worker"]] != st["kernel"]["pid"]
    # the sample action wrote its reading through the storage service
    value = kernel.request(protocol.KvReq(get="grid/voltage/f1.01"))["value"]
    assert 200.0 < float(value) < 260.0


def test_task_validation_errors_are_clear(kernel):
    add(kernel, name="t1", period_ms=10)
    with pytest.raises(LughError, match="exists"):
        add(kernel, name="t1", period_ms=10)
    with pytest.raises(LughError, match="deadline must not exceed the period"):
        add(kernel, name="t2", period_ms=10, deadline_ms=20)
    with pytest.raises(LughError, match="budget must not exceed the deadline"):
        add(kernel, name="t3", period_ms=10, budget_ms=11)
    with pytest.raises(LughError, match="unknown action"):
        add(kernel, name="t4", period_ms=10, action="rm -rf /")
    with pytest.raises(LughError, match="malformed request"):  # schema-checked at the kernel's door
        add(kernel, name="bad name!", period_ms=10)
    with pytest.raises(LughError, match="malformed request"):
        add(kernel, name="t5", period_ms=-1)
    with pytest.raises(LughError, match="no such item"):
        kernel.request(protocol.TaskRemoveReq(name="nope"))
    assert [r["name"] for r in kernel.request(protocol.TaskListReq())["tasks"]] == ["t1"]


def test_task_removal_stops_releases_and_survives_restart(kernel):
    add(kernel, name="keep", period_ms=10)
    add(kernel, name="drop", period_ms=10)
    kernel.wait_for(lambda s: s["tasks"]["completed"] >= 10, what="jobs")
    kernel.request(protocol.TaskRemoveReq(name="drop"))
    released = {r["name"]: r["released"] for r in kernel.request(protocol.TaskListReq())["tasks"]}
    assert set(released) == {"keep"}
    saved = msgspec.json.decode((kernel.home / "state" / "tasks.json").read_bytes(), type=list[Task])
    assert [t.name for t in saved] == ["keep"]


def test_failing_action_is_counted_not_fatal(kernel):
    add(kernel, name="bad", period_ms=20, action="fail")
    st = kernel.wait_for(lambda s: s["tasks"]["failed"] >= 3, what="failed jobs")
    assert st["tasks"]["completed"] >= st["tasks"]["failed"]
    assert all(s["state"] == "up" for s in st["services"])


def test_preemptive_scheduler_preempts_by_stopping_the_worker(kernel):
    swap = kernel.request(protocol.SwapReq(service="scheduler", plugin="priority"), timeout=120)
    assert swap["committed"], swap
    add(kernel, name="long", period_ms=100, budget_ms=40, action="spin:40", priority=1)
    add(kernel, name="urgent", period_ms=7, deadline_ms=7, budget_ms=1, action="noop", priority=200)
    st = kernel.wait_for(lambda s: s["counters"].get("preemptions", 0) >= 3 and s["counters"].get("resumed", 0) >= 3,
                         what="preemptions and resumptions")
    t = st["tasks"]
    assert t["released"] == t["completed"] + t["ready"]  # nothing lost across preemptions
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rows = {r["name"]: r for r in kernel.request(protocol.TaskListReq())["tasks"]}
        if rows["long"]["completed"] >= 2:
            break
        time.sleep(0.1)
    assert rows["long"]["completed"] >= 2 and rows["long"]["failed"] == 0  # preempted jobs do finish


def test_a_late_kernel_releases_every_job_at_its_nominal_time_up_to_the_backlog_bound():
    # The task table alone, on a fake clock: the loop that comes late to a release
    # releases what fell due meanwhile, on the period grid; only the backlog bound skips.
    from kernel.tasks import BACKLOG_S, MAX_BACKLOG, TaskTable, backlog_cap

    def task(name, period_ms):
        return Task(name=name, period_ms=period_ms, deadline_ms=period_ms, budget_ms=1, priority=1, action="noop")

    # The bound is in time (BACKLOG_S of releases), never below MAX_BACKLOG jobs.
    assert backlog_cap(task("f", 10)) == round(BACKLOG_S * 100) > MAX_BACKLOG
    assert backlog_cap(task("s", 1000)) == MAX_BACKLOG
    table = TaskTable()
    table.add(task("f", 10), now=100.0)
    assert [j.release for j in table.release_due(100.0)] == [100.0]
    late = table.release_due(100.025)  # 15 ms late for the release at 100.010
    assert [round(j.release, 3) for j in late] == [100.01, 100.02]
    assert [round(j.deadline, 3) for j in late] == [100.02, 100.03]
    assert table.tasks["f"].stats.skipped == 0 and table.tasks["f"].stats.last_release == late[-1].release
    # A slow task at its bound: three unfinished jobs, room for one more; of the six
    # releases due now, the five oldest are skipped and counted, the newest is released.
    table = TaskTable()
    table.add(task("s", 1000), now=0.0)
    for now in (0.0, 1.0, 2.0):
        table.release_due(now)
    jobs = table.release_due(8.5)
    assert [j.release for j in jobs] == [8.0] and len(table.ready) == MAX_BACKLOG
    assert table.tasks["s"].stats.skipped == 5 and table.totals.skipped == 5
    assert table.release_due(8.9) == []  # the next one is due at 9.0
    for job_id in list(table.ready):
        table.finish(job_id, 8.95, ok=True)
    assert [j.release for j in table.release_due(9.0)] == [9.0]
    stats = table.tasks["s"].stats
    assert (stats.released, stats.completed, stats.skipped) == (5, 4, 5)
    assert table.oldest_unfinished() == {"s": 9.0}


def test_release_and_start_lags_are_counted_per_job_in_cumulative_buckets():
    """The histograms bench/edf.py reads from `lugh status --json` (tasks.release_lag_us,
    tasks.start_lag_us): one count per job, in 50 µs buckets below 10 ms, 1 ms buckets to
    1 s, and "-1" beyond; cumulative, so two readings give the counts between them."""
    from kernel.tasks import TaskTable

    table = TaskTable()
    table.add(Task(name="t", period_ms=10, deadline_ms=10, budget_ms=1, action="noop"), now=100.0)
    first = table.release_due(100.00002)  # 20 µs late
    later = table.release_due(100.01232)  # 2.32 ms late for the release at 100.010
    assert [j.release for j in first + later] == [100.0, 100.01]
    assert table.release_lag.summary() == {"50": 1, "2350": 1}
    table.ready[first[0].id].started = 100.0151  # 15.1 ms after its release
    table.finish(first[0].id, 100.02, ok=True)
    table.ready[later[0].id].started = 101.5  # more than a second after its release
    table.finish(later[0].id, 101.6, ok=True)
    assert table.start_lag.summary() == {"-1": 1, "16000": 1}
    before = dict(table.release_lag.summary())
    table.release_due(100.02001)  # 10 µs late
    after = table.release_lag.summary()
    assert {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)} == {"50": 1}


def test_dispatch_queue_starts_decided_jobs_without_asking_and_still_preempts(home):
    """``--dispatch-batch 8``: the scheduler answers with several decisions at once and
    the kernel asks for the next batch while a job runs, so jobs start from the kernel's
    dispatch queue (``planned_starts``) without a round trip. Every job is still
    accounted (none lost) and a more important release still preempts the running job."""
    with running_kernel(home, kernel_args=["--dispatch-batch", "8"]) as k:
        swap = k.request(protocol.SwapReq(service="scheduler", plugin="priority"), timeout=120)
        assert swap["committed"], swap
        for i in range(4):  # released together: a backlog for the batch to decide
            add(k, name=f"n{i}", period_ms=20, action="noop", priority=5)
        add(k, name="long", period_ms=100, budget_ms=40, action="spin:40", priority=1)
        add(k, name="urgent", period_ms=7, deadline_ms=7, budget_ms=1, action="noop", priority=200)
        st = k.wait_for(lambda s: s["counters"].get("planned_starts", 0) >= 20
                        and s["counters"].get("preemptions", 0) >= 3 and s["counters"].get("resumed", 0) >= 3,
                        what="starts from the dispatch queue, preemptions and resumptions")
        t = st["tasks"]
        assert t["released"] == t["completed"] + t["ready"]  # nothing lost
        rows = {r["name"]: r for r in k.request(protocol.TaskListReq())["tasks"]}
        assert all(rows[f"n{i}"]["completed"] >= 3 and rows[f"n{i}"]["failed"] == 0 for i in range(4))
