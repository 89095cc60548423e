"""Fixtures: every test gets its own LUGH_HOME; a kernel fixture boots a real kernel
(real processes, sockets and files) and checks at teardown that no process it started
is left."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import pytest

from kernel import plugin_store, protocol
from lugh_sdk import firstparty, runtime
from lugh_sdk.client import KernelClient

FIXTURE_PLUGINS = Path(__file__).parent / "fixtures" / "plugins"


def processes_of(home: Path) -> list[int]:
    """Live processes started for the kernel of ``home`` (found by their environment)."""
    marker = b"LUGH_RUN_DIR=" + str((home / "run").resolve()).encode() + b"\0"
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if marker in f.read() + b"\0" and pids_alive([int(entry)]):
                        found.append(int(entry))
            except OSError:
                pass
    return found


def pids_alive(pids) -> list[int]:
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] != "Z":
                    alive.append(pid)
        except OSError:
            pass
    return alive


class Running:
    """A booted kernel: its home and a control client."""

    def __init__(self, home: Path):
        self.home = home
        self.client = KernelClient(home)

    def request(self, req, timeout=None) -> dict:
        return self.client.request(req, timeout=timeout)

    def status(self) -> dict:
        return self.request(protocol.StatusReq())

    def service(self, name: str) -> dict:
        return next(s for s in self.status()["services"] if s["name"] == name)

    def pids(self) -> list[int]:
        st = self.status()
        return [st["kernel"]["pid"]] + [s["pid"] for s in st["services"] if s["pid"]]

    def wait_for(self, predicate, timeout=30.0, what="condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.status()
            if predicate(st):
                return st
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; last status: {st}")


@pytest.fixture
def home(tmp_path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    return h


def install_fixture_plugin(home: Path, name: str) -> None:
    """Build a test plugin project from tests/fixtures/plugins and install it the way
    every plugin is installed."""
    project = FIXTURE_PLUGINS / name
    plugin_store.install_wheel(home, firstparty.cached_wheel(project, firstparty.source_digest(project)), replace=True)


def boot(home: Path, **kw) -> Running:
    kw.setdefault("workload", "none")
    runtime.up(home, **kw)
    return Running(home)


def down_and_check(running: Running, pids: list[int]) -> None:
    """Stop the kernel of ``running``; every process of it (``pids``, and any later
    incarnation) must be gone."""
    running.client.close()
    runtime.down(running.home)
    deadline = time.monotonic() + 10
    while (pids_alive(pids) or processes_of(running.home)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pids_alive(pids) == [] and processes_of(running.home) == [], "processes left behind"


@contextlib.contextmanager
def running_kernel(home: Path, **kw):
    """A kernel booted with ``boot(home, **kw)``, stopped on the way out with
    :func:`down_and_check`."""
    running = boot(home, **kw)
    pids = running.pids()
    try:
        yield running
    finally:
        down_and_check(running, pids)


@pytest.fixture
def kernel(home):
    with running_kernel(home) as running:
        yield running
