"""Periodic tasks on a running kernel: add, list, remove; jobs run in worker processes,
are accounted, preempted under a preemptive scheduler, and write through storage."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import msgspec
import pluggy
import pytest

import lugh_sdk.api.scheduler
from conftest import processes_of, running_kernel
from kernel import ipc, paths, protocol
from kernel.core import Options
from kernel.protocol import Lane
from kernel.tasks import TaskTable
from kernel.services import scheduler as scheduler_service
from kernel.services.loop import Stream
from lugh_sdk.api.queues import KeyedScheduler
from lugh_sdk.api.types import Job, Task
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
    # Once the urgent job is done, the long one is the only ready job: it continues at
    # once, without a question (direct dispatch).
    st = kernel.wait_for(lambda s: s["counters"].get("preemptions", 0) >= 3 and s["counters"].get("resumed", 0) >= 3
                         and s["counters"].get("direct_resumes", 0) >= 1, what="preemptions and direct resumptions")
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
    dispatch queue (``deck_starts``) without a round trip. Every job is still
    accounted (none lost) and a more important release still preempts the running job."""
    with running_kernel(home, kernel_args=["--dispatch-batch", "8"]) as k:
        swap = k.request(protocol.SwapReq(service="scheduler", plugin="priority"), timeout=120)
        assert swap["committed"], swap
        for i in range(4):  # released together: a backlog for the batch to decide
            add(k, name=f"n{i}", period_ms=20, action="noop", priority=5)
        add(k, name="long", period_ms=100, budget_ms=40, action="spin:40", priority=1)
        add(k, name="urgent", period_ms=7, deadline_ms=7, budget_ms=1, action="noop", priority=200)
        st = k.wait_for(lambda s: s["counters"].get("deck_starts", 0) >= 20
                        and s["counters"].get("preemptions", 0) >= 3 and s["counters"].get("resumed", 0) >= 3,
                        what="starts from the dispatch queue, preemptions and resumptions")
        t = st["tasks"]
        assert t["released"] == t["completed"] + t["ready"]  # nothing lost
        rows = {r["name"]: r for r in k.request(protocol.TaskListReq())["tasks"]}
        assert all(rows[f"n{i}"]["completed"] >= 3 and rows[f"n{i}"]["failed"] == 0 for i in range(4))
        # Removing tasks drops their queued jobs; those already in a worker's deck finish.
        dropped = sum(k.request(protocol.TaskRemoveReq(name=f"n{i}"))["queued_jobs_dropped"] for i in range(4))
        done = k.status()["tasks"]["completed"]
        t = k.wait_for(lambda s: s["tasks"]["completed"] >= done + 20, what="more jobs after the removals")["tasks"]
        assert t["released"] == t["completed"] + t["ready"] + dropped


class _ByPriority(KeyedScheduler):
    """The priority plugin's order (a larger number first), not the kernel's (deadline)."""

    KIND = "by-priority"

    @staticmethod
    def urgency(job):
        return -job.priority


def _priority_service(*tasks: str) -> scheduler_service.Server:
    """The scheduler service's message handling over a priority plugin, in this
    process, with ``tasks`` added (100 ms periods)."""
    pm = pluggy.PluginManager("lugh")
    pm.add_hookspecs(lugh_sdk.api.scheduler)
    pm.register(_ByPriority())
    server = scheduler_service.Server(pm.hook, Stream(), None)
    for name in tasks:
        server.handle(protocol.TaskAdded(seq=0, task=Task(name=name, period_ms=100, deadline_ms=100, budget_ms=1)))
    return server


def test_with_several_slots_the_scheduler_service_asks_about_each_running_job_in_turn():
    """The kernel names the running jobs least urgent first by its own order (latest
    deadline first). A priority plugin ranks them otherwise: the service asks it about
    each in turn and the first job it would stop gives up its slot."""
    server = _priority_service("a", "b", "c")
    late_important = Job(id="a#1", task="a", release=0.0, deadline=0.09, priority=9)
    early_minor = Job(id="b#1", task="b", release=0.0, deadline=0.05, priority=1)
    middle = Job(id="c#1", task="c", release=0.01, deadline=0.1, priority=5)
    server.handle(protocol.JobReleased(seq=0, job=middle))
    answer = server.handle(protocol.PickNext(through=0, req=7, now=0.01, running=late_important,
                                             others=[early_minor]))
    assert (answer.req, answer.job_id, answer.preempts) == (7, "c#1", "b#1")
    # The stopped job is back on the plugin's queue; asked again, nothing preempts.
    again = server.handle(protocol.PickNext(through=0, req=8, now=0.01, running=late_important, others=[middle]))
    assert (again.job_id, again.preempts) == (None, None)
    assert server.handle(protocol.PickNext(through=0, req=9, now=0.01)).job_id == "b#1"


def test_with_several_slots_a_job_waits_while_another_of_its_task_is_on_a_worker():
    """The service skips the plugin's picks whose task has a job on a worker and gives
    them back in order; a preempted job of that task (itself on a worker) may resume."""
    server = _priority_service("a", "b")
    running = Job(id="a#0", task="a", release=0.0, deadline=0.1, priority=9)
    queued = [Job(id="a#1", task="a", release=0.1, deadline=0.2, priority=9),
              Job(id="a#2", task="a", release=0.2, deadline=0.3, priority=8),
              Job(id="b#1", task="b", release=0.0, deadline=0.1, priority=5)]
    for job in queued:
        server.handle(protocol.JobReleased(seq=0, job=job))
    answer = server.handle(protocol.PickNext(through=0, req=1, now=0.2, on_workers=[running]))
    assert answer.job_id == "b#1"
    assert server.handle(protocol.PickNext(through=0, req=2, now=0.2, on_workers=[running])).job_id is None
    # a#1 is itself on a worker (preempted): it is the task's own job, it may resume.
    assert server.handle(protocol.PickNext(through=0, req=3, now=0.2, on_workers=[queued[0]])).job_id == "a#1"
    assert server.handle(protocol.PickNext(through=0, req=4, now=0.2)).job_id == "a#2"  # a#1 is off the queue


def test_a_job_the_kernel_started_directly_is_picked_off_the_plugins_queue():
    """JobStarted: the service makes the plugin's pick the kernel did not wait for; a job
    the plugin offers before it that the kernel has started (its fallback did) goes too,
    any other goes back; a job released after it is picked after those."""
    server = _priority_service("a", "b", "c", "d")
    stale = Job(id="a#1", task="a", release=0.0, deadline=0.1, priority=9)  # the fallback ran it: still queued here
    waiting = Job(id="d#1", task="d", release=0.0, deadline=0.1, priority=7)  # the kernel did not count it decided
    sole = Job(id="b#1", task="b", release=0.01, deadline=0.11, priority=5)
    later = Job(id="c#1", task="c", release=0.02, deadline=0.12, priority=1)
    for job in (stale, waiting, sole):
        server.handle(protocol.JobReleased(seq=0, job=job))
    assert server.handle(protocol.JobStarted(seq=0, job_id="b#1", at=0.01, decided=["a#1"])) is None
    server.handle(protocol.JobReleased(seq=0, job=later))
    assert server.handle(protocol.PickNext(through=0, req=1, now=0.02)).job_id == "d#1"
    assert server.handle(protocol.PickNext(through=0, req=2, now=0.02)).job_id == "c#1"
    assert server.handle(protocol.PickNext(through=0, req=3, now=0.02)).job_id is None
    assert server.stream.errors == 0


def test_a_lone_ready_job_starts_without_asking_and_the_plugin_still_decides_between_two(kernel):
    swap = kernel.request(protocol.SwapReq(service="scheduler", plugin="priority"), timeout=120)
    assert swap["committed"], swap
    add(kernel, name="solo", period_ms=10, action="noop")
    st = kernel.wait_for(lambda s: s["counters"].get("direct_dispatches", 0) >= 20, what="20 direct dispatches")
    c = st["counters"]
    # The plugin's queue stayed the kernel's: no pick of a job already started, none overruled.
    assert c.get("late_decisions", 0) == 0 and c.get("decisions_overruled", 0) == 0, c
    assert c.get("decisions_refused", 0) == 0 and c.get("scheduler_resyncs", 0) == 0, c
    # Two jobs released together: a choice, which is the plugin's (priority; the
    # fallback's EDF would start the other first, its deadline is earlier).
    kernel.request(protocol.TaskRemoveReq(name="solo"))
    add(kernel, name="important", period_ms=200, deadline_ms=200, offset_ms=300, action="noop", priority=90)
    add(kernel, name="urgent", period_ms=200, deadline_ms=50, offset_ms=300, action="noop", priority=10)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rows = [r for r in kernel.request(protocol.TaskListReq())["tasks"] if r["name"] in ("important", "urgent")]
        if len(rows) == 2 and all(r["completed"] >= 3 for r in rows):
            break
        time.sleep(0.1)
    pairs = {}
    for j in kernel.request(protocol.TaskListReq())["recent"]:
        task, _, n = j["job"].partition("#")
        if task in ("important", "urgent"):
            pairs.setdefault(n, {})[task] = j["start"]
    both = [p for p in pairs.values() if len(p) == 2]
    assert len(both) >= 3, pairs
    assert all(p["important"] < p["urgent"] for p in both), both
    t = kernel.status()["tasks"]
    assert t["released"] == t["completed"] + t["ready"]


def test_slots_must_fit_the_workers_and_exclude_the_dispatch_queue(home):
    refused = subprocess.run([sys.executable, "-m", "lugh_sdk", "up", "--detach", "--workload", "none", "--slots", "4"],
                             capture_output=True, text=True, timeout=120, env={**os.environ, "LUGH_HOME": str(home)})
    # The kernel's usage error, not "already running" (argparse's exit status was that one's).
    assert refused.returncode != 0 and "slots must be between 1 and the number of workers (3), not 4" in refused.stderr
    assert processes_of(home) == []
    with pytest.raises(ValueError, match="between 1 and the number of workers"):
        Options(workers=2, slots=3)
    with pytest.raises(ValueError, match="needs a single slot"):
        Options(workers=4, slots=2, dispatch_batch=8)
    assert Options(workers=3, slots=2).slots == 2


def test_two_slots_run_two_jobs_at_once_and_still_preempt(home):
    """``--slots 2``: two 20 ms jobs released together every 100 ms run side by side on
    two workers. An urgent release while both slots are busy preempts one of them, and
    nothing is lost. (The load leaves room to spare: an overloaded kernel skips releases
    at the backlog bound, and a skipped release asks nothing.)"""
    with running_kernel(home, workload="none", workers=4, kernel_args=["--slots", "2"]) as k:
        swap = k.request(protocol.SwapReq(service="scheduler", plugin="edf"), timeout=120)
        assert swap["committed"], swap
        # Released together: a task's first release is an offset after its add, and the
        # second add comes some ms after the first (tasks.json is fsynced in between).
        asked = time.monotonic()
        add(k, name="left", period_ms=100, budget_ms=20, action="spin:20", offset_ms=500)
        late_ms = (time.monotonic() - asked) * 1000
        add(k, name="right", period_ms=100, deadline_ms=90, budget_ms=20, action="spin:20",
            offset_ms=max(0.0, 500 - late_ms))
        # every 7 ms: whatever the phase between the tasks, releases fall inside each
        # stretch where both jobs run
        add(k, name="urgent", period_ms=7, deadline_ms=5, budget_ms=1, action="noop")
        st = k.wait_for(lambda s: s["counters"].get("preemptions", 0) >= 3 and s["counters"].get("resumed", 0) >= 3
                        and s["tasks"]["completed"] >= 60, what="preemptions, resumptions and 60 jobs")
        assert st["tasks"]["slots"] == 2
        # Both slots busy a fifth of the time: a status read soon sees two jobs running.
        # (Not so with --rt-priority on 2 CPUs: this process, at the normal policy, would
        # get no CPU while both slots run real-time workers.)
        k.wait_for(lambda s: len(s["tasks"]["running"]) == 2, what="two jobs running at once")
        # A live swap with both slots busy: the new scheduler takes over every job not
        # running (the kernel's truth leaves out both running ones), and none is lost.
        swap = k.request(protocol.SwapReq(service="scheduler", plugin="priority"), timeout=120)
        assert swap["committed"] and swap["jobs_lost"] == 0, swap
        done = k.status()["tasks"]["completed"]
        t = k.wait_for(lambda s: s["tasks"]["completed"] >= done + 30, what="30 more jobs after the swap")["tasks"]
        assert len(t["running"]) <= 2
        assert t["released"] == t["completed"] + t["ready"] and t["failed"] == 0  # nothing lost


def test_a_worker_runs_its_deck_and_reports_short_jobs_together(home):
    """Unit level, a real worker process and real sockets (the kernel's side played by
    an inbox and an outbox): RunJobs sent ahead in one batch run in order; completions
    of a task known to be short leave together in one message, each with its own finish
    instant; those before a job not known to be short leave before it runs."""
    run = paths.run_dir(home)
    inbox, outbox = ipc.Inbox(run), ipc.Outbox(run, "w9")
    env = dict(os.environ, LUGH_RUN_DIR=str(run), LUGH_PARENT_PID=str(os.getpid()))
    worker = subprocess.Popen([sys.executable, "-m", "kernel.services.worker", "--peer", "w9", "--heartbeat", "60"],
                              env=env, stdin=subprocess.DEVNULL)

    def messages(count: int) -> list[list]:
        """The next ``count`` NNG messages from the worker that carry a JobDone, unpacked."""
        out, deadline = [], time.monotonic() + 30
        while len(out) < count and time.monotonic() < deadline:
            raw = inbox.recv(Lane.HIGH)
            if raw is None:
                time.sleep(0.001)
                continue
            items = protocol.unpack(raw.bytes)[0]
            if any(isinstance(m, protocol.JobDone) for m in items):
                out.append(items)
        return out

    def deck(*jobs) -> None:
        outbox.send(protocol.encode(protocol.Ping(req=1)), Lane.HIGH)  # leaves alone; the jobs wait for the flush
        for job_id, action in jobs:
            job = Job(id=job_id, task=job_id.split("#")[0], release=0.0, deadline=1e9)
            outbox.send(protocol.encode(protocol.RunJob(job=job, action=action)), Lane.HIGH)
        assert outbox.flush()

    try:
        deck(("a#1", "noop"), ("a#2", "noop"), ("a#3", "noop"))
        [together] = messages(1)
        assert [m.job_id for m in together] == ["a#1", "a#2", "a#3"] and all(m.ok for m in together)
        assert 0 < together[0].finished <= together[1].finished <= together[2].finished <= time.monotonic()
        # b has not run here yet: a#4's completion does not wait for it; a#5 (a is short) waits for b's.
        deck(("a#4", "noop"), ("b#1", "spin:20"), ("a#5", "noop"))
        first, second = messages(2)
        assert [m.job_id for m in first] == ["a#4"] and [m.job_id for m in second] == ["b#1", "a#5"]
        assert second[0].finished - first[0].finished >= 0.02  # b spun 20 ms of CPU in between
        outbox.send(protocol.encode(protocol.Stop()), Lane.HIGH)
        assert worker.wait(timeout=30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        outbox.close()
        inbox.close()


def test_a_worker_killed_with_a_deck_gives_its_decided_jobs_back(home):
    """``--dispatch-batch 8`` under a load the kernel cannot keep up with: the running
    job's worker holds a deck of decided jobs. Frozen, then SIGKILLed: what it held, its
    job and its deck, goes back to the scheduler (``redispatched``), the worker restarts,
    and no job is lost."""
    with running_kernel(home, kernel_args=["--dispatch-batch", "8"]) as k:
        for i in range(10):
            add(k, name=f"n{i}", period_ms=2, budget_ms=0.05, action="noop")
        k.wait_for(lambda s: s["counters"].get("deck_starts", 0) >= 50, what="starts from a deck")
        held = None
        for _ in range(50):
            holder = next((w for w in k.status()["services"] if w["kind"] == "worker" and w["deck"] > 0), None)
            if holder is None:
                time.sleep(0.02)
                continue
            os.kill(holder["pid"], signal.SIGSTOP)
            time.sleep(0.2)  # what it finished before the stop has reached the kernel: its view is the worker's
            st = k.status()
            held = next(w for w in st["services"] if w["name"] == holder["name"])
            if held["pid"] == holder["pid"] and held["job"] is not None:
                break
            os.kill(holder["pid"], signal.SIGCONT)
            held = None
        assert held is not None, "no worker held a deck"
        expected = st["counters"].get("redispatched", 0) + 1 + held["deck"]
        os.kill(held["pid"], signal.SIGKILL)
        after = k.wait_for(lambda s: s["counters"].get("redispatched", 0) >= expected
                           and next(w for w in s["services"] if w["name"] == held["name"])["pid"]
                           not in (None, held["pid"]), what="the jobs given back and the worker back")
        done = after["tasks"]["completed"]
        t = k.wait_for(lambda s: s["tasks"]["completed"] >= done + 200, what="200 more jobs")["tasks"]
        assert t["released"] == t["completed"] + t["ready"] and t["failed"] == 0  # nothing lost


def test_removing_a_task_keeps_its_jobs_already_sent_to_a_worker():
    """A job in a worker's deck (sent, not started) runs whatever the table says: the
    table keeps it, as it keeps a running job, so that its completion is accounted."""
    table = TaskTable()
    table.add(Task(name="t", period_ms=10, deadline_ms=10, budget_ms=1), now=0.0)
    queued, decked = table.release_due(0.015)
    table.ready[decked.id].worker = "w0-1"
    assert [r.job.id for r in table.remove("t")] == [queued.id]
    assert list(table.ready) == [decked.id]
    assert table.finish(decked.id, 0.02, ok=True) is not None and table.totals.completed == 1


def test_two_slots_never_run_two_jobs_of_one_task_at_once(home):
    """A task that has fallen behind (its jobs run longer than its period) keeps one job
    on a worker at a time; the other slot runs the other task's jobs."""
    with running_kernel(home, workload="none", workers=4, kernel_args=["--slots", "2"]) as k:
        add(k, name="behind", period_ms=20, budget_ms=15, action="spin:30")
        add(k, name="light", period_ms=10, budget_ms=1, action="noop")
        seen = []
        deadline = time.monotonic() + 60
        while len(seen) < 60 and time.monotonic() < deadline:
            st = k.status()
            seen.append([job for job in st["tasks"]["running"] if job.startswith("behind#")])
            time.sleep(0.05)
        assert len(seen) == 60 and all(len(jobs) <= 1 for jobs in seen), seen
        rows = {r["name"]: r for r in k.request(protocol.TaskListReq())["tasks"]}
        assert rows["behind"]["completed"] >= 5 and rows["light"]["completed"] >= 50, rows
        t = k.status()["tasks"]
        assert t["released"] == t["completed"] + t["ready"] and t["failed"] == 0
