"""A worker stops on the kernel's preemption signal while a job runs, and only then.

The worker here is the real ``kernel.services.worker`` code in its own process, set up
as its ``main`` sets it up; only its link to the kernel is a stand-in that prints what
would be sent, so that the test can place the signal exactly: inside a job, and in the
window between the end of the job's action and its JobDone leaving.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from kernel import protocol

CHILD = textwrap.dedent("""
    import os, signal, sys, threading
    import pynng
    from kernel import protocol
    from kernel.services import worker
    from lugh_sdk.api.types import Job

    class Link:  # the kernel's side, as stdout: one line per message
        def flush(self):
            pass

    sockets = worker.take_preemptions(lambda: [pynng.Pair0(), pynng.Push0()])  # NNG starts its threads here
    server = worker.Server(Link())
    signal.signal(protocol.PREEMPT_SIGNAL, server.preempted)

    def blocked_in_every_other_thread():
        bit = 1 << (protocol.PREEMPT_SIGNAL - 1)
        masks = {}
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/status") as f:
                masks[int(tid)] = int(next(l for l in f if l.startswith("SigBlk:")).split()[1], 16) & bit
        main = threading.get_native_id()
        return len(masks) > 1 and not masks[main] and all(m for t, m in masks.items() if t != main)

    print("threads", blocked_in_every_other_thread(), flush=True)
    n = 0
    for line in sys.stdin:
        n += 1
        command, _, action = line.strip().partition(" ")
        print("started", flush=True)
        done = server.handle(protocol.RunJob(job=Job(id=f"j#{n}", task="j", release=0.0, deadline=1e9), action=action))
        if command == "preempt-after-action":  # the kernel's decision lands just as the job ended
            os.kill(os.getpid(), protocol.PREEMPT_SIGNAL)
        print("jobdone", done.job_id, done.ok, flush=True)
""")


def state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def wait_state(pid: int, wanted: str, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if state(pid) == wanted:
            return True
        time.sleep(0.005)
    return False


@pytest.fixture
def child():
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0,
                            start_new_session=True)  # an orphaned process group, as a kernel's workers are
    proc.unread = b""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.wait(10)
        proc.stdin.close()
        proc.stdout.close()


def line(proc, timeout: float = 10.0) -> list[str]:
    """The child's next line, split; fails (not hangs) if none comes in ``timeout``.
    Read from the descriptor itself: a buffered reader would hide a line it holds."""
    deadline = time.monotonic() + timeout
    while b"\n" not in proc.unread:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"no line from the worker in {timeout} s (state {state(proc.pid)})"
        chunk = os.read(proc.stdout.fileno(), 4096)
        assert chunk, "the worker exited"
        proc.unread += chunk
    first, proc.unread = proc.unread.split(b"\n", 1)
    return first.decode().split()


def send(proc, line: str) -> None:
    proc.stdin.write(line.encode() + b"\n")


def test_nng_threads_leave_the_preemption_signal_to_the_main_thread(child):
    assert line(child) == ["threads", "True"]


def test_a_preemption_stops_a_running_job_until_sigcont(child):
    line(child)
    send(child, "run spin:600")
    assert line(child) == ["started"]
    time.sleep(0.05)
    os.kill(child.pid, protocol.PREEMPT_SIGNAL)
    assert wait_state(child.pid, "T"), f"the worker did not stop: state {state(child.pid)}"
    time.sleep(0.3)
    assert state(child.pid) == "T"  # stays stopped: the job does not go on behind the kernel's back
    os.kill(child.pid, signal.SIGCONT)
    assert line(child) == ["jobdone", "j#1", "True"]


def test_a_preemption_after_the_action_ended_leaves_the_jobdone_free_to_go(child):
    line(child)
    send(child, "preempt-after-action spin:1")
    assert line(child) == ["started"]
    # Stopped here, the worker would never print it (the kernel's SIGSTOP did exactly that).
    assert line(child) == ["jobdone", "j#1", "True"]
    assert state(child.pid) != "T"
    send(child, "run noop")  # and the next job runs as usual
    assert line(child) == ["started"]
    assert line(child) == ["jobdone", "j#2", "True"]
