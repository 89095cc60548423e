"""Real-time CPU scheduling (kernel/realtime.py): the kernel, its scheduler service and
the workers under SCHED_FIFO, every other process at the normal policy, and a clear
report when the machine refuses it. Off by default (``--rt-priority 0``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from conftest import processes_of, running_kernel
from kernel import processes, protocol, realtime
from lugh_sdk import runtime
from lugh_sdk.client import KernelClient

# util-linux: drop CAP_SYS_NICE and any RLIMIT_RTPRIO allowance, as an unprivileged account has it
RT = ["--rt-priority", "20"]
UNPRIVILEGED = ["prlimit", "--rtprio=0", "setpriv", "--inh-caps=-sys_nice", "--bounding-set=-sys_nice"]


def fifo_allowed() -> bool:
    """Whether a process started from here may take SCHED_FIFO (root, CAP_SYS_NICE or RLIMIT_RTPRIO)."""
    probe = "import os; os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(20))"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def threads(pid: int) -> dict[int, dict]:
    return {int(tid): realtime.describe(int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}


def test_the_kernel_scheduler_and_workers_run_real_time_and_nothing_else_does(home):
    # No jobs: a real-time job spinning on the other CPU is what can turn a real-time
    # kernel's reaping into a livelock (kernel/realtime.py); this test is about policies.
    with running_kernel(home, kernel_args=RT) as k:
        st = k.status()
        by_kind = {s["kind"]: s for s in st["services"]}
        if not fifo_allowed():
            assert st["kernel"]["cpu"]["policy"] == "other" and st["kernel"]["rt_priority_asked"] == 20
            assert "SCHED_FIFO 20 refused" in (home / "run" / "kernel.log").read_text()
            return
        fifo = lambda priority: {"policy": "fifo", "priority": priority}
        assert st["kernel"]["cpu"] == fifo(20)
        # every thread of the kernel, NNG's own included (they carry its messages)
        assert set(map(str, threads(st["kernel"]["pid"]).values())) == {str(fifo(20))}
        assert by_kind["scheduler"]["cpu"] == fifo(19)
        assert set(map(str, threads(by_kind["scheduler"]["pid"]).values())) == {str(fifo(19))}
        workers = [s for s in st["services"] if s["kind"] == "worker"]
        assert len(workers) == 3
        for s in workers:
            assert s["cpu"] == fifo(1) and set(map(str, threads(s["pid"]).values())) == {str(fifo(1))}
        others = [s for s in st["services"] if s["kind"] not in ("scheduler", "worker")]
        assert {s["kind"] for s in others} == {"rs", "storage", "monitor"}
        for s in others:
            assert s["cpu"]["policy"] == "other", s
            assert {t["policy"] for t in threads(s["pid"]).values()} == {"other"}, s["name"]
        assert realtime.describe(st["spare_pid"])["policy"] == "other"  # whatever it is taken for later
        # A restart takes the spare: it gets the scheduler's policy before its first socket.
        os.kill(by_kind["scheduler"]["pid"], 9)
        st = k.wait_for(lambda s: any(x["kind"] == "scheduler" and x["state"] == "up" and x["incarnation"] == 2
                                      for x in s["services"]), what="the scheduler restarted")
        scheduler = next(s for s in st["services"] if s["kind"] == "scheduler")
        assert st["counters"]["spare_taken"] >= 1
        assert set(map(str, threads(scheduler["pid"]).values())) == {str(fifo(19))}


def test_the_normal_policy_is_the_default(home):
    with running_kernel(home) as k:
        st = k.status()
        assert st["kernel"]["cpu"]["policy"] == "other" and st["kernel"]["rt_priority_asked"] == 0
        assert {s["cpu"]["policy"] for s in st["services"]} == {"other"}


def test_a_refused_policy_boots_anyway_and_says_why(home):
    prefix = []  # already refused here: nothing to drop
    if fifo_allowed():
        if not all(map(shutil.which, ("prlimit", "setpriv"))):
            pytest.skip("needs util-linux prlimit and setpriv to drop the privilege")
        if subprocess.run([*UNPRIVILEGED, "true"], capture_output=True).returncode != 0:
            pytest.skip("this process may not drop CAP_SYS_NICE from its children (no CAP_SETPCAP)")
        prefix = UNPRIVILEGED
    env = dict(os.environ, LUGH_HOME=str(home), COLUMNS="300")  # one line per status line
    lugh = [sys.executable, "-m", "lugh_sdk"]
    up = subprocess.run([*prefix, *lugh, "up", "--detach", "--workload", "none", *RT], env=env,
                        capture_output=True, text=True, timeout=60)
    try:
        assert up.returncode == 0, up.stderr
        assert "SCHED_FIFO 20 was refused" in up.stdout
        with KernelClient(home) as client:
            st = client.request(protocol.StatusReq())
        assert st["kernel"]["cpu"]["policy"] == "other"
        assert all(s["state"] == "up" for s in st["services"])
        log = (home / "run" / "kernel.log").read_text()
        assert "running at the normal CPU policy: SCHED_FIFO 20 refused: Operation not permitted" in log
    finally:
        runtime.down(home)
    assert processes_of(home) == []


def test_bad_priorities_are_refused_before_boot(home):
    for value in ("-1", "2", "100"):
        done = subprocess.run([sys.executable, "-m", "kernel", "--home", str(home), "--rt-priority", value],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "rt_priority must be 0 (the normal policy) or between 3 and 99" in done.stderr


def test_a_real_time_thread_reaps_children_from_a_normal_policy_thread(tmp_path, monkeypatch):
    """Reaping from a real-time thread can livelock in Linux's /proc cleanup
    (kernel/realtime.py): a real-time caller's wait runs on a normal-policy thread."""
    if not fifo_allowed():
        pytest.skip("SCHED_FIFO is not allowed here")
    policies = []
    original = subprocess.Popen.poll

    def recording_poll(self):
        policies.append(os.sched_getscheduler(0))
        return original(self)

    monkeypatch.setattr(subprocess.Popen, "poll", recording_poll)
    child = processes.spawn("sleeper", "timeit", ["-n", "1", "import time; time.sleep(60)"], env=dict(os.environ),
                            log_path=tmp_path / "sleeper.log", memory_budget=0, started=0.0)
    outcome = {}

    def as_real_time() -> None:
        assert realtime.apply(0, 10) == ""
        outcome["alive"] = processes.reap(child)  # running: nothing to reap, no hand-off
        processes.kill(child)
        while not processes._exited(child.pid):
            time.sleep(0.01)
        outcome["code"] = processes.reap(child)

    thread = threading.Thread(target=as_real_time)
    thread.start()
    thread.join(30)
    assert outcome == {"alive": None, "code": -9}
    assert os.SCHED_FIFO in policies  # the polls of a child still running
    assert policies[-1] == os.SCHED_OTHER  # the one that reaped it
    assert child.pidfd == -1
