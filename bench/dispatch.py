"""Dispatch throughput: jobs dispatched per second with the scheduler out of process.

The kernel runs ``--tasks`` no-op periodic tasks whose releases (``--tasks`` x 1000 /
``--period-ms`` per second) outrun what it can dispatch, so a ready job always waits
and the dispatch slot is never idle for want of work: the figure is the kernel's
dispatch capacity. Every decision is the scheduler service's (a separate process, the
default round-robin plugin); decisions the kernel's fallback policy took instead
(the scheduler late or away) and the kernel's direct dispatches (the only ready job
started on a free slot without asking, which a saturated load leaves rare) are counted
and subtracted, so the figure never credits the kernel's own decisions. Counts come
from the kernel (``lugh status``) at both ends of each window.

Two kernels are compared: ``--dispatch-batch 1`` (the default: the scheduler is asked
for every start) and ``--batch`` (the dispatch queue: decisions in batches, asked for
while a job runs and sent ahead to the worker's deck; docs/architecture.md). They run side by side and are loaded in turn,
``--rounds`` windows each, so that a change of the machine's load weighs on both alike.

Beside it, in the same run: bare pynng Req0/Rep0 round trips per second over
``ipc://`` to a child Python echo server, one at a time (``bench/roundtrip.py``'s
baseline). One scheduler decision costs at least one such round trip unless decisions
are batched or pipelined, so the ratio says how much of the transport's rate the
runtime turns into dispatched jobs.

Goal (the performance issue): >= 5000 jobs/s, no job lost (in each window, every job
released was completed or is still ready). ``jobs_per_s`` is the better kernel's,
named by ``dispatch_batch``; ``runs`` has both.

    python bench/dispatch.py [--seconds 6] [--rounds 3] [--tasks 80] [--period-ms 4] [--batch 64] [--quick] [--json]
"""

from __future__ import annotations

import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (arguments, child, emit, goal, progress, protocol, ratio, read_line, run,  # noqa: E402
                           table, temporary_kernel)
from bench.roundtrip import bare_series  # noqa: E402
from lugh_sdk.api.types import Task  # noqa: E402

GOAL_JOBS_PER_S = 5000


def counts(bench) -> dict:
    st = bench.status()
    c, t = st["counters"], st["tasks"]
    return {"at": time.monotonic(), "dispatched": c.get("dispatched", 0),
            "fallback": c.get("fallback_decisions", 0), "direct": c.get("direct_dispatches", 0),
            "released": t["released"], "completed": t["completed"],
            "skipped": t["skipped"], "ready": t["ready"], "running": t["running"]}


def set_load(bench, args, on: bool) -> None:
    """Add the no-op tasks, or remove them (their queued jobs go with them)."""
    for i in range(args.tasks):
        name = f"n{i:03d}"
        if on:
            bench.request(protocol.TaskAddReq(task=Task(name=name, period_ms=args.period_ms, deadline_ms=args.period_ms,
                                                        budget_ms=args.period_ms / 2, action="noop")))
        else:
            bench.request(protocol.TaskRemoveReq(name=name))


def window(bench, args) -> dict:
    """Load the kernel, let it settle, count over one window, unload it."""
    set_load(bench, args, True)
    time.sleep(args.settle_s)
    start = counts(bench)
    time.sleep(args.seconds / args.rounds)
    end = counts(bench)
    set_load(bench, args, False)
    d = {k: end[k] - start[k] for k in ("at", "dispatched", "fallback", "direct", "released", "completed", "skipped")}
    # Snapshots are taken on the kernel's loop, and no task is removed inside the
    # window: every job released in it was completed or is still ready at its end.
    d["lost"] = d["released"] - d["completed"] - (end["ready"] - start["ready"])
    return d


def summarize(batch: int, windows: list[dict]) -> dict:
    total = {k: sum(w[k] for w in windows) for k in windows[0]}
    seconds = total["at"]
    # A fallback decision dispatches at most one job; a direct dispatch, one.
    by_scheduler = total["dispatched"] - total["fallback"] - total["direct"]
    return {
        "dispatch_batch": batch, "seconds": round(seconds, 2),
        "jobs_per_s": round(by_scheduler / seconds, 1),
        "dispatched_per_s": round(total["dispatched"] / seconds, 1),
        "completed_per_s": round(total["completed"] / seconds, 1),
        "fallback_decisions": total["fallback"], "direct_dispatches": total["direct"], "skipped_releases": total["skipped"],
        # Saturated: in every window the backlog bound skipped releases, so the slot never
        # waited for one and the figure is the kernel's capacity, not the offered rate.
        "saturated": all(w["skipped"] > 0 for w in windows),
        "jobs_lost": total["lost"],
    }


def main() -> int:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="measured time per kernel (default 6)")
    parser.add_argument("--rounds", type=int, default=3, help="windows per kernel, taken in turn (default 3)")
    parser.add_argument("--tasks", type=int, default=80, help="no-op tasks (default 80)")
    parser.add_argument("--period-ms", type=float, default=4.0, help="their period (default 4)")
    parser.add_argument("--settle-s", type=float, default=1.0, help="run time before measuring (default 1)")
    parser.add_argument("--count", type=int, default=5000, help="bare round trips (default 5000)")
    parser.add_argument("--batch", type=int, default=64, choices=range(2, 65), metavar="2..64",
                        help="the batched row's --dispatch-batch (default 64, the most the kernel takes)")
    args = parser.parse_args()
    if args.quick:  # 3 s per kernel, 2000 bare round trips; the same offered rate from fewer tasks (quicker to add)
        args.seconds, args.rounds, args.count, args.settle_s = 3.0, 2, 2000, 0.5
        args.tasks, args.period_ms = args.tasks // 2, args.period_ms / 2
    progress(f"bare pynng Req0/Rep0 over ipc://, {args.count} round trips")
    size = len(protocol.encode(protocol.RunJob(job=_job(), action="noop")))
    with tempfile.TemporaryDirectory(prefix="lugh-bench-") as tmp:
        address = f"ipc://{tmp}/bare-reqrep"
        with child(str(Path(__file__).resolve().parent / "roundtrip.py"), "reqrep", address) as echo:
            read_line(echo, "echo server")
            bare_series("reqrep", address, 300, size)
            t0 = time.perf_counter()
            bare_series("reqrep", address, args.count, size)
            bare_per_s = round(args.count / (time.perf_counter() - t0), 1)
    batches = sorted({1, args.batch})
    windows = {batch: [] for batch in batches}
    with ExitStack() as stack:
        # One kernel per batch size, loaded in turn (the idle one only heartbeats), so
        # that a change of the machine's load during the run weighs on both alike.
        kernels = {batch: stack.enter_context(temporary_kernel("none", kernel_args=["--dispatch-batch", str(batch)]))
                   for batch in batches}
        for i in range(args.rounds):
            for batch in batches:
                progress(f"round {i + 1}/{args.rounds}, dispatch batch {batch}: {args.tasks} no-op tasks every "
                         f"{args.period_ms:g} ms ({args.tasks * 1000 / args.period_ms:.0f} releases/s offered)")
                windows[batch].append(window(kernels[batch], args))
    runs = [summarize(batch, windows[batch]) for batch in batches]
    best = max(runs, key=lambda r: r["jobs_per_s"])
    ok = lambda r: r["jobs_per_s"] >= GOAL_JOBS_PER_S and r["jobs_lost"] == 0 and r["saturated"]
    result = {
        "benchmark": "dispatch", "tasks": args.tasks, "period_ms": args.period_ms,
        "offered_releases_per_s": round(args.tasks * 1000 / args.period_ms),
        **{k: best[k] for k in ("jobs_per_s", "dispatch_batch", "jobs_lost", "saturated")},
        "runs": runs, "bare_reqrep_per_s": bare_per_s, "ratio_to_bare": ratio(best["jobs_per_s"], bare_per_s),
        "goal": goal(f"jobs/s with the scheduler out of process >= {GOAL_JOBS_PER_S}, 0 lost", best["jobs_per_s"],
                     met=ok(best)),
    }
    rows = [[f"jobs dispatched on the scheduler's decisions, batch {r['dispatch_batch']}", r["jobs_per_s"],
             ratio(r["jobs_per_s"], bare_per_s), r["fallback_decisions"], r["direct_dispatches"], r["saturated"],
             r["jobs_lost"]]
            for r in runs]
    rows.append(["bare pynng Req0/Rep0 round trips, ipc://", bare_per_s, 1.0, None, None, None, None])
    text = table(["per second", "rate", "x bare", "fallback", "direct", "saturated", "lost"], rows)
    text += (f"\n\n{args.tasks} no-op tasks, period {args.period_ms:g} ms; per row {args.seconds:g} s in {args.rounds} "
             f"windows, the rows' windows taken in turn (batch: scheduler decisions per answer, kernel "
             f"--dispatch-batch).")
    emit(result, args.json, text)
    return 0


def _job():
    from lugh_sdk.api.types import Job

    return Job(id="n000#100000", task="n000", release=1e6, deadline=1e6, budget_ms=2.0)


if __name__ == "__main__":
    sys.exit(run(main))
