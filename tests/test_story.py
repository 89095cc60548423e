"""The whole story on a running kernel, with the README's commands: a vendor makes a
scheduler plugin (`lugh new scheduler my-sched`), its own tests pass, `lugh publish`
signs it into this machine's registry, `lugh install my-sched --swap` verifies it and
swaps the running scheduler to it live, then `lugh install edf-scheduler --swap` does
the same with the first-party EDF scheduler. The journal shows every step; no job is
lost; the kernel ran the energy-grid workload throughout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import boot, down_and_check


def lugh(home, *args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    env = dict(os.environ, LUGH_HOME=str(home), COLUMNS="200", LUGH_VENDOR="acme")
    return subprocess.run([sys.executable, "-m", "lugh_sdk", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture
def grid(home):
    running = boot(home, workload="grid")
    pids = running.pids()
    try:
        yield running
    finally:
        down_and_check(running, pids)


def test_new_test_publish_install_swap_then_edf(grid, tmp_path):
    home = grid.home
    project = tmp_path / "my-sched"
    out = ok(lugh(home, "new", "scheduler", "my-sched", "--vendor", "acme", "--dir", str(project)))
    assert "Created scheduler plugin my-sched" in out
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=project,
                           capture_output=True, text=True, timeout=300)
    assert tests.returncode == 0 and " passed" in tests.stdout, tests.stdout[-3000:] + tests.stderr[-2000:]
    published = json.loads(ok(lugh(home, "publish", "--json", cwd=project)))
    assert (published["name"], published["vendor"], published["kind"]) == ("my-sched", "acme", "scheduler")
    version = published["version"]

    mine = json.loads(ok(lugh(home, "install", "my-sched", "--swap", "--json")))
    assert (mine["installed"], mine["committed"], mine["version"], mine["vendor"]) == (True, True, version, "acme")
    assert (mine["swap"]["committed"], mine["swap"]["jobs_lost"], mine["swap"]["messages_lost"]) == (True, 0, 0)
    assert grid.service("scheduler")["plugin"] == "my-sched"

    edf = json.loads(ok(lugh(home, "install", "edf-scheduler", "--swap", "--json")))
    assert (edf["committed"], edf["vendor"], edf["registry"]) == (True, "lughos", "local")
    assert (edf["swap"]["committed"], edf["swap"]["previous"], edf["swap"]["jobs_lost"],
            edf["swap"]["messages_lost"]) == (True, f"my-sched=={version}", 0, 0)
    sched = grid.service("scheduler")
    assert (sched["plugin"], sched["state"]) == ("edf-scheduler", "up")

    records = json.loads(ok(lugh(home, "log", "--json")))["records"]
    steps = lambda op_id: [r["op"] for r in records if r["data"].get("id") == op_id]
    assert steps(mine["id"]) == ["install.begin", "install.stage", "install.activate", "install.commit"]
    assert steps(mine["swap"]["id"]) == ["swap.begin", "swap.quiesce", "swap.import", "swap.redirect", "swap.commit"]
    assert steps(edf["id"]) == ["install.begin", "install.commit"]  # first-party: installed at boot, verified now
    assert steps(edf["swap"]["id"]) == ["swap.begin", "swap.quiesce", "swap.import", "swap.redirect", "swap.commit"]
    order = [r["data"].get("id") for r in records]
    assert order.index(mine["id"]) < order.index(mine["swap"]["id"]) < order.index(edf["id"])

    listed = ok(lugh(home, "list"))
    assert "my-sched" in listed and "edf-scheduler" in listed
    time.sleep(1.0)
    t = grid.status()["tasks"]
    assert t["count"] == 50 and t["released"] == t["completed"] + t["ready"], t  # 0 jobs lost
