"""The benchmark suite: ``python -m bench`` runs every benchmark in bench/ and prints one
table, a row per figure of issue 7 (and the zero-counts that go with them): the
project's figure, its baseline measured in the same run, the ratio, the goal, met.

Each benchmark runs as its own subprocess, ``python bench/<name>.py --json --quick``
(``--full``: without ``--quick``), and the suite reads the one JSON object it prints.
A benchmark that fails, times out or lacks a figure gives a row saying so and the suite
goes on: no figure is ever made up here. The suite itself judges only what the rows
say; what each figure means is in docs/performance.md.

    python -m bench [--only storage,edf] [--json [PATH]] [--full] [--with-targets]

Time: under 10 minutes on 2 cores with ``--quick`` (a budget of ``--budget-s``, 570 s by
default: a benchmark gets at most what is left of it, one not started for lack of time
says so). ``targets`` (QEMU boots, minutes each) runs only with ``--with-targets``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

# Run order: cheap and independent first, so a budget cut drops the long tail. A script
# in bench/ that is not named here runs after these, with a row from its own goal.
KNOWN = ("roundtrip", "lanes", "dispatch", "startup", "storage", "swap", "install", "edf", "recovery")
OPTIONAL = ("targets",)
BENCHMARKS = KNOWN + tuple(sorted(p.stem for p in BENCH.glob("*.py")
                                  if not p.stem.startswith("_") and p.stem not in KNOWN + OPTIONAL))
# Seconds each may take with --quick before it is stopped (a script on its own budget).
TIMEOUT_S = {"roundtrip": 90, "lanes": 90, "dispatch": 90, "startup": 60, "storage": 120, "swap": 150,
             "install": 150, "edf": 150, "recovery": 240, "targets": 1800}


class Missing(Exception):
    """A figure the benchmark's JSON does not have."""


def get(data: dict, path: str):
    """``data["a"]["b"]`` for ``"a.b"``; Missing names the absent key."""
    value = data
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise Missing(f"no '{path}' in its JSON")
        value = value[part]
    return value


@dataclass
class Row:
    """One line of the table. ``figure``/``baseline`` are paths into the benchmark's JSON
    (or functions of it); ``goal`` is ``("<=", limit)`` or ``(">=", limit)`` on ``on``:
    ``"ratio"`` or ``"figure"``; a row without a goal is shown for information."""
    name: str
    bench: str
    figure: object
    unit: str
    baseline: object = None
    baseline_name: str = ""
    goal: tuple | None = None
    on: str = "ratio"
    note: object = None
    baseline_unit: str = ""  # when it differs from the figure's

    def value(self, spec, data):
        if spec is None:
            return None
        return spec(data) if callable(spec) else get(data, spec)


def own_goal(bench: str) -> Row:
    """The row of a script no row above knows: its own goal line, as it judged it."""
    figure = lambda d: get(d, "goal.value") if get(d, "goal.value") is not None else get(d, "goal.result")
    return Row(f"{bench}: its own goal", bench, figure, "", goal=("own", None), on="figure",
               note=lambda d: get(d, "goal.what"))


def _fresh_worst(d: dict) -> float:
    walls = [r["wall_s"] for r in get(d, "end_to_end.fresh")]
    if not walls:
        raise Missing("no fresh install run in its JSON")
    return max(walls)


def _edf_note(d: dict) -> str:
    e = get(d, "edf")
    return (f"{e['missed']} of {e['completed']} completed jobs ({e['released']} released, {e['skipped']} releases "
            f"skipped) in {d['seconds']:g} s" + (" (shorter than the 60 s of the goal: --full)" if d["quick"] else ""))


ROWS = [
    Row("kernel<->service round trip (median)", "roundtrip", "kernel_service.median_us", "µs",
        "bare_pynng.median_us", "bare pynng req/rep", ("<=", 1.25)),
    Row("HIGH p99 under a LOW flood", "lanes", "high_under_low_flood.p99_us", "µs",
        "high_idle.p99_us", "HIGH p99 idle", ("<=", 2)),
    Row("jobs dispatched/s, scheduler out of process", "dispatch", "jobs_per_s", "jobs/s",
        lambda d: d.get("bare_reqrep_per_s"), "bare pynng req/rep round trips/s, one at a time", (">=", 5000),
        on="figure", baseline_unit="trips/s"),
    Row("dispatch: jobs lost", "dispatch", "jobs_lost", "jobs", goal=("<=", 0), on="figure"),
    Row("lugh --help cold start", "startup", "help_s", "s", "python_pass_s", "python -c pass", ("<=", 20)),
    Row("durable commits/s, 16 writers (group commit)", "storage", "durable_commits.16.service.commits_per_s",
        "commits/s", "sqlite_baseline_commits_per_s", "bare sqlite3 WAL+FULL, 1 connection", (">=", 2)),
    Row("live swap: longest dispatch gap", "swap", "worst_swap_gap_ms", "ms",
        "baseline.max_dispatch_gap_ms", "max gap, 10 s without swap", ("<=", 2), on="figure"),
    Row("live swap: longest dispatch stall (gap less deliberation)", "swap", "worst_swap_stall_ms", "ms",
        "no_swap_max_ms.stall", "max stall, 10 s windows without swap"),
    Row("live swap: jobs lost", "swap", "lost.jobs", "jobs", goal=("<=", 0), on="figure"),
    Row("live swap: messages lost", "swap", "lost.messages", "msgs", goal=("<=", 0), on="figure"),
    Row("live swap: swaps not committed", "swap", lambda d: sum(not s["committed"] for s in get(d, "swaps")),
        "swaps", goal=("<=", 0), on="figure"),
    Row("lugh install edf-scheduler --swap (worst fresh run)", "install", _fresh_worst, "s",
        "installed_wall_median_s", "median, already installed", ("<=", 1.5), on="figure"),
    Row("install: jobs lost", "install", "end_to_end.jobs_lost_total", "jobs", goal=("<=", 0), on="figure"),
    Row("EDF, 50 grid tasks at U=0.9: deadline misses", "edf", "edf.missed", "jobs", goal=("<=", 0),
        on="figure", note=_edf_note),
    Row("EDF: dispatch jitter p99, first start - ideal release", "edf", "edf.start_jitter_ms.p99", "ms",
        "timer.p99_ms", "bare selector wake-up lateness p99", ("<=", 1), on="figure"),
    Row("EDF: dispatch jitter p99, release - ideal release", "edf", "edf.release_jitter_ms.p99", "ms",
        "timer.p99_ms", "bare selector wake-up lateness p99", ("<=", 1), on="figure"),
    Row("EDF: jobs lost", "edf", "edf.lost", "jobs", goal=("<=", 0), on="figure"),
    Row("crash to serving p50, new process", "recovery", "crash_to_serving.new_process.all.median_ms", "ms",
        "bare_python_pynng.median_ms", "bare spawn + import pynng", ("<=", 1.5)),
    Row("crash to serving p50, plain spawn (--no-spare)", "recovery", "crash_to_serving.plain_spawn.all.median_ms",
        "ms", "bare_python_pynng.median_ms", "bare spawn + import pynng"),
    Row("crash to serving p50, hot standby", "recovery", "crash_to_serving.hot_standby.all.median_ms", "ms",
        "bare_python_pynng.median_ms", "bare spawn + import pynng", ("<=", 10), on="figure"),
    Row("hot standby: crash to exit seen p50 (OS teardown)", "recovery", "exit_seen.hot_standby.median_ms", "ms",
        "bare_exit_seen.median_ms", "kill to exit seen, bare python + pynng"),
    Row("hot standby: exit seen to serving p50", "recovery", "hot_standby_exit_to_serving.median_ms", "ms"),
    Row("targets: install --swap over mutual TLS", "targets", "install_swap.tls_median_s", "s",
        "install_swap.local_median_s", "local (ipc)"),
]


# --------------------------------------------------------------------------- running

@dataclass
class Outcome:
    bench: str
    status: str  # ok, failed, timed out, not available, not run
    seconds: float = 0.0
    data: dict = field(default_factory=dict)
    error: str = ""
    steal: float | None = None  # % of the CPUs' time the hypervisor ran something else meanwhile


def cpu_ticks() -> tuple[int, int] | None:
    """(steal, total) clock ticks of all CPUs since boot (/proc/stat), None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def steal_pct(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """On a virtual machine, time stolen by the host shows as latency and lost throughput
    that no code change here can remove: the suite reports it beside each benchmark."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return round(100.0 * (after[0] - before[0]) / (after[1] - before[1]), 1)


def run_one(name: str, quick: bool, timeout: float, scratch: Path) -> Outcome:
    ticks = cpu_ticks()
    outcome = _run_one(name, quick, timeout, scratch)
    outcome.steal = steal_pct(ticks, cpu_ticks())
    return outcome


def _run_one(name: str, quick: bool, timeout: float, scratch: Path) -> Outcome:
    script = BENCH / f"{name}.py"
    if not script.exists():
        return Outcome(name, "not available", error=f"bench/{name}.py does not exist")
    cmd = [sys.executable, str(script), "--json"] + (["--quick"] if quick else [])
    # Each benchmark makes its temporary homes under its own TMPDIR, so that whatever
    # a killed one leaves running (its kernel is in a session of its own) is found and
    # taken down here.
    tmp = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=scratch))
    env = dict(os.environ, TMPDIR=str(tmp), PYTHONUNBUFFERED="1")
    print(f"## {name}: {' '.join(cmd[1:])} (at most {timeout:.0f} s)", file=sys.stderr, flush=True)
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        status = "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        out, err = _stop(proc)
        status = "timed out"
    except BaseException:  # Ctrl-C or SIGTERM: the benchmark is in a session of its own
        _stop(proc)
        raise
    finally:
        _take_down(tmp)
    elapsed = round(time.monotonic() - started, 1)
    sys.stderr.write(_indent(err))
    if status == "timed out":
        return Outcome(name, status, elapsed, error=f"stopped after {timeout:.0f} s")
    if status == "failed":
        return Outcome(name, status, elapsed, error=f"exit status {proc.returncode}: {_last_line(err)}")
    try:
        data = json.loads(out)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        return Outcome(name, "failed", elapsed, error=f"its output is not one JSON object ({exc})")
    return Outcome(name, "ok", elapsed, data=data)


def _stop(proc: subprocess.Popen) -> tuple[str, str]:
    """SIGTERM first: a benchmark unwinds and takes its kernel down; SIGKILL if not."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        return proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.communicate()
    except ProcessLookupError:
        return proc.communicate()


def _take_down(tmp: Path) -> None:
    """Stop any kernel left under a benchmark's temporary homes, then remove them."""
    from lugh_sdk import runtime

    for home in tmp.glob("lugh-bench-*"):
        if (home / "run").exists():
            try:
                runtime.down(home)
            except Exception as exc:  # noqa: BLE001 (reported, the suite goes on)
                print(f"could not take down a kernel under {home}: {exc}", file=sys.stderr)
    shutil.rmtree(tmp, ignore_errors=True)


def _indent(text: str) -> str:
    return "".join(f"   {line}\n" for line in text.splitlines())


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no error output"


# --------------------------------------------------------------------------- the table

def evaluate(row: Row, outcome: Outcome | None) -> dict:
    out = {"row": row.name, "benchmark": row.bench, "unit": row.unit, "baseline_unit": row.baseline_unit or row.unit,
           "figure": None, "baseline": None, "baseline_is": row.baseline_name or None, "ratio": None,
           "goal": None, "met": None, "note": ""}
    if row.goal is not None and row.goal[0] == "own":
        out["goal"] = "its own"
    elif row.goal is not None:
        out["goal"] = (f"ratio {row.goal[0]} {row.goal[1]:g}" if row.on == "ratio"
                       else f"{row.goal[0]} {row.goal[1]:g} {row.unit}")
    if outcome is None or outcome.status != "ok":
        out["note"] = "not run" if outcome is None else f"{outcome.status}: {outcome.error}"
        return out
    data = outcome.data
    try:
        figure = row.value(row.figure, data)
        if figure is None:
            raise Missing("its figure is null")
        out["figure"] = figure
        out["note"] = row.note(data) if row.note is not None else ""
    except (Missing, KeyError, TypeError) as exc:
        out["note"] = f"figure not available: {exc}"
        return out
    try:
        out["baseline"] = row.value(row.baseline, data)
    except (Missing, KeyError, TypeError) as exc:
        out["note"] = "; ".join(filter(None, [out["note"], f"baseline not available: {exc}"]))
    if out["baseline"]:
        out["ratio"] = round(figure / out["baseline"], 2)
    if row.goal is not None and row.goal[0] == "own":
        out["met"] = data["goal"].get("result") == "met"
    elif row.goal is not None:
        value = out["ratio"] if row.on == "ratio" else figure
        op, limit = row.goal
        out["met"] = None if value is None else (value <= limit if op == "<=" else value >= limit)
    return out


def machine() -> dict:
    return {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(terse=True),
            "at": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "load_1min_start": round(os.getloadavg()[0], 2)}


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def render(results: list[dict]) -> str:
    headers = ["row", "figure", "baseline", "ratio", "goal", "met"]
    cells = [[r["row"], f"{fmt(r['figure'])} {r['unit']}" if r["figure"] is not None else "-",
              "-" if r["baseline"] is None else f"{fmt(r['baseline'])} {r['baseline_unit']}", fmt(r["ratio"]),
              r["goal"] or "-", "-" if r["met"] is None else ("yes" if r["met"] else "NO")] for r in results]
    widths = [max(len(str(c[i])) for c in [headers, *cells]) for i in range(len(headers))]
    line = lambda c: "| " + " | ".join(str(v).ljust(w) for v, w in zip(c, widths)) + " |"
    lines = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)]
    notes = [f"- {r['row']}: {r['note']}" for r in results if r["note"]]
    baselines = sorted({f"- {r['row']}: baseline is {r['baseline_is']}" for r in results
                        if r["baseline_is"] and r["baseline"] is not None})
    return "\n".join(lines + ([""] + notes if notes else []) + ([""] + baselines if baselines else []))


def _interrupt(signum, frame):
    """SIGTERM unwinds like Ctrl-C, so the running benchmark is stopped on the way out."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated benchmarks to run (default: all)")
    parser.add_argument("--json", nargs="?", const="-", metavar="PATH",
                        help="write the results as JSON to PATH (or stdout; the table then goes to stderr)")
    parser.add_argument("--full", action="store_true", help="run each benchmark at full length (no --quick; "
                                                            "takes longer than 10 minutes)")
    parser.add_argument("--with-targets", action="store_true", help="also run bench/targets.py (QEMU boots)")
    parser.add_argument("--budget-s", type=float, default=570.0, help="time for the whole suite (default 570)")
    args = parser.parse_args(argv)
    names = list(BENCHMARKS) + (list(OPTIONAL) if args.with_targets else [])
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in BENCHMARKS + OPTIONAL]
        if unknown:
            parser.error(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHMARKS + OPTIONAL)}")
        names = [n for n in BENCHMARKS + OPTIONAL if n in wanted]
    sys.path.insert(0, str(ROOT))
    signal.signal(signal.SIGTERM, _interrupt)
    info = machine()
    deadline = time.monotonic() + args.budget_s
    outcomes: dict[str, Outcome] = {}
    scratch = Path(tempfile.mkdtemp(prefix="lugh-suite-"))
    try:
        for name in names:
            left = deadline - time.monotonic()
            if left < 10:
                outcomes[name] = Outcome(name, "not run", error=f"the suite's {args.budget_s:g} s budget was used")
                continue
            limit = TIMEOUT_S.get(name, 120) * (1 if not args.full else 4)
            outcomes[name] = run_one(name, not args.full, min(limit, left), scratch)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    info["load_1min_end"] = round(os.getloadavg()[0], 2)
    info["quick"] = not args.full
    info["seconds"] = round(args.budget_s - (deadline - time.monotonic()), 1)
    known = {r.bench for r in ROWS}
    rows = [evaluate(r, outcomes.get(r.bench)) for r in ROWS + [own_goal(n) for n in names if n not in known]
            if r.bench in names]
    report = {"machine": info, "rows": rows,
              "benchmarks": {n: {"status": o.status, "seconds": o.seconds, "error": o.error, "steal_pct": o.steal,
                                 "result": o.data}
                             for n, o in outcomes.items()}}
    header = (f"LughOS benchmark suite, {info['at']}: Python {info['python']}, {info['cpus']} CPUs, "
              f"{info['platform']}, load {info['load_1min_start']} -> {info['load_1min_end']}, "
              f"{'quick' if info['quick'] else 'full'} run, {info['seconds']:g} s")
    times = ", ".join(f"{o.bench} {o.seconds:g} s ({o.status}{'' if o.steal is None else f', {o.steal:g} % stolen'})"
                      for o in outcomes.values())
    text = f"{header}\n\n{render(rows)}\n\nbenchmarks: {times}"
    if args.json == "-":
        print(text, file=sys.stderr)
        print(json.dumps(report, indent=2))
    else:
        print(text)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
