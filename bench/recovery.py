"""Recovery: crash-to-serving-again time with and without a hot standby, beside the bare
cost of starting a Python process that imports pynng; and hang detection time against
the heartbeat period.

1. ``bare``: ``--bare`` times, start ``python -c "import pynng"`` (this interpreter, the
   services' environment) and time it until it has imported pynng and said so. No
   restart by process creation can be faster than this.
2. ``crash``: a kernel with a few tasks; ``--rounds`` times, SIGKILL the active process
   of the scheduler, the storage and the monitor in turn, and time from just before the
   kill to the kernel's ``serving_at`` for the next incarnation (its first answer after it
   got its state: the scheduler's import of the kernel's truth, the storage's replay),
   on the same clock (CLOCK_MONOTONIC is machine-wide; the benchmark asks for the
   kernel's status only ``FIRST_LOOK_S`` after the kill, so that its questions are not
   work the kernel loop does during the recovery it measures). Once with restarts by a new
   process (the kernel's default: the pre-imported spare host if one is waiting, else a
   plain spawn; the report says how many took the spare), once with the spare turned off
   (``--no-spare``: every restart starts and imports a new interpreter, for
   information), once with a hot standby for
   each of the three (``standby = true``). The
   policy is set so that every restart is immediate (``stable_s = 0``) and no service is
   given up (``intensity``): the benchmark restarts the same services many times.
3. ``hang``: for each heartbeat period in ``--periods``, a kernel whose services beat at
   that period; ``--hangs`` times, SIGSTOP the monitor and time from just before the stop
   to the kernel's hang verdict (``hang_detected_at``), beside the tolerance, three
   periods (two missed heartbeats plus one period of jitter allowance).

Goals (issue 7): a restart by a new process serves again, median, within 1.5 times the
bare start; a hot standby within 10 ms.

    python bench/recovery.py [--rounds 10] [--hangs 5] [--periods 20,50,100,200] [--json] [--quick]
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (arguments, emit, goal, percentile, progress, protocol, ratio, run,  # noqa: E402
                           table, temporary_kernel)
from kernel import supervision  # noqa: E402
from lugh_sdk.api import Task  # noqa: E402

SERVICES = ("scheduler", "storage", "monitor")
TASKS = [Task(name="fast", period_ms=20, deadline_ms=20, budget_ms=1, priority=90, action="noop"),
         Task(name="slow", period_ms=100, deadline_ms=100, budget_ms=2, priority=10, action="spin:1")]
# Immediate restarts always, never given up: the benchmark restarts the same services over and over.
POLICY = {"stable_s": 0.0, "intensity": 100_000}
SPAWN_RATIO_LIMIT = 1.5  # new-process restart median / bare start median
STANDBY_LIMIT_MS = 10.0
FIRST_LOOK_S = 0.05  # after a kill, before the first status request
# The kernel's recovery times (`lugh status`, last_recovery), each phase from one to the next.
PHASES = {"exit seen to restart ordered": ("down_at", "restart_at"),
          "restart ordered to state sent": ("restart_at", "state_at"),
          "state sent to serving": ("state_at", "serving_at")}


# The bare baselines run as the kernel starts its children (kernel/core.py, _child_env).
BARE_ENV = dict(os.environ, MALLOC_ARENA_MAX="2", PYTHONDONTWRITEBYTECODE="1")


def ms(values: list[float]) -> dict:
    s = sorted(values)
    return {"count": len(s), "median_ms": round(percentile(s, 0.5) * 1000, 1),
            "p99_ms": round(percentile(s, 0.99) * 1000, 1), "min_ms": round(s[0] * 1000, 1),
            "max_ms": round(s[-1] * 1000, 1)}


def bare_exits(count: int) -> list[float]:
    """SIGKILL to the exit the kernel can see (its pidfd readable) of a Python process
    that imported pynng and holds six sockets, as a service does (three lanes each way):
    the operating system's teardown, which every recovery waits for before it can act."""
    out = []
    with tempfile.TemporaryDirectory(prefix="lugh-bench-exit-") as tmp:
        code = ("import pynng, sys; s = [pynng.Pull0(listen=f'ipc://{sys.argv[1]}/{i}') for i in range(6)]; "
                "sys.stdout.write('x'); sys.stdout.flush(); sys.stdin.read()")
        for _ in range(count):
            proc = subprocess.Popen([sys.executable, "-c", code, tmp], stdout=subprocess.PIPE, stdin=subprocess.PIPE,
                                    env=BARE_ENV)
            proc.stdout.read(1)
            pidfd = os.pidfd_open(proc.pid)
            try:
                killed = time.monotonic()
                os.kill(proc.pid, signal.SIGKILL)
                select.select([pidfd], [], [], 10.0)
                out.append(time.monotonic() - killed)
            finally:
                os.close(pidfd)
                proc.wait()
    return out


def bare_starts(count: int) -> list[float]:
    out = []
    for _ in range(count):
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-c", "import pynng, sys; sys.stdout.write('x'); sys.stdout.flush()"],
                                stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=BARE_ENV)
        proc.stdout.read(1)
        out.append(time.monotonic() - started)
        proc.wait()
    return out


def svc(status: dict, name: str) -> dict:
    return next(s for s in status["services"] if s["name"] == name)


def wait(bench, predicate, what: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = bench.status()
        if predicate(st):
            return st
        time.sleep(0.01)
    raise RuntimeError(f"timed out waiting for {what}")


def settle(bench, standby: bool) -> None:
    """Every service up (with its standby ready), then a moment for the CPU to calm."""
    def ready(st):
        return all(s["state"] == "up" and (not standby or s["name"] not in SERVICES
                                           or (s["standby"] or {}).get("state") == "ready") for s in st["services"])
    wait(bench, ready, "every service (and standby) ready")
    time.sleep(0.3)


def crash_round_trips(rounds: int, standby: bool, spare: bool = True) -> dict[str, list[float]]:
    services = {name: {**POLICY, "standby": standby} for name in SERVICES}
    prepare = lambda home: supervision.write(home, defaults=POLICY, services=services)
    times: dict[str, list[float]] = {name: [] for name in SERVICES}
    seen: dict[str, list[float]] = {name: [] for name in SERVICES}
    phases: dict[str, list[float]] = {phase: [] for phase in PHASES}
    hows: set = set()
    with temporary_kernel("none", prepare=prepare, kernel_args=[] if spare else ["--no-spare"]) as bench:
        for task in TASKS:
            bench.request(protocol.TaskAddReq(task=task))
        spare_before = bench.status()["counters"].get("spare_taken", 0)
        for i in range(rounds):
            progress(f"crash round {i + 1}/{rounds} ({'hot standby' if standby else 'new process' if spare else 'plain spawn'})")
            for name in SERVICES:
                settle(bench, standby)
                victim = svc(bench.status(), name)
                killed = time.monotonic()
                os.kill(victim["pid"], signal.SIGKILL)
                # The kernel times the recovery itself; a status request is work for its
                # loop, so the first look comes after a hot standby's recovery should be over.
                time.sleep(FIRST_LOOK_S)
                st = wait(bench, lambda st: ((svc(st, name)["last_recovery"] or {}).get("peer") == victim["peer"]
                                             and svc(st, name)["last_recovery"]["serving_at"]), f"{name} serving")
                rec = svc(st, name)["last_recovery"]
                times[name].append(rec["serving_at"] - killed)
                seen[name].append(rec["down_at"] - killed)
                for phase, (a, b) in PHASES.items():
                    phases[phase].append(rec[b] - rec[a])
                hows.add(rec["how"])
        spare_taken = bench.status()["counters"].get("spare_taken", 0) - spare_before
    expected = {"standby" if standby else "spawn"}
    if hows != expected:
        raise RuntimeError(f"restarts were made by {hows}, expected {expected}")
    return {"serving": times, "exit_seen": seen, "phases": phases, "spare_taken": spare_taken}


def hang_detections(period_ms: float, count: int) -> list[float]:
    prepare = lambda home: supervision.write(home, defaults={**POLICY, "heartbeat_ms": period_ms})
    out = []
    with temporary_kernel("none", prepare=prepare) as bench:
        for i in range(count):
            settle(bench, False)
            victim = svc(bench.status(), "monitor")
            stopped = time.monotonic()
            os.kill(victim["pid"], signal.SIGSTOP)
            st = wait(bench, lambda st: (svc(st, "monitor")["last_recovery"] or {}).get("peer") == victim["peer"],
                      "the hang to be seen")
            out.append(svc(st, "monitor")["last_recovery"]["hang_detected_at"] - stopped)
    return out


def main() -> int:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="kills of each service per configuration (default 10)")
    parser.add_argument("--bare", type=int, default=20, help="bare interpreter starts (default 20)")
    parser.add_argument("--hangs", type=int, default=5, help="hangs per heartbeat period (default 5)")
    parser.add_argument("--periods", default="20,50,100,200", help="heartbeat periods, ms (default 20,50,100,200)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.bare, args.hangs, args.periods = min(args.rounds, 4), min(args.bare, 10), 2, "50,100"

    progress(f"{args.bare} bare starts of python + import pynng")
    bare = ms(bare_starts(args.bare))
    progress(f"{args.bare} kills of a bare python + pynng process with six sockets")
    bare_exit = ms(bare_exits(args.bare))
    spawn = crash_round_trips(args.rounds, standby=False)
    plain = crash_round_trips(args.rounds, standby=False, spare=False)
    hot = crash_round_trips(args.rounds, standby=True)
    hangs = {}
    for period in [float(p) for p in args.periods.split(",")]:
        progress(f"hang detection at a {period:g} ms heartbeat")
        hangs[period] = ms(hang_detections(period, args.hangs))

    all_spawn = ms([t for v in spawn["serving"].values() for t in v])
    all_hot = ms([t for v in hot["serving"].values() for t in v])
    all_plain = ms([t for v in plain["serving"].values() for t in v])
    # What the runtime itself takes once the exit is seen (the rest is the OS's teardown).
    hot_after_exit = ms([t - s for name in SERVICES for t, s in zip(hot["serving"][name], hot["exit_seen"][name])])
    rows = [["bare: python + import pynng", bare["median_ms"], bare["p99_ms"], "-", 1.0]]
    for label, data, total in (("restart, new process", spawn, all_spawn), ("restart, plain spawn (--no-spare)", plain, all_plain),
                               ("restart, hot standby", hot, all_hot)):
        for name in SERVICES:
            m = ms(data["serving"][name])
            rows.append([f"{label}: {name}", m["median_ms"], m["p99_ms"], ms(data["exit_seen"][name])["median_ms"],
                         ratio(m["median_ms"], bare["median_ms"])])
        rows.append([f"{label}: all", total["median_ms"], total["p99_ms"],
                     ms([t for v in data["exit_seen"].values() for t in v])["median_ms"],
                     ratio(total["median_ms"], bare["median_ms"])])
    rows.append(["bare: kill to exit seen, python + pynng, 6 sockets", bare_exit["median_ms"], bare_exit["p99_ms"],
                 bare_exit["median_ms"], "-"])
    rows.append(["restart, hot standby: exit seen to serving", hot_after_exit["median_ms"], hot_after_exit["p99_ms"],
                 "-", "-"])
    hot_phases = {phase: ms(v) for phase, v in hot["phases"].items()}
    rows += [[f"  of which {phase}", m["median_ms"], m["p99_ms"], "-", "-"] for phase, m in hot_phases.items()]
    text = "crash (SIGKILL) to serving again\n" + table(
        ["", "median ms", "p99 ms", "exit seen ms", "median / bare"], rows)
    hang_rows = [[f"{p:g} ms", round(3 * p, 1), h["median_ms"], h["p99_ms"], h["min_ms"], h["max_ms"],
                  ratio(h["median_ms"], 3 * p)] for p, h in hangs.items()]
    text += "\n\nhang (SIGSTOP) to the kernel's verdict\n" + table(
        ["heartbeat", "tolerance ms", "median ms", "p99 ms", "min ms", "max ms", "median / tolerance"], hang_rows)
    text += (f"\n\nprocesses started from the pre-imported spare host (kernel/processes.py, Spare): "
             f"{spawn['spare_taken']} of {len(SERVICES) * args.rounds} restarts by a new process"
             f" (the others: a plain spawn, no spare was waiting)")
    text += (f"\n\n{args.rounds} kills of each service per configuration; {args.hangs} hangs per period; "
             f"standby takeover median is {ratio(all_hot['median_ms'], all_spawn['median_ms'])} of a new process's.")
    result = {
        "benchmark": "recovery",
        "bare_python_pynng": bare,
        "crash_to_serving": {"new_process": {n: ms(v) for n, v in spawn["serving"].items()} | {"all": all_spawn},
                             "plain_spawn": {n: ms(v) for n, v in plain["serving"].items()} | {"all": all_plain},
                             "hot_standby": {n: ms(v) for n, v in hot["serving"].items()} | {"all": all_hot}},
        "exit_seen": {"new_process": ms([t for v in spawn["exit_seen"].values() for t in v]),
                      "hot_standby": ms([t for v in hot["exit_seen"].values() for t in v])},
        "bare_exit_seen": bare_exit,
        "hot_standby_exit_to_serving": hot_after_exit,
        "hot_standby_phases": hot_phases,
        "hang_detection": {f"{p:g}": {"tolerance_ms": 3 * p, **h} for p, h in hangs.items()},
        "ratio_new_process_to_bare": ratio(all_spawn["median_ms"], bare["median_ms"]),
        "ratio_plain_spawn_to_bare": ratio(all_plain["median_ms"], bare["median_ms"]),
        "hot_standby_median_ms": all_hot["median_ms"],
        "new_process_spare_taken": spawn["spare_taken"],
        "goal": goal(f"crash to serving, median: new process / bare start <= {SPAWN_RATIO_LIMIT:g}, "
                     f"hot standby <= {STANDBY_LIMIT_MS:g} ms",
                     value=ratio(all_spawn["median_ms"], bare["median_ms"]),
                     met=(ratio(all_spawn["median_ms"], bare["median_ms"]) or 0) <= SPAWN_RATIO_LIMIT
                     and all_hot["median_ms"] <= STANDBY_LIMIT_MS),
    }
    emit(result, args.json, text)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
