"""What every benchmark shares: a temporary kernel, helper child processes, timed ping
series, percentiles and the side-by-side output.

The benchmarks are scripts, run on demand (``python bench/<name>.py [--json]``); they
are not tests and judge nothing but whether a stated goal is met. Each one boots its own
kernel under a temporary ``LUGH_HOME`` and always takes it down again, with every helper
process it started, whatever happens (an exception, Ctrl-C or SIGTERM).

Percentiles use the same nearest-rank rule as the kernel's own ping report
(:func:`kernel.control.ControlServer._ping`: element ``int(q * n)`` of the sorted
samples), so the figures measured here and those the kernel measures compare exactly.
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
from contextlib import contextmanager
from pathlib import Path

import pynng

from kernel import KERNEL_VERSION, protocol, realtime
from kernel.protocol import Lane
from lugh_sdk import runtime
from lugh_sdk.client import KernelClient, attach, detach

PARENT_ENV = "LUGH_BENCH_PARENT"


# --------------------------------------------------------------------------- statistics

def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest rank, as the kernel computes it (``q`` in 0..1)."""
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def summary_us(seconds: list[float]) -> dict:
    """Median, p99, mean and max of a series of durations given in seconds, in µs."""
    s = sorted(seconds)
    us = lambda v: round(v * 1e6, 1)
    return {"count": len(s), "median_us": us(percentile(s, 0.5)), "p99_us": us(percentile(s, 0.99)),
            "mean_us": us(sum(s) / len(s)), "max_us": us(s[-1])}


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b else None


def goal(what: str, value=None, limit: float | None = None, met: bool | None = None) -> dict:
    """A stated goal and whether it is met (``value <= limit`` unless ``met`` is given):
    the only judgement a benchmark makes. :func:`emit` prints it last."""
    if met is None:
        met = value is not None and value <= limit
    return {"what": what, "value": value, "limit": limit, "result": "met" if met else "NOT met"}


# --------------------------------------------------------------------------- a temporary kernel

class Bench:
    """A running kernel under a temporary home, and a control client to it."""

    def __init__(self, home: Path, client: KernelClient):
        self.home = home
        self.client = client

    def request(self, req, timeout: float | None = None) -> dict:
        return self.client.request(req, timeout=timeout)

    def status(self) -> dict:
        return self.request(protocol.StatusReq())

    @contextmanager
    def attached(self, name: str):
        """A lane link onto the kernel as an external client, detached on the way out."""
        link = attach(self.client, name)
        try:
            yield link
        finally:
            detach(self.client, link)


def _raise_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so the ``finally`` clauses take the kernel down."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, handler)


# Every kernel a benchmark boots runs in the real-time configuration (kernel/realtime.py):
# the one the figures of issue 7 are for. Without the privilege it falls back, and says so.
RT_ARGS = ["--rt-priority", str(realtime.DEFAULT_PRIORITY)]


@contextmanager
def temporary_kernel(workload: str = "none", prepare=None, kernel_args=(), **up_options):
    """Boot a kernel (real-time: ``RT_ARGS``) under a new temporary LUGH_HOME; take it
    down and remove the home (and a runtime directory placed outside it) on the way out.
    ``prepare(home)`` runs before the boot (e.g. to write supervision.toml)."""
    _raise_on_sigterm()
    home = Path(tempfile.mkdtemp(prefix="lugh-bench-"))
    os.environ["LUGH_HOME"] = str(home)
    client = None
    try:
        progress(f"booting a kernel (workload {workload}) under {home}")
        if prepare is not None:
            prepare(home)
        status = runtime.up(home, workload=workload, kernel_args=[*RT_ARGS, *kernel_args], **up_options)
        if status["kernel"]["cpu"]["policy"] != "fifo":
            progress("warning: the kernel runs at the normal CPU policy (SCHED_FIFO refused: its log says why)")
        _own_kernels.add(status["kernel"]["pid"])
        _others_seen.append(other_kernels())
        client = KernelClient(home)
        yield Bench(home, client)
    finally:
        if client is not None:
            client.close()
        run_dir = home / "run"
        outside = run_dir.resolve() if run_dir.is_symlink() else None
        runtime.down(home)
        shutil.rmtree(home, ignore_errors=True)
        if outside is not None:
            shutil.rmtree(outside, ignore_errors=True)


# --------------------------------------------------------------------------- helper processes

@contextmanager
def child(script: str, *args: str):
    """Run ``script --child ARGS`` in a fresh interpreter (stdout piped, text); it is
    stopped (SIGTERM, then SIGKILL) and waited for on the way out."""
    env = dict(os.environ, **{PARENT_ENV: str(os.getpid())})
    proc = subprocess.Popen([sys.executable, script, "--child", *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, text=True, env=env, close_fds=True)
    try:
        yield proc
    finally:
        stop_child(proc)


def stop_child(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def read_line(proc: subprocess.Popen, what: str) -> str:
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"the {what} process exited early (status {proc.wait()})")
    return line.strip()


def child_setup() -> dict:
    """First thing in a helper process: die with the benchmark (no orphan, even if it is
    killed), and turn SIGTERM into a flag the child's loop polls. Returns that flag."""
    from kernel.processes import die_with_parent

    die_with_parent(int(os.environ[PARENT_ENV]))
    flag = {"stop": False}
    signal.signal(signal.SIGTERM, lambda *_: flag.__setitem__("stop", True))
    return flag


# --------------------------------------------------------------------------- measuring

def ping_series(link, count: int, lane: Lane = Lane.HIGH, interval: float = 0.0) -> list[float]:
    """Round trips client -> kernel -> client (Ping answered by a Pong), one at a time,
    each timed in this process. ``interval`` seconds pass between one answer and the
    next ping (0: back to back)."""
    rtts = []
    for i in range(count):
        if interval:
            time.sleep(interval)
        sent = time.perf_counter()
        if not link.send(protocol.Ping(req=i), lane):
            raise RuntimeError("the kernel's lane refused a ping")
        while True:
            item = link.recv(5.0)
            if item is None:
                raise RuntimeError(f"no pong for ping {i} within 5 s")
            msg = item[1]
            if isinstance(msg, protocol.Pong) and msg.req == i:
                break
        rtts.append(time.perf_counter() - sent)
    return rtts


# --------------------------------------------------------------------------- output

def run(main) -> int:
    """A benchmark's entry point: Ctrl-C or SIGTERM ends it quietly (the kernel was
    taken down on the way out)."""
    try:
        return main()
    except KeyboardInterrupt:
        print("interrupted; the benchmark's kernel and helper processes were stopped", file=sys.stderr)
        return 130


def arguments(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    # The suite (python -m bench) passes --quick: the same measurement with fewer samples.
    parser.add_argument("--quick", action="store_true", help="a shorter run: fewer samples, same measurement")
    parser.add_argument("--child", nargs="*", help=argparse.SUPPRESS)  # helper-process mode
    return parser


def progress(text: str) -> None:
    """Progress goes to stderr, so ``--json`` output on stdout stays clean."""
    print(f"# {text}", file=sys.stderr, flush=True)


def machine() -> dict:
    return {"python": platform.python_version(), "cpus": os.cpu_count(), "pynng": _version("pynng"),
            "kernel": KERNEL_VERSION, "platform": platform.platform(terse=True),
            "at": time.strftime("%Y-%m-%d %H:%M:%S"), "load_1min": round(os.getloadavg()[0], 2),
            "other_kernels": max([other_kernels(), *_others_seen])}


def other_kernels() -> int:
    """LughOS kernels running on this machine besides this benchmark's (a test run, a
    second benchmark): on a small machine they skew the figures, so the report says so."""
    mine = {str(p) for p in _own_kernels}
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit() and entry not in mine:
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    count += b"\0-m\0kernel\0" in f.read()
            except OSError:
                pass
    return count


_own_kernels: set[int] = set()
_others_seen: list[int] = []


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in headers]] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])


def emit(result: dict, as_json: bool, text: str) -> None:
    """Print the figures: one JSON object, or the text report between a machine line and
    the goal line (``result["goal"]``, from :func:`goal`)."""
    result = {"machine": machine(), **result}
    if as_json:
        print(json.dumps(result, indent=2))
        return
    m = result["machine"]
    print(f"{result['benchmark']}: {m['at']}, Python {m['python']}, {m['cpus']} CPUs, pynng {m['pynng']}, "
          f"kernel {m['kernel']}, load {m['load_1min']}")
    print(text)
    g = result["goal"]
    print(f"goal {g['what']}: " + ("" if g["value"] is None else f"{g['value']} -> ") + g["result"])
    if m["other_kernels"]:
        print(f"warning: {m['other_kernels']} other LughOS kernel(s) ran on this machine during the run "
              f"(seen at its start or end); they disturb the figures")


__all__ = ["Bench", "Lane", "arguments", "child", "child_setup", "emit", "goal", "percentile",
           "ping_series", "progress", "protocol", "pynng", "ratio", "read_line", "run", "stop_child",
           "summary_us", "table", "temporary_kernel", "KernelClient", "attach", "detach"]
