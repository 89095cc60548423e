"""The reincarnation server: restart policy (backoff, intensity, give-up), each kind's
safe mode, the RS's own death, hot standby, crash-loop rollback, bounded buffering
while a service is down, and faults made through the real paths (SIGKILL, SIGSTOP, a
plugin made to raise).

The policy is tested with a fake clock; everything else on a real kernel. Waits poll
with generous timeouts; nothing asserts on elapsed time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import boot, install_fixture_plugin, pids_alive, processes_of
from kernel import journal as kjournal, protocol, supervision
from kernel.install import last_undoable
from kernel.supervisor import ROLLBACK_OP, crashloop_target
from lugh_sdk import chaos, runtime
from lugh_sdk.api import Task
from lugh_sdk.client import LughError, attach, detach

TASKS = [
    Task(name="fast", period_ms=20, deadline_ms=20, budget_ms=2, priority=90, action="noop"),
    Task(name="mid", period_ms=50, deadline_ms=50, budget_ms=5, priority=50, action="spin:1"),
]


# --------------------------------------------------------------------------- the policy, on a fake clock

def policy(**settings) -> supervision.RestartPolicy:
    return supervision.RestartPolicy(supervision.Table(supervision.Settings(**settings)))


def restart_delays(p: supervision.RestartPolicy, failures: int, now: float = 100.0, up_for: float = 0.0):
    """Fail ``failures`` times, each restart carried out when due and the service then up
    for ``up_for``; the delay of each restart, or 'give-up'."""
    out = []
    for _ in range(failures):
        verdict = p.failed("svc", now, "crash")
        if verdict == "give-up":
            out.append("give-up")
            break
        due = p.services["svc"].due
        assert p.due(due) == [("svc", "crash", "")]
        out.append(round(due - now, 3))
        now = due + up_for
    return out


def test_first_restart_is_immediate_then_backoff_doubles_up_to_the_cap():
    assert restart_delays(policy(intensity=100, period=1000), 11) == [
        0.0, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]
    assert restart_delays(policy(intensity=100, period=1000, backoff_start=0.5, backoff_cap=2.0), 5) == [
        0.0, 0.5, 1.0, 2.0, 2.0]


def test_more_than_intensity_restarts_within_the_period_is_a_give_up():
    assert restart_delays(policy(), 7) == [0.0, 0.05, 0.1, 0.2, 0.4, "give-up"]  # default: 5 in 10 s
    p = policy(intensity=2, period=10)
    assert restart_delays(p, 3) == [0.0, 0.05, "give-up"]
    assert p.failed("svc", 1000.0, "again") == "give-up"  # given up stays given up ...
    p.reset("svc")  # ... until reset (an operator restart, a rollback)
    assert p.failed("svc", 1000.0, "again") == "restart"


def test_restarts_leave_the_window_and_a_stable_run_makes_the_next_restart_immediate():
    # Up 3 s after each restart: 3 restarts per 10 s never reach the limit of 5.
    assert restart_delays(policy(stable=10.0), 12, up_for=3.0)[-1] != "give-up"
    # Up longer than ``stable`` after each restart: every restart is immediate again.
    assert restart_delays(policy(stable=2.0), 8, up_for=2.5) == [0.0] * 8


def test_the_policy_state_survives_its_process():
    p = policy()
    p.failed("a", 10.0, "crash", peer="a-1")
    p.due(10.0)
    p.failed("a", 10.5, "crash", peer="a-2")  # a restart scheduled, not yet sent
    p.failed("b", 10.5, "crash", peer="b-3")
    q = policy()
    q.restore(json.loads(json.dumps(p.snapshot())))  # what the kernel keeps for the next RS
    assert q.describe("a", 10.5) == p.describe("a", 10.5)
    assert q.services["a"].due == pytest.approx(10.55) and q.services["a"].peer == "a-2"
    # The restart of b was sent just before the RS died: the service is up, so it was done.
    q.done_elsewhere("b", 11.0)
    assert q.services["b"].due is None and len(q.services["b"].restarts) == 1
    assert q.due(10.6) == [("a", "crash", "a-2")]


def test_immediate_says_what_a_failure_now_would_get():
    # The kernel's standing order (a hot standby takes over before the RS answers) rests
    # on this: immediate(now) is true exactly when failed(now) schedules a restart now.
    p = policy(intensity=3, period=10.0, stable=4.0)
    now, checked = 100.0, 0
    for step in [0.0, 0.5, 0.5, 5.0, 0.2, 0.2, 11.0, 1.0, 4.5, 0.1, 0.1, 0.1, 30.0]:
        now += step
        q = policy(intensity=3, period=10.0, stable=4.0)
        q.restore(p.snapshot())  # the kernel holds the RS's snapshot, not its objects
        at_once = q.immediate("svc", now)
        verdict = p.failed("svc", now, "crash")
        assert at_once == (verdict == "restart" and p.services["svc"].due == now), (now, verdict)
        checked += at_once
        if verdict == "restart":
            p.due(p.services["svc"].due)  # carried out
        elif verdict == "give-up":
            p.reset("svc")
    assert 0 < checked < 13  # both answers were exercised
    assert policy(intensity=0).immediate("new", 0.0) is False  # a first failure is a give-up
    assert policy().immediate("new", 0.0) is True


def test_settings_from_the_file_and_the_environment(tmp_path):
    assert supervision.load(tmp_path).defaults == supervision.Settings()
    supervision.write(tmp_path, defaults={"heartbeat_ms": 50, "intensity": 3},
                      services={"storage": {"standby": True, "heartbeat_ms": 200}})
    table = supervision.load(tmp_path, environ={"LUGH_RS_POLICY": '{"backoff_cap": 1}'})
    assert table("scheduler") == supervision.Settings(heartbeat=0.05, intensity=3, backoff_cap=1.0)
    assert table("storage").standby and table("storage").heartbeat == 0.2 and table("storage").intensity == 3
    assert table("storage").hang_after == pytest.approx(0.6)  # two missed heartbeats, plus one period
    assert supervision.Table.from_wire(table.to_wire())("storage") == table("storage")
    (tmp_path / "supervision.toml").write_text("[defaults]\nheartbeat = 5\n")
    with pytest.raises(supervision.SettingsError, match="unknown setting 'heartbeat'"):
        supervision.load(tmp_path)
    (tmp_path / "supervision.toml").write_text("[defaults]\nintensity = -1\n")
    with pytest.raises(supervision.SettingsError, match="intensity"):
        supervision.load(tmp_path)


def test_the_crash_loop_rollback_target_comes_from_the_journal():
    installed = {"round-robin-scheduler": ["1.0.0"], "edf-scheduler": ["1.0.0"], "my-sched": ["1.0.0", "1.1.0"]}
    swap = {"op": "swap.commit", "data": {"id": "s1", "service": "scheduler", "from": "round-robin-scheduler",
                                          "to": "edf-scheduler"}}
    target = lambda records, current="edf-scheduler": crashloop_target(records, "scheduler", current, installed)[:2]
    assert crashloop_target([swap], "scheduler", "edf-scheduler", installed) == ("round-robin-scheduler", "", "s1")
    assert target([swap, {"op": ROLLBACK_OP, "data": {"service": "scheduler"}}])[0] is None  # once per change
    assert target([swap], current="round-robin-scheduler")[0] is None  # not what runs now
    assert "no longer installed" in crashloop_target([swap], "scheduler", "edf-scheduler", {"edf-scheduler": ["1.0.0"]})[1]
    moved = {"op": "swap.commit", "data": {**swap["data"], "service": "storage", "data_dir": "storage-x"}}
    assert "moved its data set" in crashloop_target([moved], "storage", "edf-scheduler", installed)[1]
    # `lugh install my-sched --swap`: a swap to name==version, then the install record
    install_swap = [{"op": "swap.commit", "data": {"service": "scheduler", "from": "edf-scheduler", "to": "my-sched==1.1.0"}},
                    {"op": "install.commit", "data": {"service": "scheduler", "name": "my-sched", "version": "1.1.0",
                                                      "from": "edf-scheduler"}}]
    assert target(install_swap, current="my-sched==1.1.0") == ("edf-scheduler", "")
    # a newer version installed beside the running one: a restart runs it; back to the one before
    newer = [{"op": "install.commit", "data": {"service": "scheduler", "name": "my-sched", "version": "1.1.0"}}]
    assert target(newer, current="my-sched") == ("my-sched==1.0.0", "")


def test_lugh_rollback_does_not_undo_again_what_a_crash_loop_rollback_undid():
    def swap(id_, from_, to):
        return {"op": "swap.commit", "data": {"id": id_, "service": "scheduler", "from": from_, "to": to}}

    def crashloop(undoes, from_, to):
        return {"op": ROLLBACK_OP, "data": {"id": "c-" + undoes, "service": "scheduler", "undoes": undoes,
                                            "reason": "6 restarts in 10 s", "from": from_, "to": to}}

    provisioning = {"op": "install.commit", "data": {"id": "p1", "name": "round-robin-scheduler", "version": "1.0.0",
                                                     "provisioning": True}}
    first = swap("s1", "round-robin-scheduler", "edf-scheduler")
    second = swap("s2", "edf-scheduler", "crash-loop-scheduler")
    assert last_undoable([provisioning, first, second]) is second
    # The kernel reverted s2 after a crash loop: `lugh rollback` undoes the one before ...
    assert last_undoable([provisioning, first, second, crashloop("s2", "crash-loop-scheduler", "edf-scheduler")]) is first
    # ... or finds nothing left to undo.
    assert last_undoable([provisioning, second, crashloop("s2", "crash-loop-scheduler", "edf-scheduler")]) is None
    # `lugh install NAME --swap`: a swap, then the install that owns it. The crash loop's
    # record names the install (or, from an older kernel, its swap): the install is undone.
    install_swap = [swap("s3", "edf-scheduler", "my-sched==1.1.0"),
                    {"op": "install.commit", "data": {"id": "i1", "service": "scheduler", "name": "my-sched",
                                                      "version": "1.1.0", "swap_id": "s3", "from": "edf-scheduler"}}]
    assert last_undoable([first, *install_swap])["data"]["id"] == "i1"
    for undoes in ("i1", "s3"):
        records = [first, *install_swap, crashloop(undoes, "my-sched==1.1.0", "edf-scheduler")]
        assert last_undoable(records) is first, undoes
    # A change made after the crash-loop rollback is undoable as usual.
    third = swap("s4", "edf-scheduler", "round-robin-scheduler")
    assert last_undoable([first, second, crashloop("s2", "crash-loop-scheduler", "edf-scheduler"), third]) is third


def test_the_chaos_plan_is_reproducible_and_within_each_restart_budget():
    services = ["rs", "scheduler", "storage", "monitor", "w0", "w1", "w2"]
    budgets = {name: (4, 10.0) for name in services}
    first = chaos.plan(42, 120, 2.0, services, chaos.KINDS, budgets)
    assert first == chaos.plan(42, 120, 2.0, services, chaos.KINDS, budgets)
    assert first != chaos.plan(43, 120, 2.0, services, chaos.KINDS, budgets)
    assert {f.kind for f in first} == set(chaos.KINDS) and {f.service for f in first} == set(services)
    assert all(f.service in chaos.PLUGIN_SERVICES for f in first if f.kind == "raise")
    for f in first:
        window = [g for g in first if g.service == f.service and g.restarts_it and 0 <= f.planned_s - g.planned_s < 10]
        assert len(window) <= 4


# --------------------------------------------------------------------------- on a real kernel

@pytest.fixture
def supervised(home):
    """Boot a kernel with the given supervision settings and the small workload; at
    teardown, nothing of it may be left running."""
    started = []

    def start(defaults=None, services=None, extra_env=None, workload_tasks=TASKS):
        if defaults or services:
            supervision.write(home, defaults=defaults, services=services)
        running = boot(home, extra_env=extra_env)
        started.append(running)
        for task in workload_tasks:
            running.request(protocol.TaskAddReq(task=task))
        if workload_tasks:
            completes(running)
        return running

    yield start
    for running in started:
        pids = running.pids()
        running.client.close()
        runtime.down(home)
        deadline = time.monotonic() + 15
        while (pids_alive(pids) or processes_of(home)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pids_alive(pids) == [] and processes_of(home) == [], "processes left behind"


def svc(st: dict, name: str) -> dict:
    return next(s for s in st["services"] if s["name"] == name)


def completes(k, jobs: int = 20) -> dict:
    start = k.status()["tasks"]["completed"]
    return k.wait_for(lambda st: st["tasks"]["completed"] >= start + jobs, what=f"{jobs} more jobs to complete")


def back(k, name: str, old_pid: int, timeout: float = 60.0) -> dict:
    """Wait until ``name`` is up in a new process and the old one is gone; its status."""
    st = k.wait_for(lambda st: svc(st, name)["state"] == "up" and svc(st, name)["pid"] not in (None, old_pid)
                    and not pids_alive([old_pid]), timeout=timeout, what=f"{name} to be back")
    return svc(st, name)


def only_live_processes(k) -> None:
    """Every process of this kernel is an active incarnation, a standby or the spare host
    interpreter: nothing stopped, killed or superseded is left behind."""
    def same(st):
        expected = {s["pid"] for s in st["services"] if s["pid"]}
        expected |= {s["standby"]["pid"] for s in st["services"] if s.get("standby")}
        expected |= {st["spare_pid"]} - {None}
        return set(processes_of(k.home)) == expected

    k.wait_for(same, what="only the live processes to be left")


class Client:
    """An attached lane client writing known keys and recording every answer."""

    def __init__(self, k, name="t"):
        self.k = k
        self.link = attach(k.client, name)
        self.req = 0
        self.answers: dict[int, protocol.KvResult] = {}

    def put(self, key: str, value: bytes, lane=protocol.Lane.HIGH) -> int:
        self.req += 1
        assert self.link.send(protocol.KvPut(req=self.req, writes=[(key, value)]), lane)
        return self.req

    def get(self, key: str) -> int:
        self.req += 1
        assert self.link.send(protocol.KvGet(req=self.req, key=key), protocol.Lane.HIGH)
        return self.req

    def wait(self, reqs, timeout: float = 60.0) -> dict[int, protocol.KvResult]:
        deadline = time.monotonic() + timeout
        while not all(r in self.answers for r in reqs) and time.monotonic() < deadline:
            item = self.link.recv(0.2)
            if item is not None and isinstance(item[1], protocol.KvResult):
                self.answers[item[1].req] = item[1]
        missing = [r for r in reqs if r not in self.answers]
        assert not missing, f"no answer to {len(missing)} requests"
        return {r: self.answers[r] for r in reqs}

    def close(self):
        detach(self.k.client, self.link)


def test_a_killed_or_hung_service_is_back_and_each_fault_counts_once(supervised):
    k = supervised()
    for name, sig in (("scheduler", signal.SIGKILL), ("storage", signal.SIGSTOP), ("monitor", signal.SIGSTOP),
                      ("w1", signal.SIGKILL), ("rs", signal.SIGSTOP)):
        before = k.service(name)
        os.kill(before["pid"], sig)
        after = back(k, name, before["pid"])
        assert after["restarts"] == before["restarts"] + 1, (name, after)  # not twice: a hang is one failure
        assert after["failures"] == before["failures"] + 1, (name, after)
        assert after["incarnation"] > before["incarnation"]
        assert ("hung: no heartbeat" if sig == signal.SIGSTOP else "killed by SIGKILL") in after["last_failure"]
        if name != "rs":  # the RS's own policy is the kernel's
            k.wait_for(lambda st: svc(st, name)["policy"]["restarts_in_period"] == 1, what="the RS to count it once")
        k.wait_for(lambda st: svc(st, name)["last_recovery"] and svc(st, name)["last_recovery"]["serving_at"],
                   what=f"{name} to serve again")
    st = completes(k)
    assert st["counters"]["hangs"] == 3 and st["counters"]["service_failures"] == 5, st["counters"]
    assert st["tasks"]["released"] == st["tasks"]["completed"] + st["tasks"]["ready"]
    assert all(s["lost"] == 0 for s in st["services"] if s["kind"] != "worker"), st["services"]
    only_live_processes(k)


def test_the_rs_comes_back_with_its_policy_state_and_the_services_keep_running(supervised):
    k = supervised()
    for _ in range(2):
        pid = k.service("monitor")["pid"]
        os.kill(pid, signal.SIGKILL)
        back(k, "monitor", pid)
    k.wait_for(lambda st: svc(st, "monitor")["policy"]["restarts_in_period"] == 2, what="two restarts on record")
    services = {n: k.service(n)["pid"] for n in ("scheduler", "storage", "monitor")}
    rs = k.service("rs")["pid"]
    os.kill(rs, signal.SIGKILL)
    rs_back = back(k, "rs", rs)
    assert rs_back["last_failure"].startswith("killed by SIGKILL")
    # Its policy state survived (kept by the kernel), and nothing else was restarted.
    st = completes(k)
    assert svc(st, "monitor")["policy"]["restarts_in_period"] == 2
    assert {n: svc(st, n)["pid"] for n in services} == services

    # A failure while the RS is down (hung) waits for it and is handled when it returns.
    rs = rs_back["pid"]
    os.kill(rs, signal.SIGSTOP)
    monitor = k.service("monitor")["pid"]
    os.kill(monitor, signal.SIGKILL)
    back(k, "rs", rs)
    m = back(k, "monitor", monitor)
    assert m["policy"]["restarts_in_period"] == 3 and m["restarts"] == 3
    assert svc(completes(k), "scheduler")["pid"] == services["scheduler"]
    only_live_processes(k)


def test_giving_up_enters_each_kinds_safe_mode_and_restart_leaves_it(supervised):
    # Intensity 1: the second failure within the period is one too many.
    k = supervised(services={name: {"intensity": 1, "period_s": 600} for name in ("scheduler", "storage", "monitor")})
    c = Client(k)
    assert c.wait([c.put("before", b"safe")])[c.req].ok

    def fail_twice(name):
        for _ in range(2):
            pid = svc(k.wait_for(lambda st: svc(st, name)["state"] == "up", what=f"{name} up"), name)["pid"]
            os.kill(pid, signal.SIGKILL)
            k.wait_for(lambda st: svc(st, name)["pid"] != pid, what=f"{name} to go down")
        return k.wait_for(lambda st: svc(st, name)["state"] == "failed", what=f"{name} declared failed")

    # scheduler: the kernel's fallback policy makes every decision; no job is lost.
    st = fail_twice("scheduler")
    assert "fallback" in svc(st, "scheduler")["safe_mode"] and "given up" in svc(st, "scheduler")["last_failure"]
    before = st["counters"]
    after = completes(k, 40)["counters"]
    assert after["fallback_decisions"] - before.get("fallback_decisions", 0) >= 40 - 1
    assert any(r["op"] == "service.failed" and r["data"]["service"] == "scheduler"
               for r in k.request(protocol.LogReq())["records"])

    # monitor: the system runs without it.
    st = fail_twice("monitor")
    assert "without a monitor" in svc(st, "monitor")["safe_mode"]
    completes(k)

    # storage: writes refused with a clear error, reads served by a read-only incarnation ...
    st = fail_twice("storage")
    assert "writes are refused" in svc(st, "storage")["safe_mode"]
    k.wait_for(lambda st: "reads are served" in svc(st, "storage")["safe_mode"], what="the read-only incarnation")
    answers = c.wait([c.put("during", b"x"), c.get("before")])
    put, get = answers[c.req - 1], answers[c.req]
    assert not put.ok and "writes are refused" in put.error
    assert get.ok and get.value == b"safe"
    with pytest.raises(LughError, match="writes are refused"):
        k.request(protocol.KvReq(put=[("during", b"x")]))
    # ... and if that one dies too, reads are refused as well (never served wrong).
    read_only = k.wait_for(lambda st: svc(st, "storage")["pid"], what="read-only storage")
    os.kill(svc(read_only, "storage")["pid"], signal.SIGKILL)
    st = k.wait_for(lambda st: svc(st, "storage")["pid"] is None, what="the read-only incarnation to be gone")
    assert "writes and reads are refused" in svc(st, "storage")["safe_mode"]
    get = c.wait([c.get("before")])[c.req]
    assert not get.ok and "reads are unavailable" in get.error
    completes(k)  # the workers' readings are refused; the jobs run on

    # `lugh restart` brings each back out of its safe mode.
    for name in ("scheduler", "storage", "monitor"):
        out = subprocess.run([sys.executable, "-m", "lugh_sdk", "restart", name], capture_output=True, text=True,
                             env=dict(os.environ, LUGH_HOME=str(k.home)))
        assert out.returncode == 0 and "safe mode" in out.stdout, out
        k.wait_for(lambda st: svc(st, name)["state"] == "up" and not svc(st, name)["safe_mode"], what=f"{name} back")
    assert c.wait([c.put("after", b"ok")])[c.req].ok
    assert c.wait([c.get("before")])[c.req].value == b"safe"
    c.close()
    only_live_processes(k)


def test_a_hot_standby_takes_over_without_a_process_start(supervised):
    # stable_s: a second failure of a service within the test is not stable, so it gets
    # a backoff (the RS decides it) rather than an immediate restart.
    k = supervised(services={name: {"standby": True, "stable_s": 600} for name in ("scheduler", "storage", "monitor", "rs")})
    c = Client(k)
    written = [c.put(f"k{i}", b"v%d" % i) for i in range(50)]
    assert all(r.ok for r in c.wait(written).values())
    assert k.request(protocol.KvStatsReq())["checked_ahead"] is False  # the first storage checked at its open
    for name in ("storage", "scheduler", "monitor", "rs"):
        st = k.wait_for(lambda st: (svc(st, name)["standby"] or {}).get("state") == "ready", what=f"{name}'s standby")
        active, standby = svc(st, name)["pid"], svc(st, name)["standby"]["pid"]
        os.kill(active, signal.SIGKILL)
        now = back(k, name, active)
        assert now["pid"] == standby, (name, now)  # the spare took over: no process was started for it
        assert now["last_recovery"]["how"] == "standby"
        # ... and a new spare is started for the next time.
        k.wait_for(lambda st: (svc(st, name)["standby"] or {}).get("pid") not in (None, standby),
                   what=f"a new standby for {name}")
    # A first failure is restarted at once by the policy: the standby took over on the
    # RS's standing order, without waiting for its Restart; the RS counted it.
    st = k.wait_for(lambda st: all(svc(st, n)["policy"]["restarts_in_period"] == 1 for n in ("storage", "scheduler", "monitor")),
                    what="the RS's count of the takeovers")
    assert st["counters"]["takeovers_at_once"] == 3  # the RS itself is the kernel's to restart
    # The storage that took over opened the data set the failed one left: nothing lost;
    # it had checked the data set while it waited (storage_check), not at its promotion.
    assert k.request(protocol.KvStatsReq())["checked_ahead"] is True
    answers = c.wait([c.get(f"k{i}") for i in range(50)] + [c.put("after", b"ok")])
    assert [a.value for a in list(answers.values())[:50]] == [b"v%d" % i for i in range(50)]
    assert list(answers.values())[-1].ok
    # A hang is taken over the same way.
    st = k.wait_for(lambda st: (svc(st, "storage")["standby"] or {}).get("state") == "ready", what="a standby")
    os.kill(svc(st, "storage")["pid"], signal.SIGSTOP)
    assert back(k, "storage", svc(st, "storage")["pid"])["pid"] == svc(st, "storage")["standby"]["pid"]
    assert c.wait([c.put("after-hang", b"ok")])[c.req].ok
    # A second failure within `stable`: a backoff, the RS's Restart awaited.
    assert k.status()["counters"]["takeovers_at_once"] == 3
    st = completes(k)
    assert st["tasks"]["released"] == st["tasks"]["completed"] + st["tasks"]["ready"]
    c.close()
    only_live_processes(k)


def test_a_restart_takes_the_pre_imported_spare_host_and_works_without_one(supervised):
    k = supervised()
    c = Client(k)
    for name in ("storage", "scheduler", "monitor"):
        st = k.wait_for(lambda st: st["spare_pid"] is not None, what="a spare host")
        spare, active = st["spare_pid"], svc(st, name)["pid"]
        os.kill(active, signal.SIGKILL)
        now = back(k, name, active)
        assert now["pid"] == spare, (name, now)  # the waiting interpreter became the new incarnation
        assert now["last_recovery"]["how"] == "spawn"
        assert (k.home / "run" / f"{now['peer']}.log").exists()  # its log goes by its peer name
        k.wait_for(lambda st: st["spare_pid"] not in (None, spare), what="a new spare host")
    assert c.wait([c.put("with-spare", b"ok")])[c.req].ok
    # A spare that dies before it is taken is discarded: the restart is a plain spawn.
    st = k.wait_for(lambda st: st["spare_pid"] is not None, what="a spare host")
    spare, active = st["spare_pid"], svc(st, "storage")["pid"]
    os.kill(spare, signal.SIGKILL)
    k.wait_for(lambda st: not pids_alive([spare]), what="the spare to be gone")
    os.kill(active, signal.SIGKILL)
    assert back(k, "storage", active)["pid"] != spare
    assert c.wait([c.put("without-spare", b"ok")])[c.req].ok
    st = completes(k)
    assert st["tasks"]["released"] == st["tasks"]["completed"] + st["tasks"]["ready"]
    c.close()
    only_live_processes(k)


def test_a_plugin_that_crash_loops_after_a_swap_is_rolled_back(supervised):
    k = supervised()
    install_fixture_plugin(k.home, "crash-loop-scheduler")
    result = k.request(protocol.SwapReq(service="scheduler", plugin="crash-loop", health_window_ms=0), timeout=90)
    assert result["committed"], result
    st = k.wait_for(lambda st: st["counters"].get("crashloop_rollbacks") == 1, timeout=90,
                    what="the crash loop to be rolled back")
    st = k.wait_for(lambda st: svc(st, "scheduler")["state"] == "up", what="the previous scheduler up")
    sched = svc(st, "scheduler")
    assert sched["plugin"] == "round-robin-scheduler" and not sched["safe_mode"]
    assert "rolled back to round-robin-scheduler" in sched["last_failure"]
    records = k.request(protocol.LogReq())["records"]
    rollback = [r for r in records if r["op"] == ROLLBACK_OP]
    assert len(rollback) == 1 and rollback[0]["data"]["from"] == "crash-loop-scheduler"
    assert rollback[0]["data"]["undoes"] == result["id"]  # the swap it reverted
    assert rollback[0]["data"]["to"] == "round-robin-scheduler" and "restarts" in rollback[0]["data"]["reason"]
    assert rollback[0]["seq"] > next(r["seq"] for r in records if r["op"] == "swap.commit")
    k.wait_for(lambda st: json.loads((k.home / "state" / "services.json").read_text())["plugins"]["scheduler"]
               == "round-robin-scheduler", what="the configuration to be rewritten")
    # `lugh rollback` knows that the swap was undone already: nothing is left to undo.
    with pytest.raises(LughError, match="no install or swap left to undo"):
        k.request(protocol.RollbackReq(), timeout=60)
    assert svc(k.status(), "scheduler")["plugin"] == "round-robin-scheduler"
    st = completes(k, 40)
    assert st["tasks"]["released"] == st["tasks"]["completed"] + st["tasks"]["ready"]
    only_live_processes(k)


def test_a_rollback_journaled_before_a_crash_rolls_forward_at_boot(home):
    runtime.up(home, workload="none")  # first boot: the journal and configuration exist
    runtime.down(home)
    journal = kjournal.Journal(home / "state" / "journal.log")
    journal.append(ROLLBACK_OP, id="x1", service="scheduler", reason="test", **{"from": "round-robin-scheduler",
                                                                                  "to": "edf-scheduler"})
    journal.close()
    k = boot(home)
    try:
        assert k.service("scheduler")["plugin"] == "edf-scheduler"
        assert json.loads((home / "state" / "services.json").read_text())["plugins"]["scheduler"] == "edf-scheduler"
    finally:
        k.client.close()
        runtime.down(home)


def test_messages_wait_for_a_service_that_is_down_within_a_bound(supervised):
    # A storage that heartbeats slowly stays stopped (hung, undetected) until the test
    # kills it: everything sent meanwhile waits in the kernel, HIGH without a bound.
    k = supervised(services={"storage": {"heartbeat_ms": 5000}}, extra_env={"LUGH_DOWN_BUFFER_CAP": "100"},
                   workload_tasks=[])
    c = Client(k)
    assert c.wait([c.put("pre", b"before")])[c.req].ok
    pid = k.service("storage")["pid"]
    os.kill(pid, signal.SIGSTOP)
    read = c.get("pre")  # a read sent to the stopped incarnation is sent again to the next one
    # LOW first: the kernel reads HIGH before LOW, so LOW sent after HIGH would find the
    # log full of HIGH or not depending on timing. Past the bound, a LOW write is refused
    # at once (dropped, counted, its client told); the last refusal answered means every
    # LOW write has been admitted or refused.
    low = [c.put(f"l{i}", b"%d" % i, lane=protocol.Lane.LOW) for i in range(150)]
    refused = c.wait(low[-30:], timeout=30)
    assert all(not r.ok and "restarting" in r.error for r in refused.values())
    high = [c.put(f"h{i}", b"%d" % i) for i in range(150)]  # past the bound: HIGH still waits
    os.kill(pid, signal.SIGKILL)
    back(k, "storage", pid)
    answers = c.wait(high + low + [read])
    assert all(answers[r].ok for r in high), "HIGH is never dropped"
    assert answers[read].ok and answers[read].value == b"before"
    acked_low = [r for r in low if answers[r].ok]
    assert 0 < len(acked_low) < len(low) and acked_low == low[:len(acked_low)], "the newest are dropped"
    st = k.status()
    dropped = svc(st, "storage")["buffer_dropped"]
    assert dropped == len(low) - len(acked_low) and st["counters"]["buffer_dropped"] == dropped
    values = c.wait([c.get(f"h{i}") for i in range(150)])
    assert [v.value for v in values.values()] == [b"%d" % i for i in range(150)]
    c.close()


def test_a_plugin_made_to_raise_keeps_serving_and_chaos_reports(supervised):
    k = supervised()
    before = k.service("scheduler")
    armed = k.request(protocol.FaultReq(service="scheduler"))
    assert armed["pid"] == before["pid"]
    st = k.wait_for(lambda st: svc(st, "scheduler")["plugin_errors"] > before["plugin_errors"],
                    what="the scheduler plugin to raise")
    assert svc(st, "scheduler")["pid"] == before["pid"] and svc(st, "scheduler")["state"] == "up"
    assert "InjectedFault" in (k.home / "run" / f"{before['peer']}.log").read_text()
    with pytest.raises(LughError, match="hosts no plugin"):
        k.request(protocol.FaultReq(service="rs"))
    completes(k)
    out = subprocess.run([sys.executable, "-m", "lugh_sdk", "chaos", "--duration", "4", "--seed", "3", "--rate", "2",
                          "--json"], capture_output=True, text=True, env=dict(os.environ, LUGH_HOME=str(k.home)),
                         timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["seed"] == 3 and report["summary"]["injected"] >= 1
    assert report["summary"]["recovered"] == report["summary"]["injected"], report
    assert [(f["service"], f["kind"]) for f in report["faults"]] == [
        (f.service, f.kind) for f in chaos.plan(3, 4, 2, [s["name"] for s in k.status()["services"]], chaos.KINDS,
                                                {s["name"]: (4, 10.0) for s in k.status()["services"]})]
    only_live_processes(k)
