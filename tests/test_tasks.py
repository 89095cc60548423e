"""Periodic tasks on a running kernel: add, list, remove; jobs run in worker processes,
are accounted, preempted under a preemptive scheduler, and write through storage."""

from __future__ import annotations

import time

import msgspec
import pytest

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
