"""Live swap of the scheduler under a running workload: commit, rollback at every step
that can fail, refusals, the watchdog that ejects a silent scheduler, and a swap cut
short by a kernel crash, reverted at the next boot.

Failure modes come from the tiny plugin projects in tests/fixtures/plugins (one hook
each differs from an ordinary scheduler); they are built and installed like any plugin.
All waits poll with generous timeouts: nothing here asserts on elapsed time.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import threading
import time

import pytest

from conftest import boot, down_and_check, install_fixture_plugin, pids_alive, processes_of, running_kernel
from kernel import protocol, swap as kswap
from kernel.tasks import MAX_BACKLOG
from lugh_sdk import runtime
from lugh_sdk.api import Task
from lugh_sdk.client import KernelClient, LughError

# A small mixed workload (about 80 jobs/s): enough to keep the dispatch slot busy
# through a swap, light enough for a loaded 2-core machine.
TASKS = [
    Task(name="fast", period_ms=20, deadline_ms=20, budget_ms=2, priority=90, action="noop"),
    Task(name="mid", period_ms=50, deadline_ms=50, budget_ms=5, priority=50, action="spin:1"),
    Task(name="slow", period_ms=100, deadline_ms=100, budget_ms=10, priority=10, action="spin:2"),
]
SWAP_TIMEOUT = 90.0  # the control request; the swap's own steps have their own timeouts
COMMIT_STEPS = ["swap.begin", "swap.quiesce", "swap.import", "swap.redirect", "swap.commit"]


@pytest.fixture
def busy(kernel):
    """The ``kernel`` fixture (which checks at teardown that no process is left) with
    the workload running and completing jobs."""
    return with_workload(kernel)


def with_workload(running):
    """``running`` with the TASKS workload added and completing jobs."""
    for task in TASKS:
        running.request(protocol.TaskAddReq(task=task))
    completes(running)
    return running


def swap(kernel, plugin: str, service: str = "scheduler", **kw) -> dict:
    return kernel.request(protocol.SwapReq(service=service, plugin=plugin, **kw), timeout=SWAP_TIMEOUT)


def journal(kernel, op_id: str | None = None) -> list[dict]:
    records = kernel.request(protocol.LogReq())["records"]
    return [r for r in records if op_id is None or r["data"].get("id") == op_id]


def swap_at_import(kernel) -> str | None:
    """The id of a swap whose import step has begun, if any."""
    return next((r["data"]["id"] for r in journal(kernel) if r["op"] == "swap.import"), None)


def tasks(kernel) -> dict:
    return kernel.status()["tasks"]


def completes(kernel, jobs: int = 20) -> dict:
    """Wait until ``jobs`` more jobs have completed; returns that status."""
    start = tasks(kernel)["completed"]
    return kernel.wait_for(lambda st: st["tasks"]["completed"] >= start + jobs, what=f"{jobs} more jobs to complete")


def assert_no_job_lost(st: dict) -> None:
    t = st["tasks"]
    assert t["released"] == t["completed"] + t["ready"], t


def scheduler_of(st: dict) -> dict:
    return next(s for s in st["services"] if s["name"] == "scheduler")


def only_active_processes(kernel) -> None:
    """Every process of this kernel is an active incarnation of a service: a swap
    candidate that was rolled back is gone, not lingering beside the old one."""
    def same(st):
        return set(processes_of(kernel.home)) == {s["pid"] for s in st["services"] if s["pid"]} | ({st["spare_pid"]} - {None})

    kernel.wait_for(same, what="only the active service processes to be left")


def scheduler_decides(kernel, jobs: int = 40) -> None:
    """The scheduler service, not the kernel's fallback, makes the decisions again: the
    fallback makes every one (and more: preemption checks) while the scheduler is held
    or down, and otherwise only those the scheduler is late for."""
    before = kernel.status()["counters"]
    after = completes(kernel, jobs)["counters"]
    delta = lambda key: after.get(key, 0) - before.get(key, 0)
    assert 2 * delta("fallback_decisions") < delta("dispatched"), (before, after)


def configured_scheduler(home) -> str:
    """The scheduler plugin the next boot will run (services.json, else the default)."""
    path = home / "state" / "services.json"
    return json.loads(path.read_text())["plugins"]["scheduler"] if path.exists() else "round-robin-scheduler"


class Sampler:
    """Samples the completed-job count from its own client while a long request runs."""

    def __init__(self, home):
        self.client = KernelClient(home, timeout=10.0)
        self.samples: list[tuple[float, float, int]] = []  # (asked, answered, completed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            asked = time.monotonic()
            try:
                completed = self.client.request(protocol.StatusReq())["tasks"]["completed"]
                self.samples.append((asked, time.monotonic(), completed))
            except LughError:
                pass
            self._stop.wait(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(15)
        self.client.close()

    def within(self, start: float, end: float) -> list[int]:
        """The counts read entirely between ``start`` and ``end``."""
        return [completed for asked, answered, completed in self.samples if start < asked and answered < end]


# --------------------------------------------------------------------------- commit

def test_live_swap_commits_without_losing_a_job_and_survives_a_reboot(busy):
    home = busy.home
    for short, full in (("priority", "priority-scheduler"), ("edf", "edf-scheduler")):
        before = busy.status()
        old_pid = scheduler_of(before)["pid"]
        with Sampler(home) as sampler:
            start = time.monotonic()
            result = swap(busy, short)
            end = time.monotonic()
        assert result["committed"] is True, result
        assert (result["plugin"], result["jobs_lost"], result["messages_lost"]) == (full, 0, 0), result
        # Dispatching went on while the swap ran: the count grew between samples taken
        # during the request (it lasts at least the 300 ms health window).
        assert len(set(sampler.within(start, end))) >= 2, (sampler.samples, start, end)
        st = completes(busy)
        assert st["tasks"]["completed"] > before["tasks"]["completed"]
        sched = scheduler_of(st)
        assert (sched["plugin"], sched["state"]) == (full, "up")
        assert sched["pid"] != old_pid
        assert [r["op"] for r in journal(busy, result["id"])] == COMMIT_STEPS
        assert configured_scheduler(home) == full
        only_active_processes(busy)
        scheduler_decides(busy)
    assert_no_job_lost(busy.status())

    busy.client.close()
    runtime.down(home)
    again = boot(home)
    try:
        assert scheduler_of(again.status())["plugin"] == "edf-scheduler"
        completes(again)  # the saved tasks run under it
    finally:
        again.client.close()


# --------------------------------------------------------------------------- rollback

@pytest.mark.parametrize("plugin, step", [
    ("raise-at-import-scheduler", "spawn"),
    ("crash-in-import-scheduler", "import"),
    ("hang-in-import-scheduler", "import"),  # after swap.STEP_TIMEOUT
    ("unhealthy-scheduler", "health"),
])
def test_a_failed_swap_rolls_back_to_the_old_scheduler(busy, plugin, step):
    install_fixture_plugin(busy.home, plugin)
    old = scheduler_of(busy.status())
    result = swap(busy, plugin)
    assert (result["committed"], result["step"]) == (False, step), result
    assert (result["plugin"], result["jobs_lost"], result["messages_lost"]) == ("round-robin-scheduler", 0, 0)
    rollback = journal(busy, result["id"])[-1]
    assert rollback["op"] == "swap.rollback"
    assert rollback["data"]["step"] == step and rollback["data"]["reason"] == result["reason"] != ""
    if plugin.startswith("hang"):
        assert f"within {kswap.STEP_TIMEOUT:g}s" in result["reason"]
    st = completes(busy)
    sched = scheduler_of(st)
    assert (sched["pid"], sched["plugin"], sched["state"]) == (old["pid"], "round-robin-scheduler", "up")
    assert configured_scheduler(busy.home) == "round-robin-scheduler"
    only_active_processes(busy)
    scheduler_decides(busy)
    assert_no_job_lost(busy.status())


@pytest.mark.parametrize("service, plugin, error", [
    ("scheduler", "no-such", "no plugin 'no-such' is installed"),
    ("scheduler", "sqlite-storage", "sqlite-storage is a storage plugin, a scheduler plugin is needed"),
    ("monitor", "heartbeat", "cannot be swapped"),  # storage swaps: tests/test_storage.py
])
def test_a_swap_that_cannot_be_done_is_refused_and_changes_nothing(busy, service, plugin, error):
    def services(st):
        return {s["name"]: (s["pid"], s["plugin"]) for s in st["services"] if s["name"] in ("scheduler", "storage")}

    before, records = services(busy.status()), journal(busy)
    with pytest.raises(LughError, match=error):
        swap(busy, plugin, service=service)
    assert services(completes(busy)) == before
    assert [r for r in journal(busy) if r["op"].startswith("swap.")] == [r for r in records if r["op"].startswith("swap.")]
    assert configured_scheduler(busy.home) == "round-robin-scheduler"


# --------------------------------------------------------------------------- watchdog

@pytest.fixture
def busy_slow_heartbeat(home):
    """``busy`` with a heartbeat of 1 s (found hung after 3 s of silence). The stalling
    plugin hangs in a pick, and with direct dispatch that may be a pick the kernel does
    not wait for: the service then falls silent with no decision owed, and at the usual
    0.1 s heartbeat the hang watchdog could take it out (a restart all the same) before
    the kernel's next question went late. Every incarnation stalls, so that could go
    on until the crash-loop rollback. A slower heartbeat leaves the pick watchdog, the
    subject here, to find the stall: a question is owed within one 100 ms hyperperiod."""
    with running_kernel(home, heartbeat=1.0) as running:
        yield with_workload(running)


def test_a_scheduler_that_stops_answering_is_ejected_and_restarted(busy_slow_heartbeat):
    busy = busy_slow_heartbeat
    install_fixture_plugin(busy.home, "stall-pick-scheduler")
    # No health window: the plugin stalls after a number of decisions, which must
    # come after the commit for this kernel to run it as its scheduler.
    result = swap(busy, "stall-pick", health_window_ms=0)
    assert result["committed"] is True, result
    before = busy.status()
    first, late_before = scheduler_of(before), before["counters"].get("pick_timeouts", 0)
    samples = []  # (scheduler out: stalled, ejected or down; completed, ready) until it is back

    def ejected_and_back(st):
        sched = scheduler_of(st)
        back = (st["counters"].get("scheduler_ejected", 0) >= 1 and sched["restarts"] >= 1
                and sched["state"] == "up" and sched["pid"] != first["pid"])
        out = st["counters"].get("pick_timeouts", 0) > late_before and not back
        samples.append((out, st["tasks"]["completed"], st["tasks"]["ready"]))
        return back

    st = busy.wait_for(ejected_and_back, timeout=60, what="the stalled scheduler to be ejected and restarted")
    assert scheduler_of(st)["plugin"] == "stall-pick-scheduler"
    # journaled by the kernel's supervision writer, off the loop thread: it may land a little later
    busy.wait_for(lambda _: any(r["op"] == "scheduler.eject" for r in journal(busy)), what="the ejection journaled")
    # While the decision was late the fallback took over (the pick timed out) ...
    assert st["counters"].get("pick_timeouts", 0) >= 1, st["counters"]
    # ... and it kept dispatching through the outage: from the pick that timed out (the
    # scheduler stalled; it is ejected EJECT_AFTER later) to the restarted scheduler.
    # The restart itself is brief (it takes the pre-imported spare host), the stall is not.
    outages = [list(run) for out, run in itertools.groupby(samples, key=lambda s: s[0]) if out]
    outage = max(outages, key=len, default=[])
    assert len(outage) >= 2 and outage[-1][1] > outage[0][1], samples
    # Had dispatching stopped for a while, every task would have piled up ready jobs to
    # its backlog cap (the slowest one needs four of its periods for that).
    assert max(ready for _, _, ready in samples) < len(TASKS) * MAX_BACKLOG, samples
    completes(busy)
    assert_no_job_lost(busy.status())


def test_a_hung_scheduler_is_ejected_also_with_the_dispatch_queue(home):
    """``--dispatch-batch 8``: the scheduler process stopped (a hang, as `lugh chaos`
    injects it). The fallback's starts used to ask the next batch ahead while the pick
    was late, each question restarting the ejection clock: the hung scheduler stayed
    for good. It is ejected and restarted, and no job is lost.

    A long task keeps a job running while the others are released, so that the kernel
    asks (ahead for the deck, or whether to preempt) rather than starting a lone ready
    job directly: a question is owed when the scheduler stops, and the pick watchdog,
    not the heartbeat one, is what finds it."""
    running = boot(home, kernel_args=["--dispatch-batch", "8"])
    pids = running.pids()
    try:
        for task in (*TASKS, Task(name="long", period_ms=40, deadline_ms=40, budget_ms=30, priority=5,
                                  action="spin:25")):
            running.request(protocol.TaskAddReq(task=task))
        completes(running)
        before = running.status()
        first = scheduler_of(before)
        os.kill(first["pid"], signal.SIGSTOP)
        st = running.wait_for(lambda st: st["counters"].get("scheduler_ejected", 0) >= 1
                              and scheduler_of(st)["state"] == "up" and scheduler_of(st)["pid"] != first["pid"],
                              timeout=60, what="the hung scheduler ejected and restarted")
        assert "ejected" in scheduler_of(st)["last_failure"]
        # One question went late and stayed outstanding until the ejection (one more may
        # have been late before the stop, on a loaded machine); the bug asked anew dozens
        # of times a second.
        assert st["counters"]["pick_timeouts"] - before["counters"].get("pick_timeouts", 0) <= 2, st["counters"]
        completes(running)
        assert_no_job_lost(running.status())
    finally:
        down_and_check(running, pids)


# --------------------------------------------------------------------------- crash mid-swap

def test_a_swap_cut_short_by_a_kernel_crash_is_reverted_at_the_next_boot(busy):
    home = busy.home
    install_fixture_plugin(home, "hang-in-import-scheduler")
    old_pids = busy.pids()
    client = KernelClient(home, timeout=SWAP_TIMEOUT)
    outcome = []

    def run():
        try:
            outcome.append(client.request(protocol.SwapReq(service="scheduler", plugin="hang-in-import")))
        except Exception as exc:  # the kernel is killed under the request
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        busy.wait_for(lambda st: swap_at_import(busy) is not None, what="the swap to reach its import step")
        op_id = swap_at_import(busy)
        os.kill(old_pids[0], signal.SIGKILL)
    finally:
        # The request must not be resent to the next kernel: close its socket now.
        client.close()
        thread.join(15)
    assert outcome and not isinstance(outcome[0], dict), outcome
    deadline = time.monotonic() + 30
    while (pids_alive(old_pids) or processes_of(home)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pids_alive(old_pids) == [] and processes_of(home) == [], "the services die with their kernel"

    busy.client.close()
    again = boot(home)
    try:
        records = journal(again, op_id)
        assert [r["op"] for r in records] == ["swap.begin", "swap.quiesce", "swap.import", "swap.rollback"], records
        assert "boot" in records[-1]["data"]["reason"]
        sched = scheduler_of(again.status())
        assert (sched["plugin"], sched["state"]) == ("round-robin-scheduler", "up")
        assert configured_scheduler(home) == "round-robin-scheduler"
        only_active_processes(again)
        completes(again)
    finally:
        again.client.close()
