"""`lugh up` / `lugh down` / status: real processes, clean shutdown, no double boot."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import boot, pids_alive, processes_of
from kernel import protocol
from lugh_sdk import runtime
from lugh_sdk.client import NotRunning


def test_up_starts_every_service_in_its_own_process(kernel):
    st = kernel.status()
    names = {s["name"]: s for s in st["services"]}
    assert {"rs", "scheduler", "storage", "monitor"} <= set(names)
    pids = [s["pid"] for s in st["services"]] + [st["kernel"]["pid"]]
    assert len(set(pids)) == len(pids), "each service is its own OS process"
    assert names["scheduler"]["plugin"] == "round-robin-scheduler"
    assert names["scheduler"]["version"] == "1.0.0"
    assert names["storage"]["plugin"] == "sqlite-storage"
    for s in st["services"]:
        assert s["state"] == "up"
        assert s["memory_budget"] > 0 and 0 < s["memory_rss"] < s["memory_budget"]
    assert set(st["lanes"]) == {"HIGH", "MEDIUM", "LOW"}


def test_memory_budget_is_enforced_by_the_os(kernel):
    pid = kernel.service("storage")["pid"]
    with open(f"/proc/{pid}/limits") as f:
        line = next(l for l in f if l.startswith("Max address space"))
    assert str(kernel.service("storage")["memory_budget"]) in line


def test_control_socket_is_private(kernel):
    run = (kernel.home / "run").resolve()
    assert oct((run / "control").stat().st_mode & 0o777) == "0o600"
    assert oct(run.stat().st_mode & 0o777) == "0o700"


def test_second_up_says_so_and_changes_nothing(kernel):
    before = kernel.pids()
    with pytest.raises(runtime.AlreadyRunning, match="already running"):
        runtime.up(kernel.home, workload="none")
    assert kernel.pids() == before


def test_down_leaves_nothing_and_up_works_again(home):
    running = boot(home)
    pids = running.pids()
    running.client.close()
    assert runtime.down(home)
    assert pids_alive(pids) == [] and processes_of(home) == []
    assert not list((home / "run").resolve().glob("*.h"))
    again = boot(home)
    try:
        assert again.status()["kernel"]["pid"] not in pids
    finally:
        again.client.close()
        runtime.down(home)
    assert processes_of(home) == []


def test_kernel_killed_takes_its_services_with_it(home):
    running = boot(home)
    pids = running.pids()
    running.client.close()
    os.kill(pids[0], signal.SIGKILL)
    import time
    deadline = time.monotonic() + 10
    while processes_of(home) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_of(home) == [], "no orphan survives the kernel"
    again = boot(home)  # stale sockets and lock do not block the next boot
    again.client.close()
    runtime.down(home)


def test_status_when_nothing_runs_is_a_clear_error(home):
    from lugh_sdk.client import KernelClient

    with pytest.raises(NotRunning, match="no kernel is running"):
        KernelClient(home).request(protocol.StatusReq())


def test_cli_status_json_and_errors(kernel):
    env = dict(os.environ, LUGH_HOME=str(kernel.home))
    out = subprocess.run([sys.executable, "-m", "lugh_sdk", "status", "--json"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert {s["name"] for s in data["services"]} >= {"scheduler", "storage", "monitor", "rs"}
    bad = subprocess.run([sys.executable, "-m", "lugh_sdk", "task", "rm", "nope"], env=env, capture_output=True, text=True)
    assert bad.returncode == 1
    assert "error:" in bad.stderr and "Traceback" not in bad.stderr
