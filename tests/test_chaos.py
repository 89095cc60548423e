"""Fault injection on the energy-grid workload: `lugh chaos` kills (-9), hangs (SIGSTOP)
and makes plugins raise, in every service, the reincarnation server and the workers
included, at least 200 times within a few minutes, while a client writes known keys
through the storage service on the HIGH and LOW lanes.

After each fault the service is back; at the end no HIGH message was lost, every
acknowledged commit is there, every task is released on schedule again, and no process
is left that should not be. Nothing here asserts on elapsed time.
"""

from __future__ import annotations

import math
import os
import threading
import time

import pytest

from conftest import boot, down_and_check, pids_alive, processes_of
from kernel import protocol, supervision
from lugh_sdk import chaos, runtime
from lugh_sdk.client import attach, detach

SEED = 20240605
DURATION = 150.0  # seconds of injection
RATE = 1.7  # faults per second, on average: the plan of this seed has more than 200
WINDOW = 4.0  # seconds of the final on-schedule check
WINDOWS = 3  # windows the workload gets to be on schedule again, one after the other


class Writer(threading.Thread):
    """Writes ``chaos/<lane>/<n>`` = ``v<n>`` at a steady pace, alternating HIGH and LOW,
    and records every answer. A write refused with an error (a commit that a plugin made
    to raise, say) is written again under a new request: only acknowledgements count."""

    def __init__(self, k):
        super().__init__(daemon=True)
        self.link = attach(k.client, "chaos")
        self.k = k
        self.stop = threading.Event()
        self.req = 0
        self.pending: dict[int, tuple[str, bytes, protocol.Lane]] = {}
        self.acked: dict[str, bytes] = {}
        self.errors = 0
        self.sent_high = 0
        self.retry: list = []

    def _send(self, key: str, value: bytes, lane) -> None:
        self.req += 1
        if self.link.send(protocol.KvPut(req=self.req, writes=[(key, value)]), lane):
            self.pending[self.req] = (key, value, lane)
            self.sent_high += lane is protocol.Lane.HIGH
        else:  # the kernel's LOW socket was full: try again later
            self.retry.append((key, value, lane))

    def _receive(self, timeout: float) -> None:
        item = self.link.recv(timeout)
        while item is not None:
            msg = item[1]
            if isinstance(msg, protocol.KvResult) and msg.req in self.pending:
                key, value, lane = self.pending.pop(msg.req)
                if msg.ok:
                    self.acked[key] = value
                else:
                    self.errors += 1
                    self.retry.append((key, value, lane))
            item = self.link.recv(0)

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            lane = protocol.Lane.HIGH if n % 2 else protocol.Lane.LOW
            self._send(f"chaos/{lane.name.lower()}/{n}", b"v%d" % n, lane)
            retry, self.retry = self.retry, []
            for key, value, lane in retry:
                self._send(key, value, lane)
            self._receive(0.03)

    def finish(self, timeout: float = 120.0) -> None:
        """Stop writing; wait for the answer to every write (retrying refused ones)."""
        self.stop.set()
        self.join(10)
        deadline = time.monotonic() + timeout
        while (self.pending or self.retry) and time.monotonic() < deadline:
            retry, self.retry = self.retry, []
            for key, value, lane in retry:
                self._send(key, value, lane)
            self._receive(0.2)

    def read_back(self) -> dict[str, bytes | None]:
        """Every acknowledged key, read through the storage service."""
        found: dict[str, bytes | None] = {}
        keys = sorted(self.acked)
        for i in range(0, len(keys), 500):
            reqs = {}
            for key in keys[i:i + 500]:
                self.req += 1
                assert self.link.send(protocol.KvGet(req=self.req, key=key), protocol.Lane.HIGH)
                reqs[self.req] = key
            deadline = time.monotonic() + 60
            while reqs and time.monotonic() < deadline:
                item = self.link.recv(0.5)
                if item is not None and isinstance(item[1], protocol.KvResult) and item[1].req in reqs:
                    assert item[1].ok, item[1]
                    found[reqs.pop(item[1].req)] = item[1].value
            assert not reqs, f"{len(reqs)} reads unanswered"
        return found


def svc(st, name):
    return next(s for s in st["services"] if s["name"] == name)


def settled(st) -> bool:
    """The work that piled up (at boot, or while services were down) has been run: fewer
    ready jobs than tasks, at the grid's 300 jobs/s a second or two of catching up; and
    the hot standbys have started (their imports compete for the CPU meanwhile)."""
    return (st["tasks"]["ready"] < st["tasks"]["count"]
            and all((s["standby"] or {}).get("state") == "ready" for s in st["services"] if s["limits"]["standby"]))


def off_schedule(k) -> dict:
    """The tasks that are not on schedule over a window of ``WINDOW`` seconds, with what
    is wrong. On schedule: no release skipped (the kernel releases every job at its
    nominal time, late if it must; only a task at its backlog bound skips); releases that
    follow the period through the whole window (their nominal times span it, one per
    period); and every job released before the window finished within it (none stuck on
    a dead worker or forgotten by a restarted scheduler)."""
    def tasks():
        return {t["name"]: t for t in k.request(protocol.TaskListReq())["tasks"]}

    before = tasks()
    time.sleep(WINDOW)
    off = {}
    for name, t in tasks().items():
        b = before[name]
        period = t["period_ms"] / 1000.0
        span = t["last_release"] - b["last_release"] if b["released"] else math.nan  # nan: none before
        got = {"released": t["released"] - b["released"], "skipped": t["skipped"] - b["skipped"],
               "span_s": round(span, 3), "completed": t["completed"] - b["completed"],
               "stuck_s": round(b["last_release"] - t["oldest_unfinished_release"], 3)
               if t["oldest_unfinished_release"] is not None else None}
        if (got["skipped"] or math.isnan(span) or got["released"] != round(span / period) or abs(span - WINDOW) > period + 0.5
                or (got["stuck_s"] is not None and got["stuck_s"] >= 0)):
            off[name] = got
    return off


@pytest.mark.timeout(1200)
def test_hundreds_of_faults_on_the_grid_workload_lose_nothing(home):
    # The default policy, except that a service up for 2 s since its last restart is
    # restarted at once the next time (stable_s): chaos hits each service every few
    # seconds, and this test is about recovery, not about backoff (test_recovery.py).
    # Hot standbys for the scheduler and storage: takeovers under fire too.
    supervision.write(home, defaults={"stable_s": 2.0},
                      services={"scheduler": {"standby": True, "stable_s": 2.0},
                                "storage": {"standby": True, "stable_s": 2.0}})
    planned = chaos.plan(SEED, DURATION, RATE, ["rs", "scheduler", "storage", "monitor", "w0", "w1", "w2"],
                         chaos.KINDS, {name: (4, 10.0) for name in ("rs", "scheduler", "storage", "monitor",
                                                                     "w0", "w1", "w2")})
    assert len(planned) >= 200
    k = boot(home, workload="grid")
    pids = k.pids()
    writer = None
    try:
        k.wait_for(lambda st: st["tasks"]["completed"] > 200 and settled(st), what="the grid workload to run")
        # The window's span is measured from each task's release before it: wait for the
        # slowest phases (up to a period of 1 s) to have released once.
        k.wait_for(lambda st: all(t["released"] for t in k.request(protocol.TaskListReq())["tasks"]),
                   what="every task to have released a job")
        # "On schedule again" needs a machine on which the workload is on schedule before
        # any fault; one too busy for that (other work on its CPUs) cannot tell whether
        # recovery restored it, and says so rather than fail or pass.
        off = off_schedule(k)
        if off:
            pytest.skip(f"the grid workload is off schedule before any fault (load average "
                        f"{os.getloadavg()[0]:.1f}): {off}")
        writer = Writer(k)
        writer.start()
        report = chaos.run(home, duration=DURATION, seed=SEED, rate=RATE, recover_timeout=90, client=k.client)
        summary = report["summary"]
        # At least 200 faults, every kind in every service it applies to, the RS included.
        assert summary["injected"] >= 200, summary
        assert set(summary["by_kind"]) == set(chaos.KINDS)
        assert {s for s, n in summary["by_service"].items()} == {"rs", "scheduler", "storage", "monitor", "w0", "w1", "w2"}
        assert {(f["service"], f["kind"]) for f in report["faults"]} >= {("rs", "kill"), ("rs", "hang")}
        # After each fault, the service was back.
        odd = [(f["n"], f["service"], f["kind"], f["outcome"], f["detail"]) for f in report["faults"]
               if f["outcome"] != "recovered"]
        assert summary["recovered"] == summary["injected"] and summary["not_recovered"] == 0, odd
        assert summary["skipped"] == 0, odd

        writer.finish()
        st = k.wait_for(lambda st: all(s["state"] == "up" for s in st["services"]), what="every service up")
        # Every failure the kernel saw is one that chaos caused: a process it killed or
        # stopped, or one whose plugin it made raise (what a plugin does after an
        # exception, even hang, is its own); none was a false hang verdict under this load.
        touched = {f["peer"] for f in report["faults"] if f["peer"]}

        def restarts():
            return [r["data"] for r in k.request(protocol.LogReq())["records"] if r["op"] == "service.restart"]

        k.wait_for(lambda st: len(restarts()) == sum(s["restarts"] for s in st["services"]),
                   what="every restart to be journaled")
        # The one exception: on a CPU-starved machine (e.g. a QEMU guest beside this test
        # on 2 cores) a service can miss 2 heartbeats without being hung; the policy then
        # restarts it, as the issue specifies, and it must lose nothing either (the checks
        # below). A few such verdicts are tolerated; a crash or exit chaos did not cause,
        # or many verdicts, is a bug.
        unexplained = [r for r in restarts() if r["failed"] not in touched]
        verdicts = [r for r in unexplained if r["reason"].startswith("hung: no heartbeat")]
        assert unexplained == verdicts and len(verdicts) <= summary["injected"] // 50, \
            f"failures chaos did not cause: {unexplained}"
        # 0 HIGH messages lost: every HIGH write was answered, none was dropped anywhere,
        # and no service saw a gap in its stream.
        assert not writer.pending, f"{len(writer.pending)} writes never answered"
        assert st["lanes"]["HIGH"]["dropped"] == 0
        assert all(s["lost"] == 0 for s in st["services"] if s["kind"] != "worker"), st["services"]
        assert writer.sent_high > 1000
        # 0 acknowledged commits lost.
        found = writer.read_back()
        assert len(writer.acked) > 2000
        assert {key: found.get(key) for key in writer.acked} == writer.acked

        # Every task is released on schedule again, and its jobs run (off_schedule), once
        # recovered (settled). The grid workload runs near what one dispatch slot does on
        # 2 loaded cores, so a task can still be catching up in the first window (once in
        # six CI runs, a task skipped 23 releases): it gets WINDOWS of them to be clean.
        k.wait_for(settled, timeout=60, what="the backlog to drain and the standbys to be ready")
        offs = []
        while len(offs) < WINDOWS and (off := off_schedule(k)):
            offs.append(off)
        assert len(offs) < WINDOWS, f"off schedule in {WINDOWS} windows after the faults: {offs}; " \
                                    f"tasks: {k.status()['tasks']}"
        st = k.status()
        assert st["tasks"]["released"] == st["tasks"]["completed"] + st["tasks"]["ready"], st["tasks"]

        # No orphan: the processes of this kernel are exactly its services and standbys.
        def only_live(st):
            expected = {s["pid"] for s in st["services"] if s["pid"]}
            expected |= {s["standby"]["pid"] for s in st["services"] if s.get("standby")}
            expected |= {st["spare_pid"]} - {None}  # the pre-imported host interpreter
            return set(processes_of(home)) == expected

        k.wait_for(only_live, what="only live processes")
        injected_pids = {f["pid"] for f in report["faults"] if f["kind"] in ("kill", "hang")}
        current = {s["pid"] for s in k.status()["services"]}
        assert pids_alive(injected_pids - current) == []
    finally:
        if writer is not None:
            writer.stop.set()
            detach(k.client, writer.link)
        k.client.close()
        runtime.down(home)
    deadline = time.monotonic() + 15
    while processes_of(home) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_of(home) == [] and pids_alive(pids) == [], "processes left behind"


@pytest.mark.parametrize("options", [
    pytest.param({"kernel_args": ["--dispatch-batch", "8"]}, id="dispatch-queue"),
    pytest.param({"kernel_args": ["--slots", "2"], "workers": 5}, id="two-slots"),
])
def test_faults_lose_no_job_with_the_dispatch_queue_or_two_slots(home, options):
    """A shorter run of the same faults on the kernel's other dispatch modes: decks of
    decided jobs at the workers, or two jobs at once. (`lugh chaos` on the dispatch
    queue found a hung scheduler never ejected: tests/test_swap.py has that case.) Every
    fault recovers and every job released is completed or still ready."""
    supervision.write(home, defaults={"stable_s": 2.0})
    k = boot(home, workload="grid", **options)
    pids = k.pids()
    try:
        k.wait_for(lambda st: st["tasks"]["completed"] > 200 and settled(st), what="the grid workload to run")
        workers = [s["name"] for s in k.status()["services"] if s["kind"] == "worker"]
        report = chaos.run(home, duration=30.0, seed=SEED, rate=2.0, recover_timeout=90, client=k.client)
        summary = report["summary"]
        odd = [(f["n"], f["service"], f["kind"], f["outcome"], f["detail"]) for f in report["faults"]
               if f["outcome"] != "recovered"]
        assert summary["injected"] >= 40 and summary["recovered"] == summary["injected"], odd
        assert {"scheduler", *workers} <= set(summary["by_service"]), summary
        st = k.wait_for(settled, timeout=60, what="the backlog to drain")
        assert st["tasks"]["released"] == st["tasks"]["completed"] + st["tasks"]["ready"], st["tasks"]
        assert st["tasks"]["failed"] == 0
    finally:
        down_and_check(k, pids)
