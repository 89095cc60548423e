"""Live swap of the scheduler under the energy-grid workload, beside no swap at all.

Boots a kernel with the grid workload (50 sensor tasks, about 300 jobs/s), lets it run
``--warmup-s``, then:

1. a swap-free window of 10 s: the largest dispatch gap in it (the kernel's
   ``tasks.dispatch_gap_recent_max_ms``, the max over the last 10 s, read at the end of
   the window, which then covers exactly the window) and the deadline misses;
2. ``--swaps`` live swaps of the scheduler, round-robin -> priority -> edf ->
   round-robin -> ..., ``--pause-s`` apart (``SwapReq``); for each: whether it
   committed, its duration, the max dispatch gap during it, jobs and messages lost (the
   kernel's own swap report), and the jobs released and deadlines missed meanwhile;
3. another swap-free window of 10 s after the last swap.

Three measures of dispatching, each during the swaps and in the windows without one
(the kernel's definitions, ``kernel.core``; bench/README.md):

- *dispatch gap* (wait): the time a ready job waits while the dispatch slot is free,
  from "ready and slot free" to dispatch;
- *dispatch stall*: the part of that wait in which no one was deciding: the wait minus
  the scheduler service's deliberation (a PickNext in flight, at most the 20 ms pick
  timeout, after which the fallback decides). It is what a swap can add: a kernel loop
  busy or blocked by a swap step, or no decision source at all;
- *dispatch interval*: the raw time between two consecutive dispatches (includes the
  workload's natural idle time, so it exceeds the others even without a swap).

    python bench/swap.py [--swaps 6] [--json] [--quick]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (arguments, emit, goal, progress, protocol, ratio, run, table,  # noqa: E402
                           temporary_kernel)

RECENT_WINDOW_S = 10.0  # the window of tasks.dispatch_*_recent_max_ms (kernel.core.Kernel.status)
MEASURES = ("gap", "stall", "interval")
CYCLE = ("priority", "edf", "round-robin")


def task_counts(status: dict) -> dict:
    t = status["tasks"]
    return {k: t[k] for k in ("released", "completed", "missed", "skipped", "failed")}


def delta(before: dict, after: dict) -> dict:
    a, b = task_counts(after), task_counts(before)
    return {k: a[k] - b[k] for k in a}


def quiet_window(bench, label: str) -> dict:
    """A swap-free window of RECENT_WINDOW_S: its max dispatch gap, stall and interval,
    and its deadline misses."""
    progress(f"{label}: {RECENT_WINDOW_S:g} s without a swap")
    before = bench.status()
    time.sleep(RECENT_WINDOW_S)
    after = bench.status()
    return {"seconds": RECENT_WINDOW_S,
            **{f"max_dispatch_{m}_ms": after["tasks"][f"dispatch_{m}_recent_max_ms"] for m in MEASURES},
            **delta(before, after)}


def per_thousand(counts: dict) -> float | None:
    return round(1000 * counts["missed"] / counts["completed"], 2) if counts["completed"] else None


def main() -> int:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--swaps", type=int, default=6, help="number of live swaps (default 6)")
    parser.add_argument("--warmup-s", type=float, default=5.0, help="run time before measuring (default 5)")
    parser.add_argument("--pause-s", type=float, default=1.0, help="time between two swaps (default 1)")
    parser.add_argument("--health-window-ms", type=int, default=300, help="each swap's health window (default 300)")
    args = parser.parse_args()
    if args.quick:  # three swaps: one of each kind of handover in the cycle
        args.swaps, args.warmup_s = min(args.swaps, 3), min(args.warmup_s, 3.0)
    swaps = []
    with temporary_kernel("grid") as bench:
        progress(f"grid workload running; warm-up {args.warmup_s:g} s")
        time.sleep(args.warmup_s)
        baseline = quiet_window(bench, "baseline")
        plugin = next(s["plugin"] for s in bench.status()["services"] if s["name"] == "scheduler")
        for i in range(args.swaps):
            target = CYCLE[i % len(CYCLE)]
            progress(f"swap {i + 1}/{args.swaps}: {plugin} -> {target}")
            before = bench.status()
            began = time.monotonic()
            report = bench.request(protocol.SwapReq(service="scheduler", plugin=target,
                                                    health_window_ms=args.health_window_ms), timeout=120)
            wall_ms = round((time.monotonic() - began) * 1000, 1)
            after = bench.status()
            swaps.append({"from": report["previous"] if report["committed"] else plugin, "to": report["plugin"],
                          "committed": report["committed"], "step": report["step"], "reason": report["reason"],
                          "duration_ms": report["duration_ms"], "wall_ms": wall_ms,
                          **{f"max_dispatch_{m}_ms": report[f"max_dispatch_{m}_ms"] for m in MEASURES},
                          "jobs_lost": report["jobs_lost"],
                          "messages_lost": report["messages_lost"],
                          "fallback_decisions": report["fallback_decisions"], **delta(before, after)})
            plugin = report["plugin"]
            time.sleep(args.pause_s)
        after_swaps = quiet_window(bench, "after the swaps")
        final = bench.status()

    worst = {m: max((s[f"max_dispatch_{m}_ms"] for s in swaps), default=None) for m in MEASURES}
    worst_gap = worst["gap"]
    during = {k: sum(s[k] for s in swaps) for k in ("released", "completed", "missed", "skipped", "failed")}
    during.update({f"max_dispatch_{m}_ms": worst[m] for m in MEASURES})
    quiet = {m: max(baseline[f"max_dispatch_{m}_ms"], after_swaps[f"max_dispatch_{m}_ms"]) for m in MEASURES}
    lost = {"jobs": sum(s["jobs_lost"] for s in swaps), "messages": sum(s["messages_lost"] for s in swaps)}
    all_committed = all(s["committed"] for s in swaps)
    result = {
        "benchmark": "swap", "swaps": swaps, "baseline": baseline, "during_swaps": during, "after": after_swaps,
        "worst_swap_gap_ms": worst_gap,
        "ratio_worst_swap_gap_to_baseline": ratio(worst_gap or 0, baseline["max_dispatch_gap_ms"]),
        "worst_swap_stall_ms": worst["stall"], "worst_swap_interval_ms": worst["interval"],
        "no_swap_max_ms": quiet,  # the worse of the two swap-free windows, per measure
        "lost": lost, "all_committed": all_committed,
        "dispatch_gap_max_since_boot_ms": final["tasks"]["dispatch_gap_max_ms"],
        "goal": goal("every swap commits, no job or message lost",
                     met=all_committed and not lost["jobs"] and not lost["messages"]),
    }
    rows = [[f"{s['from']} -> {s['to']}", "yes" if s["committed"] else f"no ({s['step']})", s["duration_ms"],
             s["max_dispatch_gap_ms"], s["max_dispatch_stall_ms"], s["max_dispatch_interval_ms"], s["jobs_lost"],
             s["messages_lost"], s["released"], s["missed"], s["fallback_decisions"]] for s in swaps]
    text = table(["swap", "committed", "duration ms", "max gap ms", "max stall ms", "max interval ms", "jobs lost",
                  "msgs lost", "released", "missed", "fallback"], rows)
    windows = [("no swap, before (10 s)", baseline), (f"during the {len(swaps)} swaps (summed)", during),
               ("no swap, after (10 s)", after_swaps)]
    text += "\n\n" + table(["window", "max gap ms", "max stall ms", "max interval ms", "released", "completed",
                            "missed", "missed/1000", "skipped"],
                           [[label, w["max_dispatch_gap_ms"], w["max_dispatch_stall_ms"],
                             w["max_dispatch_interval_ms"], w["released"], w["completed"], w["missed"],
                             per_thousand(w), w["skipped"]] for label, w in windows])
    text += (f"\n\nworst dispatch gap during a swap / max gap without swap: {worst_gap} / "
             f"{baseline['max_dispatch_gap_ms']} ms = {result['ratio_worst_swap_gap_to_baseline']}"
             f"\nworst dispatch stall during a swap: {worst['stall']} ms (without a swap: {quiet['stall']} ms)"
             f"\n{len(swaps)} swaps, health window {args.health_window_ms} ms, {args.pause_s:g} s apart; "
             f"max dispatch gap since boot {result['dispatch_gap_max_since_boot_ms']} ms.")
    for s in swaps:
        if not s["committed"]:
            text += f"\nrolled back {s['from']} -> {s['to']} at {s['step']}: {s['reason']}"
    emit(result, args.json, text)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
