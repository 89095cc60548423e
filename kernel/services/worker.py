"""Worker: the process in which jobs execute, outside the kernel. ``python -m kernel.services.worker``.

One job at a time. The kernel preempts a job by stopping this whole process and
resumes it with SIGCONT. Its preemption signal (``protocol.PREEMPT_SIGNAL``) stops the
process only while a job runs: the handler, in the main thread (the only thread that
takes the signal), stops the process (SIGSTOP) if the action has not returned yet, and
ignores it otherwise. A preemption decided just as the job ended would otherwise stop
this process with the job's JobDone still inside it, and the kernel would count a job
already finished as preempted until it chose to resume it (seen: up to 41 ms, the
task's next job held back all that time). Actions are Python code, so the handler runs
within one bytecode; an action that blocks in a system call is interrupted for it.

The deck (the kernel's dispatch queue, kernel/core.py): RunJobs sent ahead arrive as one
batch and wait in this process's link; each starts when the one before it ends. The
completions are kept while the next job is one of a task whose last job here ran under
``HOLD_BELOW_S``, and leave together when the batch is done or another job starts, each
with its own ``finished`` instant: one send and one kernel pass for a deck of short jobs.
A job that runs longer than its task's last one holds the completions before it that
much longer; the kernel's accounting is exact all the same (``finished``).

Actions (the ``--action`` of a task):
- ``noop``
- ``spin:MS``: busy for MS milliseconds of CPU (a synthetic load);
- ``sample:QUANTITY:SENSOR``: read a simulated grid sensor (voltage, frequency,
  current, breaker) and write the reading through the storage service (LOW lane);
  the job does not wait for the commit, the acknowledgement is counted when it comes.
- ``fail``: raise (to test failure accounting).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
import zlib

from kernel import protocol
from kernel.processes import die_with_parent
from kernel.protocol import Lane
from kernel.services import loop

HOLD_BELOW_S = 0.0005
TOOK_CAP = 4096

SENSORS = {  # nominal value, swing, cycles per second of the simulated signal
    "voltage": (230.0, 6.0, 0.2),
    "frequency": (50.0, 0.05, 0.1),
    "current": (120.0, 35.0, 0.05),
    "breaker": (1.0, 0.0, 0.0),
}


def sample(quantity: str, sensor: str, now: float) -> float:
    nominal, swing, hz = SENSORS[quantity]
    if quantity == "breaker":  # closed, except a few trips that come and go
        return 0.0 if (int(now) + zlib.crc32(sensor.encode())) % 97 == 0 else 1.0
    phase = (zlib.crc32(sensor.encode()) % 628) / 100.0
    return nominal + swing * math.sin(2 * math.pi * hz * now + phase)


def parse_action(action: str) -> tuple[str, list[str]]:
    name, *args = action.split(":")
    if name == "noop" and not args:
        return name, args
    if name == "spin" and len(args) == 1:
        float(args[0])
        return name, args
    if name == "sample" and len(args) == 2 and args[0] in SENSORS and args[1]:
        return name, args
    if name == "fail" and not args:
        return name, args
    raise ValueError(f"unknown action {action!r}: use noop, spin:MS, sample:QUANTITY:SENSOR "
                     f"(QUANTITY one of {', '.join(SENSORS)}) or fail")


class Server:
    def __init__(self, link):
        self.link = link
        self.req = 0
        self.acked = 0
        self.failed_writes = 0
        self.took: dict[str, float] = {}  # task -> how long its last job ran here
        self.in_job = False  # an action is running: a preemption stops this process

    def preempted(self, signum, frame) -> None:
        if self.in_job:
            os.kill(os.getpid(), signal.SIGSTOP)

    def handle(self, msg):
        if isinstance(msg, protocol.RunJob):
            if self.took.get(msg.job.task, HOLD_BELOW_S) >= HOLD_BELOW_S:
                # Not known to be short: the completions before it leave now, not after it.
                self.link.flush()
            began = time.monotonic()
            self.in_job = True
            try:
                self.run(msg.action)
                done = protocol.JobDone(job_id=msg.job.id, ok=True)
            except Exception as exc:
                done = protocol.JobDone(job_id=msg.job.id, ok=False, error=f"{type(exc).__name__}: {exc}")
            finally:
                self.in_job = False
            done.finished = time.monotonic()
            if len(self.took) >= TOOK_CAP:
                self.took.clear()
            self.took[msg.job.task] = done.finished - began
            return done
        if isinstance(msg, protocol.KvResult):
            if msg.ok:
                self.acked += 1
            else:
                self.failed_writes += 1
        return None

    def run(self, action: str) -> None:
        name, args = parse_action(action)
        if name == "spin":
            end = time.thread_time() + float(args[0]) / 1000.0
            while time.thread_time() < end:
                pass
        elif name == "sample":
            value = sample(args[0], args[1], time.time())
            self.req += 1
            key = f"grid/{args[0]}/{args[1]}"
            self.link.send(protocol.KvPut(req=self.req, writes=[(key, b"%.4f" % value)]), Lane.LOW)
        elif name == "fail":
            raise RuntimeError("the action failed on purpose")


def take_preemptions(connect):
    """``connect()`` with the preemption signal blocked, so that the threads NNG starts
    for the sockets inherit the block and the signal always reaches the main thread,
    which runs the actions and the handler. Until the handler is set, the signal is
    ignored (the default action, stopping, would be the race the handler closes)."""
    signal.signal(protocol.PREEMPT_SIGNAL, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {protocol.PREEMPT_SIGNAL})
    try:
        return connect()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {protocol.PREEMPT_SIGNAL})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kernel.services.worker")
    parser.add_argument("--peer", required=True)
    parser.add_argument("--heartbeat", type=float, default=0.1)
    parser.add_argument("--standby", action="store_true", help="hot standby: wait, started, until promoted")
    args = parser.parse_args(argv)
    die_with_parent(int(os.environ["LUGH_PARENT_PID"]))
    link = take_preemptions(lambda: loop.connect_from_env(args.peer))
    try:
        server = Server(link)
        signal.signal(protocol.PREEMPT_SIGNAL, server.preempted)
        if args.standby:
            promote = loop.await_promotion(link, args.heartbeat)
            if promote is None:
                return 0
            loop.promoted(link, promote, loop.Stream())
        loop.serve(link, server, loop.Stream(), args.heartbeat)
    finally:
        link.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
