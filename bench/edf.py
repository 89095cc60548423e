"""EDF on the real clock: 50 grid tasks at utilisation 0.9 for 60 s, deadline misses and
dispatch jitter, beside the bare timer accuracy of this machine measured in the same run.

1. ``timer`` (the baseline): this process sleeps in a selector until each ideal release
   of the same 50-task schedule (periods and phases as below) for ``--timer-s`` seconds,
   as the kernel's loop does, and records how late each wake-up is. No dispatcher
   that waits on a selector can release jobs more punctually than this. Beside it,
   ``compute``: one fixed piece of pure Python run back to back for half as long, and
   the thread CPU time of each run: the spread says how steady this CPU is (on the
   development VM some runs cost 13 x the median), which bounds how steady the
   kernel's loop and the jobs can be. And ``hop``: the one-way latency of a bare pynng
   message (Push0 -> Pull0, ``ipc://``) from a process at the kernel's real-time
   priority to one at the workers', while a spinner at the workers' priority keeps one
   CPU 90 % busy in bursts of a few ms (the EDF load, utilisation 0.9; the other CPU is
   free, as a slot is when the kernel sends a job to a worker). Every dispatch decision
   of the kernel crosses at least three such hops (kernel -> scheduler service ->
   kernel, then RunJob to a worker), so this tail is a floor under the start of a job
   that no runtime code can remove.
2. ``edf``: a kernel with ``--slots`` dispatch slots (2: one per CPU of the reference
   machine, global EDF) and ``--workers`` workers (slots + 3, so that preempted jobs,
   which keep their worker, leave one idle), whose scheduler is swapped live to the installed
   edf-scheduler plugin, with the energy-grid task set of ``kernel/workload.py`` (50
   tasks, periods 10 ms to 1 s, staggered phases, about 300 jobs/s) in which each job
   busies its worker for its whole budget (``spin:BUDGET``, CPU time), budgets set so that
   every task uses the same share and sum(budget / period) = ``--utilisation`` (0.9). After
   a 2 s warm-up, ``--seconds`` (60; ``--quick``: 20) of the kernel's own accounting:
   jobs released, completed, deadline misses, skipped releases, and two jitters per job,
   from the kernel's cumulative lag histograms (50 µs buckets; percentiles are the
   bucket's upper edge, nearest rank):
   - *release jitter*: the instant the kernel released the job minus its ideal periodic
     release (phase + k x period): the timer's lateness inside the kernel;
   - *start jitter*: the instant the job first started on a worker minus its ideal
     release: release jitter plus the wait for the dispatch slot behind jobs with
     earlier deadlines (at utilisation 0.9 that wait is part of any correct schedule).
   Jobs lost: released since boot minus completed minus still ready (queued, running
   or preempted), at the end of the window.

    python bench/edf.py [--seconds 60] [--utilisation 0.9] [--slots 2] [--workers N] [--timer-s 10] [--json] [--quick]
"""

from __future__ import annotations

import heapq
import json
import random
import selectors
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (arguments, child, child_setup, emit, goal, percentile, progress, protocol,  # noqa: E402
                           read_line, run, table,
                           temporary_kernel)
from kernel import realtime  # noqa: E402
from kernel.core import Options  # noqa: E402
from kernel.workload import grid_tasks  # noqa: E402
from lugh_sdk.api.types import Task  # noqa: E402

JITTER_LIMIT_MS = 1.0
WARMUP_S = 2.0


def task_set(utilisation: float) -> list[Task]:
    """The grid tasks, each using ``utilisation / 50`` of the processor: its budget is
    that share of its period, and its action spins for the whole budget."""
    tasks = grid_tasks()
    share = utilisation / len(tasks)
    out = []
    for t in tasks:
        budget = round(share * t.period_ms, 3)
        out.append(Task(name=t.name, period_ms=t.period_ms, deadline_ms=t.deadline_ms, budget_ms=budget,
                        priority=t.priority, action=f"spin:{budget}", offset_ms=t.offset_ms))
    return out


def timer_lateness(tasks: list[Task], seconds: float) -> list[float]:
    """How late a selector wakes for each ideal release of ``tasks`` (seconds)."""
    sel = selectors.DefaultSelector()
    a, b = socket.socketpair()  # something to wait on, as the kernel waits on its sockets
    sel.register(a, selectors.EVENT_READ)
    start = time.monotonic()
    heap = [(start + t.offset_ms / 1000.0, t.period_ms / 1000.0) for t in tasks]
    heapq.heapify(heap)
    late = []
    try:
        while True:
            due, period = heap[0]
            if due - start > seconds:
                return late
            now = time.monotonic()
            if due > now:
                sel.select(due - now)
                continue
            late.append(now - due)
            heapq.heapreplace(heap, (due + period, period))
    finally:
        sel.close()
        a.close()
        b.close()


def compute_hiccups(seconds: float) -> list[float]:
    """Thread CPU time (seconds) of each run of one fixed piece of pure Python, run back to
    back for ``seconds``: on a steady CPU every run costs the same; on a VM whose vCPU
    sometimes runs slower (shared caches, the host's own work) some runs cost many times
    the median, which is then true of the kernel's loop and of every job as well."""
    took, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        began = time.thread_time()
        total = 0
        for i in range(2000):
            total += i * i
        took.append(time.thread_time() - began)
    return took


HOP_RATE = 300.0  # messages/s: about one per job of the task set


def hop_child(role: str, address: str) -> None:
    """The hop baseline's processes (see the module doc), each under its policy before
    any socket exists (NNG's threads inherit it), as in the runtime."""
    stop = child_setup()
    priority = realtime.DEFAULT_PRIORITY if role == "send" else realtime.WORKER_PRIORITY
    refused = realtime.apply(0, priority)
    import pynng

    if role == "spin":  # 90 % busy, in bursts of 1-9 ms of CPU
        print("ready", flush=True)
        rng = random.Random()
        while not stop["stop"]:
            burst = rng.uniform(0.001, 0.009)
            end = time.thread_time() + burst
            while time.thread_time() < end:
                pass
            time.sleep(burst / 9)
    elif role == "send":
        with pynng.Push0(dial=address) as sock:
            print("ready", flush=True)
            rng = random.Random()
            while not stop["stop"]:
                time.sleep(rng.expovariate(HOP_RATE))
                sock.send(struct.pack("d", time.monotonic()))
    else:
        late = []
        with pynng.Pull0(listen=address, recv_timeout=100) as sock:
            print("ready", flush=True)
            while not stop["stop"]:
                try:
                    data = sock.recv()
                except pynng.Timeout:
                    continue
                late.append(time.monotonic() - struct.unpack("d", data)[0])
        print(json.dumps({"late": late, "refused": refused}), flush=True)


def hop_latency(seconds: float) -> tuple[list[float], str]:
    """One-way latencies (seconds) of the hop baseline over ``seconds``, and why the
    real-time policy was refused ('' if it was not)."""
    with tempfile.TemporaryDirectory(prefix="lugh-hop-") as tmp:
        address = f"ipc://{tmp}/hop"
        with child(__file__, "recv", address) as receiver:
            read_line(receiver, "hop receiver")
            with child(__file__, "spin", "-") as spinner, child(__file__, "send", address) as sender:
                for proc, what in ((spinner, "spinner"), (sender, "hop sender")):
                    read_line(proc, what)
                time.sleep(seconds)
            receiver.terminate()
            result = json.loads(read_line(receiver, "hop receiver"))
    return result["late"], result["refused"]


def lag_counts(status: dict, name: str) -> dict[int, int]:
    return {int(edge): n for edge, n in status["tasks"][name].items()}


def lag_summary(before: dict, after: dict, name: str) -> dict:
    """Percentiles (ms, nearest rank on 50 µs buckets: each bucket's upper edge) of the
    lags recorded between two status readings."""
    b, a = lag_counts(before, name), lag_counts(after, name)
    counts = sorted((edge if edge >= 0 else 1_000_000, a[edge] - b.get(edge, 0)) for edge in a)
    counts = [(edge, n) for edge, n in counts if n > 0]
    total = sum(n for _, n in counts)
    if not total:
        return {"count": 0, "p50": None, "p99": None, "max": None}

    def at(q):
        rank, seen = min(total - 1, int(q * total)), 0
        for edge, n in counts:
            seen += n
            if seen > rank:
                return round(edge / 1000, 3)

    return {"count": total, "p50": at(0.5), "p99": at(0.99), "max": round(counts[-1][0] / 1000, 3)}


def misses_by_period(before: list[dict], after: list[dict]) -> dict[float, int]:
    """Deadline misses in the window per task period (which tasks miss says why: the
    shortest periods miss on dispatch latency, the longest on a backlog)."""
    was = {r["name"]: r["missed"] for r in before}
    out: dict[float, int] = {}
    for r in after:
        n = r["missed"] - was.get(r["name"], 0)
        if n:
            out[r["period_ms"]] = out.get(r["period_ms"], 0) + n
    return dict(sorted(out.items()))


def ms_summary(seconds: list[float]) -> dict:
    s = sorted(seconds)
    return {"count": len(s), "p50_ms": round(percentile(s, 0.5) * 1000, 3),
            "p99_ms": round(percentile(s, 0.99) * 1000, 3), "max_ms": round(s[-1] * 1000, 3)}


def main() -> int:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, help="measured run on the real clock (default 60; --quick: 20)")
    parser.add_argument("--utilisation", type=float, default=0.9, help="sum of budget/period (default 0.9)")
    parser.add_argument("--timer-s", type=float, help="bare timer baseline (default 10; --quick: 5)")
    parser.add_argument("--slots", type=int, default=2, help="the kernel's dispatch slots (default 2)")
    parser.add_argument("--workers", type=int, help="worker processes (default: slots + 3)")
    args = parser.parse_args()
    if args.child is not None:
        hop_child(*args.child)
        return 0
    workers = args.workers or args.slots + 3
    seconds = args.seconds or (20.0 if args.quick else 60.0)
    timer_s = args.timer_s or (5.0 if args.quick else 10.0)
    if not 0 < args.utilisation < 1 or seconds <= 0 or timer_s <= 0:
        parser.error("--utilisation must be in (0, 1), --seconds and --timer-s positive")
    try:
        Options(workers=workers, slots=args.slots)  # the kernel's own check, before the timer baseline runs
    except ValueError as exc:
        parser.error(str(exc))
    tasks = task_set(args.utilisation)

    progress(f"bare timer: selector wake-ups at the {len(tasks)} tasks' releases for {timer_s:g} s")
    timer = ms_summary(timer_lateness(tasks, timer_s))
    progress(f"bare compute: one fixed piece of Python, back to back, for {timer_s / 2:g} s")
    took = compute_hiccups(timer_s / 2)
    compute = {**ms_summary(took), "over_1ms": sum(t > 0.001 for t in took)}
    progress(f"bare hop: pynng messages to a worker-priority process beside a 90 % spinner, {timer_s:g} s")
    late, refused = hop_latency(timer_s)
    hop = {**ms_summary(late), "rt_refused": refused}

    with temporary_kernel("none", workers=workers, kernel_args=["--slots", str(args.slots)]) as bench:
        report = bench.request(protocol.SwapReq(service="scheduler", plugin="edf"), timeout=120)
        if not report["committed"]:
            raise RuntimeError(f"the swap to edf did not commit: {report['reason']}")
        for task in tasks:
            bench.request(protocol.TaskAddReq(task=task))
        progress(f"{len(tasks)} tasks at utilisation {args.utilisation:g} under edf; warm-up {WARMUP_S:g} s, "
                 f"then {seconds:g} s measured")
        time.sleep(WARMUP_S)
        before, rows_before = bench.status(), bench.request(protocol.TaskListReq())["tasks"]
        began = time.monotonic()
        time.sleep(seconds)
        after, rows_after = bench.status(), bench.request(protocol.TaskListReq())["tasks"]
        elapsed = time.monotonic() - began
        plugin = next(s["plugin"] for s in after["services"] if s["name"] == "scheduler")

    t0, t1 = before["tasks"], after["tasks"]
    window = {k: t1[k] - t0[k] for k in ("released", "completed", "missed", "skipped", "failed")}
    counters = {k: after["counters"].get(k, 0) - before["counters"].get(k, 0)
                for k in ("dispatched", "direct_dispatches", "preemptions", "fallback_decisions", "decisions_overruled")}
    edf = {"scheduler": plugin, **window, "lost": t1["released"] - t1["completed"] - t1["ready"],
           "jobs_per_s": round(window["released"] / elapsed, 1),
           "release_jitter_ms": lag_summary(before, after, "release_lag_us"),
           "start_jitter_ms": lag_summary(before, after, "start_lag_us"), **counters}
    edf["missed_by_period_ms"] = misses_by_period(rows_before, rows_after)
    start_p99 = edf["start_jitter_ms"]["p99"]
    met = (edf["missed"] == 0 and edf["lost"] == 0 and start_p99 is not None and start_p99 <= JITTER_LIMIT_MS)
    result = {"benchmark": "edf", "seconds": round(elapsed, 1), "quick": seconds < 60, "tasks": len(tasks),
              "utilisation": args.utilisation, "slots": args.slots, "workers": workers, "edf": edf, "timer": timer,
              "compute": compute, "hop": hop,
              "goal": goal(f"0 deadline misses, 0 jobs lost, start jitter p99 <= {JITTER_LIMIT_MS:g} ms "
                           f"({seconds:g} s)", value=start_p99, met=met)}
    rj, sj = edf["release_jitter_ms"], edf["start_jitter_ms"]
    text = table(["", "count", "p50 ms", "p99 ms", "max ms"], [
        ["bare timer: selector wake-up - ideal release", timer["count"], timer["p50_ms"], timer["p99_ms"],
         timer["max_ms"]],
        ["bare compute: thread CPU of one fixed piece", compute["count"], compute["p50_ms"], compute["p99_ms"],
         compute["max_ms"]],
        ["bare hop: pynng message, kernel -> worker priority", hop["count"], hop["p50_ms"], hop["p99_ms"],
         hop["max_ms"]],
        ["edf: release - ideal release (release jitter)", rj["count"], rj["p50"], rj["p99"], rj["max"]],
        ["edf: first start - ideal release (start jitter)", sj["count"], sj["p50"], sj["p99"], sj["max"]]])
    text += "\n\n" + table(["scheduler", "released", "completed", "missed", "skipped", "failed", "lost", "jobs/s",
                            "preemptions", "direct starts", "fallback decisions"],
                           [[plugin, *(edf[k] for k in ("released", "completed", "missed", "skipped", "failed",
                                                        "lost", "jobs_per_s", "preemptions", "direct_dispatches",
                                                        "fallback_decisions"))]])
    if edf["missed_by_period_ms"]:
        text += "\n\nmisses by task period: " + ", ".join(
            f"{period:g} ms: {n}" for period, n in edf["missed_by_period_ms"].items())
    text += (f"\n\n{len(tasks)} grid tasks, utilisation {args.utilisation:g}, {args.slots} slot(s), {workers} workers, "
             f"{elapsed:.1f} s measured on the real "
             f"clock{' (shorter than the 60 s of the goal)' if seconds < 60 else ''}; timer baseline {timer_s:g} s; "
             f"compute baseline {timer_s / 2:g} s, {compute['over_1ms']} of its runs over 1 ms of CPU "
             f"({compute['max_ms'] / compute['p50_ms']:.1f} x the median at most: what this CPU does to a fixed "
             f"amount of work); hop baseline {timer_s:g} s at about {HOP_RATE:g} messages/s"
             f"{' (at the normal policy: ' + refused + ')' if refused else ''}.")
    emit(result, args.json, text)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
