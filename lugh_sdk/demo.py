"""`lugh demo`: the energy-grid workload on a real kernel, with a live scheduler swap.

Boots a kernel (in a temporary home unless one is given) with the 50-task grid
workload under round-robin, shows tasks, dispatch rate, deadline misses and service
health; a third of the way through swaps live to the priority scheduler, two thirds of
the way through runs ``lugh install edf-scheduler --swap`` (the target verifies the
first-party EDF release against this machine's registry, then swaps to it live);
prints what each swap cost (the longest dispatch gap, jobs and messages lost) and
shuts everything down. About a minute with the default 40 s of workload.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from rich.console import Group
from rich.live import Live
from rich.table import Table

from kernel import protocol
from lugh_sdk import runtime, views
from lugh_sdk.client import KernelClient

console = views.console


def _sample(client: KernelClient) -> dict:
    return client.request(protocol.StatusReq())


def _headline(status: dict, rate: float, phase: str) -> Table:
    t = Table(title=f"LughOS energy-grid demo: {phase}", title_justify="left")
    for col in ("scheduler", "tasks", "dispatch rate", "completed", "deadline misses", "resp p99", "ready"):
        t.add_column(col)
    tasks = status["tasks"]
    sched = next(s for s in status["services"] if s["name"] == "scheduler")
    t.add_row(sched["plugin"], str(tasks["count"]), f"{rate:.0f} jobs/s", str(tasks["completed"]),
              str(tasks["missed"]), f"{tasks['response_p99_ms']} ms", str(tasks["ready"]))
    return t


def _line(status: dict, rate: float, phase: str) -> str:
    tasks = status["tasks"]
    sched = next(s for s in status["services"] if s["name"] == "scheduler")
    up = sum(1 for s in status["services"] if s["state"] == "up")
    return (f"[{phase}] scheduler={sched['plugin']} rate={rate:.0f} jobs/s completed={tasks['completed']} "
            f"missed={tasks['missed']} services up={up}/{len(status['services'])}")


def _watch(client: KernelClient, seconds: float, phase: str, live: Live | None) -> dict:
    end = time.monotonic() + seconds
    last = _sample(client)
    last_t = time.monotonic()
    next_line = 0.0
    while True:
        time.sleep(min(0.5, max(0.0, end - time.monotonic())))
        status = _sample(client)
        now = time.monotonic()
        rate = (status["tasks"]["completed"] - last["tasks"]["completed"]) / max(1e-6, now - last_t)
        last, last_t = status, now
        if live is not None:
            live.update(Group(_headline(status, rate, phase), views.services_table(status), views.lanes_table(status)))
        elif now >= next_line:
            console.print(_line(status, rate, phase))
            next_line = now + 2.0
        if now >= end:
            return status


def run(home: Path | None = None, duration: float = 40.0) -> bool:
    """Run the demo; True when the swap committed and lost nothing."""
    temporary = home is None
    if temporary:
        home = Path(tempfile.mkdtemp(prefix="lugh-demo-"))
    console.print(f"Booting a kernel in {home} with the energy-grid workload (50 sensor tasks)...")
    started = time.monotonic()
    try:
        runtime.up(home, workload="grid")
        console.print(f"Up in {time.monotonic() - started:.1f}s: kernel, reincarnation server, scheduler, storage, "
                      f"monitor and workers, each its own process.")
        with KernelClient(home) as client:
            interactive = console.is_terminal
            with Live(console=console, refresh_per_second=4) if interactive else _nothing() as live:
                before = _watch(client, duration / 3, "round-robin", live if interactive else None)
                swap = client.request(protocol.SwapReq(service="scheduler", plugin="priority"), timeout=120)
                middle = _watch(client, duration / 3, "priority, after a live swap", live if interactive else None)
                edf = client.request(protocol.InstallReq(name="edf-scheduler", swap=True), timeout=120)
                after = _watch(client, duration / 3, "edf, installed and swapped live",
                               live if interactive else None)
            views.print_swap(swap)
            if edf["swap"]:
                views.print_swap(edf["swap"])
            how = "already installed, verified" if edf["already_installed"] else "installed"
            console.print(f"lugh install edf-scheduler --swap: {edf['name']} {edf['version']} from registry "
                          f"{edf['registry']} (vendor {edf['vendor']}), signature and files {how}; "
                          f"committed={edf['committed']} in {edf['duration_ms']:.0f} ms.")
            views.print_status(after)
            lost_jobs = after["tasks"]["released"] - after["tasks"]["completed"] - after["tasks"]["ready"]
            swaps = [swap] + ([edf["swap"]] if edf["swap"] else [])
            console.print(
                f"\nLive swap round-robin -> priority: committed={swap['committed']}, "
                f"longest dispatch gap {swap['max_dispatch_gap_ms']} ms, "
                f"jobs lost {swap['jobs_lost']}, messages lost {swap['messages_lost']}.\n"
                + (f"Install and live swap priority -> edf: committed={edf['committed']}, longest dispatch gap "
                   f"{edf['swap']['max_dispatch_gap_ms']} ms, jobs lost {edf['swap']['jobs_lost']}, "
                   f"messages lost {edf['swap']['messages_lost']}.\n" if edf["swap"] else "")
                + f"Deadline misses: {before['tasks']['missed']} in the first third (round-robin), "
                f"{middle['tasks']['missed'] - before['tasks']['missed']} in the second (priority), "
                f"{after['tasks']['missed'] - middle['tasks']['missed']} in the last (edf). "
                f"Jobs released {after['tasks']['released']}, completed {after['tasks']['completed']}, "
                f"still ready {after['tasks']['ready']}, lost {lost_jobs}.")
            ok = (edf["committed"] and lost_jobs == 0
                  and all(s["committed"] and s["jobs_lost"] == 0 and s["messages_lost"] == 0 for s in swaps))
    finally:
        runtime.down(home)
        console.print(f"Shut down cleanly after {time.monotonic() - started:.0f}s.")
        if temporary:
            shutil.rmtree(home, ignore_errors=True)
    return ok


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
