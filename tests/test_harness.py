"""The vendor test harness (lugh_sdk.harness): the scheduler simulation is exact,
deterministic and checks answers as the kernel does; the conformance suites pass the
first-party plugins and catch broken ones; monitors replay recorded events."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from lugh_sdk import harness
from lugh_sdk.api import Job, Task, hookimpl
from lugh_sdk.api.queues import KeyedScheduler, ReadyQueueScheduler, RotationQueue
from lugh_sdk.firstparty import plugins_source
from lugh_sdk.harness import Decision
from lugh_sdk.harness.loader import hook_coverage, plugin_manager


@pytest.fixture
def first_party(monkeypatch):
    """Import first-party plugin classes from their projects in plugins/."""

    def load(project: str, module: str, cls: str):
        monkeypatch.syspath_prepend(str(plugins_source() / project))
        return getattr(__import__(f"{module}.plugin", fromlist=[cls]), cls)

    return load


# Utilisation 0.9: EDF meets every deadline; a non-preemptive FIFO cannot, since the
# 15 ms job of `c` blocks `a` (period 10, budget 3) past its deadline.
U90 = [Task(name="a", period_ms=10, deadline_ms=10, budget_ms=3),
       Task(name="b", period_ms=20, deadline_ms=20, budget_ms=6),
       Task(name="c", period_ms=50, deadline_ms=50, budget_ms=15)]


class Edf(KeyedScheduler):
    KIND = "edf"

    @staticmethod
    def urgency(job: Job) -> float:
        return job.deadline


class Fifo(ReadyQueueScheduler):
    KIND = "fifo"

    def make_queue(self):
        return RotationQueue()


def test_edf_meets_every_deadline_at_utilisation_0_9_where_non_preemptive_fifo_does_not(first_party):
    assert harness.utilisation(U90) == pytest.approx(0.9)
    edf = harness.simulate(first_party("edf-scheduler", "lugh_edf_scheduler", "EdfScheduler"), U90, 1000)
    fifo = harness.simulate(first_party("round-robin-scheduler", "lugh_round_robin_scheduler",
                                        "RoundRobinScheduler"), U90, 1000)
    for result in (edf, fifo):
        assert result.protocol_ok, result.summary()
        assert result.overall.released == result.overall.completed == 100 + 50 + 20
    assert edf.misses == 0 and edf.preemptions > 0, edf.summary()
    assert fifo.preemptions == 0 and fifo.misses > 0, fifo.summary()
    assert {j.task for j in fifo.missed_jobs} == {"a"}
    assert edf.tasks["c"].response.max_ms <= 50 < fifo.tasks["a"].response.max_ms + 50


def test_preemption_is_exact_and_the_preempted_job_resumes_where_it_stopped():
    tasks = [Task(name="low", period_ms=100, deadline_ms=100, budget_ms=10),
             Task(name="high", period_ms=100, deadline_ms=20, budget_ms=2, offset_ms=3)]
    result = harness.simulate(Edf, tasks, 100)
    assert result.trace == [
        Decision(at_ms=0.0, running=None, answer="low#1", action="dispatch", job="low#1"),
        Decision(at_ms=3.0, running="low#1", answer="high#1", action="preempt", job="high#1"),
        Decision(at_ms=5.0, running=None, answer="low#1", action="dispatch", job="low#1"),
    ]
    jobs = {j.id: j for j in result.jobs}
    assert [j.id for j in result.jobs] == ["high#1", "low#1"]
    assert (jobs["high#1"].start_ms, jobs["high#1"].finish_ms, jobs["high#1"].response_ms) == (3.0, 5.0, 2.0)
    assert (jobs["low#1"].start_ms, jobs["low#1"].finish_ms, jobs["low#1"].preemptions) == (0.0, 12.0, 1)
    assert result.tasks["low"].response.max_ms == 12.0 and result.end_ms == 12.0
    assert result.overall.response.count == 2 and result.overall.response.mean_ms == 7.0


def test_the_plugin_sees_the_kernels_units_and_the_release_and_decision_protocol():
    seen = []

    class Recorder(Edf):
        @hookimpl
        def sched_job_released(self, job):
            seen.append(("released", job.id, job.release, job.deadline, job.budget_ms))
            super().sched_job_released(job)

        @hookimpl
        def sched_job_completed(self, job):
            seen.append(("completed", job.id))
            super().sched_job_completed(job)

        @hookimpl
        def sched_pick_next(self, now, running):
            seen.append(("pick", now, running.id if running else None))
            return super().sched_pick_next(now, running)

    harness.simulate(Recorder, [Task(name="t", period_ms=4, deadline_ms=3, budget_ms=1.5)], 8)
    assert seen == [("released", "t#1", 0.0, 0.003, 1.5), ("pick", 0.0, None), ("completed", "t#1"),
                    ("released", "t#2", 0.004, 0.007, 1.5), ("pick", 0.004, None), ("completed", "t#2")]


def test_the_same_input_gives_the_same_trace():
    def run(seed: int):
        rng = random.Random(seed)
        return harness.simulate(Edf, U90, 500, execution=lambda job: job.budget_ms * rng.uniform(0.3, 1.2))

    first, again, other = run(1), run(1), run(2)
    assert first.trace == again.trace and first.jobs == again.jobs
    assert first.trace_digest() == again.trace_digest() != other.trace_digest()
    assert json.dumps(first.to_dict()) == json.dumps(again.to_dict())


class Bogus(Fifo):
    """Answers every third question with an id that is not a ready job."""

    def __init__(self):
        super().__init__()
        self.calls = itertools.count(1)

    @hookimpl
    def sched_pick_next(self, now, running):
        if next(self.calls) % 3 == 0:
            return "no-such-job"
        return super().sched_pick_next(now, running)


class Idle(Fifo):
    @hookimpl
    def sched_pick_next(self, now, running):
        return None


class Raising(Fifo):
    @hookimpl
    def sched_pick_next(self, now, running):
        raise RuntimeError("boom")


@pytest.mark.parametrize("plugin, counter, action", [
    (Bogus, "invalid_decisions", "invalid"), (Idle, "refusals", "refused"), (Raising, "hook_errors", "error")])
def test_answers_are_checked_as_the_kernel_checks_them_and_the_fallback_keeps_dispatching(plugin, counter, action):
    result = harness.simulate(plugin, U90, 200)
    count = getattr(result, counter)
    assert (len(count) if isinstance(count, list) else count) > 0
    assert any(d.action == action for d in result.trace)
    assert not result.protocol_ok
    # the kernel's fallback dispatched instead: no job is lost
    assert result.overall.completed == result.overall.released == 20 + 10 + 4
    assert result.fallback_decisions > 0
    if plugin is Raising:
        assert result.hook_errors[0].startswith("sched_pick_next at 0.000 ms: RuntimeError: boom")


def test_an_overrunning_task_skips_releases_past_the_kernels_backlog_cap():
    # 500 releases, one job done every 5 periods: past its bound (BACKLOG_S of releases)
    # the task skips.
    result = harness.simulate(Edf, [Task(name="t", period_ms=2, deadline_ms=2, budget_ms=1)], 1000,
                              execution={"t": 10})
    rep = result.tasks["t"]
    assert rep.released + rep.skipped == 500 and rep.skipped > 0
    assert rep.completed == rep.released and rep.missed == rep.completed


def test_removing_a_task_drops_its_queued_jobs():
    tasks = [Task(name="long", period_ms=10, deadline_ms=10, budget_ms=8),
             Task(name="gone", period_ms=10, deadline_ms=10, budget_ms=1, offset_ms=1)]
    result = harness.simulate(Fifo, tasks, 30, remove={"gone": 5})
    assert result.tasks["gone"].dropped == 1 and result.tasks["gone"].completed == 0
    assert result.protocol_ok, result.summary()
    with pytest.raises(ValueError, match="unknown"):
        harness.simulate(Fifo, tasks, 30, remove={"nope": 5})


# --- conformance ------------------------------------------------------------------------

FIRST_PARTY = [("scheduler", "edf-scheduler", "lugh_edf_scheduler", "EdfScheduler"),
               ("scheduler", "priority-scheduler", "lugh_priority_scheduler", "PriorityScheduler"),
               ("scheduler", "round-robin-scheduler", "lugh_round_robin_scheduler", "RoundRobinScheduler"),
               ("storage", "sqlite-storage", "lugh_sqlite_storage", "SqliteStorage"),
               ("storage", "memory-storage", "lugh_memory_storage", "MemoryStorage"),
               ("monitor", "heartbeat-monitor", "lugh_heartbeat_monitor", "HeartbeatMonitor")]


@pytest.mark.parametrize("kind, project, module, cls", FIRST_PARTY, ids=[p[1] for p in FIRST_PARTY])
def test_first_party_plugins_pass_their_kinds_conformance_suite(first_party, kind, project, module, cls, tmp_path):
    results = harness.run_suite(kind, first_party(project, module, cls), tmp_path)
    assert [r for r in results if r.status == "failed"] == []
    assert [r.name for r in results] == [c.name for c in harness.cases(kind)]


class LosesThePreempted(Edf):
    """Preempts, but forgets to queue the job it preempted."""

    @hookimpl
    def sched_pick_next(self, now, running):
        if running is None:
            return super().sched_pick_next(now, running)
        best = self.ready.peek()
        if best is not None and self.preempts(best, running):
            return self.ready.pop().id
        return None


_flips = itertools.count()


class Flaky(Edf):
    """Every other instance orders by latest deadline: not reproducible."""

    def __init__(self):
        self.flip = next(_flips) % 2
        super().__init__()

    def key(self, job):
        return (-job.deadline if self.flip else job.deadline, job.release, job.task, job.id)

    def preempts(self, candidate, running):
        return False


class Credulous(Edf):
    """Imports any state without checking it."""

    @hookimpl
    def sched_import_state(self, state):
        self.tasks = {t.name: t for t in state.tasks}
        for job in state.ready:
            self.ready.push(job)
        return True


@pytest.mark.parametrize("plugin, case, message", [
    (LosesThePreempted, "protocol-light-load", "broke the scheduling protocol"),
    (Flaky, "deterministic", "two runs of the same workload differ"),
    (Credulous, "refuses-bad-state", "unknown task was accepted"),
])
def test_the_scheduler_suite_catches_a_broken_scheduler(plugin, case, message):
    results = {r.name: r for r in harness.run_suite("scheduler", plugin)}
    assert results[case].status == "failed" and message in results[case].detail
    with pytest.raises(AssertionError, match=message):
        next(c for c in harness.cases("scheduler") if c.name == case).check(plugin)


def test_hook_coverage_names_a_missing_hook_and_an_unmarked_override():
    class Unmarked(Edf):
        def sched_health(self):  # no @hookimpl: pluggy does not see it
            return True

    coverage = hook_coverage(plugin_manager("scheduler", Unmarked), "scheduler")
    assert not coverage.complete and coverage.missing == ("sched_health",) and coverage.unmarked == ("sched_health",)
    assert "defined without @hookimpl" in coverage.problem()
    assert hook_coverage(plugin_manager("scheduler", Edf), "scheduler").complete


class DictStore:
    """An API 1.0 backend that is neither atomic nor durable: writes applied one by
    one, saved to a file only on close."""

    def __init__(self):
        self.data, self.seq, self.file = {}, 0, None

    @hookimpl
    def storage_open(self, path):
        from pathlib import Path

        self.file = Path(path) / "data.json"
        Path(path).mkdir(parents=True, exist_ok=True)
        if self.file.exists():
            saved = json.loads(self.file.read_text())
            self.data, self.seq = {k: v.encode("latin-1") for k, v in saved["data"].items()}, saved["seq"]
        return True

    @hookimpl
    def storage_get(self, key):
        return self.data.get(key)

    @hookimpl
    def storage_commit(self, writes):
        for key, value in writes:
            if value is not None and not isinstance(value, bytes):
                raise TypeError("bytes needed")
            self.data[key] = value
            if value is None:
                del self.data[key]
        self.seq += 1
        return self.seq

    @hookimpl
    def storage_stats(self):
        return {"keys": len(self.data), "last_seq": self.seq}

    @hookimpl
    def storage_close(self):
        self.file.write_text(json.dumps({"seq": self.seq,
                                         "data": {k: v.decode("latin-1") for k, v in self.data.items()}}))


def test_the_storage_suite_catches_a_backend_that_is_not_atomic_or_not_durable(tmp_path):
    results = {r.name: r for r in harness.run_suite("storage", DictStore, tmp_path)}
    assert results["commit-is-atomic"].status == "failed"
    assert "applied some of its writes" in results["commit-is-atomic"].detail
    assert results["crash-keeps-acknowledged-commits"].status == "failed"
    assert "lost after a crash" in results["crash-keeps-acknowledged-commits"].detail
    for ok in ("keys-and-values", "stats-cross-ipc", "reopen-keeps-commits"):
        assert results[ok].status == "passed", results[ok]
    # API 1.1 cases need hook groups an API 1.0 backend does not have: skipped, not failed
    assert results["prefix-scan"].status == "skipped" and "does not implement storage_" in results["prefix-scan"].detail


def test_hook_coverage_refuses_a_storage_group_implemented_in_part():
    class HalfScan(DictStore):
        @hookimpl
        def storage_history(self, limit, before):
            return []

    coverage = hook_coverage(plugin_manager("storage", HalfScan), "storage")
    assert not coverage.complete and coverage.partial[0].startswith("versions (missing: storage_versions")
    assert hook_coverage(plugin_manager("storage", DictStore), "storage").complete


class Hoarder:
    """Keeps every event in its report, and chokes on kinds it does not know."""

    def __init__(self):
        self.seen = []

    @hookimpl
    def monitor_event(self, kind, data, at):
        self.seen.append({"kind": kind, **data, "at": at, "late": data["late_ms"]})

    @hookimpl
    def monitor_report(self):
        return {"events": list(self.seen)}


def test_the_monitor_suite_catches_a_growing_report_and_a_crash_on_unknown_events():
    results = {r.name: r for r in harness.run_suite("monitor", Hoarder)}
    assert results["recorded-events"].status == "passed"
    assert results["unknown-events-ignored"].status == "failed" and "KeyError" in results["unknown-events-ignored"].detail
    assert results["bounded-report"].status == "failed" and "grows with the events" in results["bounded-report"].detail


def test_a_monitor_replays_a_recording_from_a_file(first_party, tmp_path):
    events = harness.sample_events()
    assert events and {e.kind for e in events} == {"deadline_miss"}
    assert set(events[0].data) == {"job", "task", "late_ms"}  # the kernel's schema
    from lugh_sdk.harness.monitor import save_events

    save_events(tmp_path / "rec.jsonl", events)
    assert harness.load_events(tmp_path / "rec.jsonl") == events
    run = harness.replay(first_party("heartbeat-monitor", "lugh_heartbeat_monitor", "HeartbeatMonitor"), events)
    assert run.errors == [] and run.events == len(events)
    assert run.report["events"] == {"deadline_miss": len(events)} and len(run.report["deadline_misses"]) == 20
    (tmp_path / "bad.jsonl").write_text('{"kind": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        harness.load_events(tmp_path / "bad.jsonl")
