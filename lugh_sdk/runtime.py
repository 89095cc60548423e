"""Boot and stop a kernel on the local machine (`lugh up`, `lugh down`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from kernel import paths, protocol
from lugh_sdk import firstparty
from lugh_sdk.client import KernelClient, LughError

BOOT_TIMEOUT = 90.0


class AlreadyRunning(LughError):
    pass


def kernel_pid(home: Path) -> int | None:
    pid_file = home / "run" / "kernel.pid"
    try:
        pid = json.loads(pid_file.read_text())["pid"]
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError, KeyError):
        return None


def all_up(status: dict) -> bool:
    return all(s["state"] == "up" for s in status["services"])


def settled(status: dict) -> bool:
    """Every service is up, or was declared failed (its reincarnation server gave up:
    e.g. storage refusing a corrupt data set). The kernel runs on in that service's safe
    mode, and `lugh status` shows why it failed."""
    return all(s["state"] in ("up", "failed") for s in status["services"])


def up(home: Path, *, workload: str = "grid", heartbeat: float = 0.1, workers: int = 3,
       timeout: float = BOOT_TIMEOUT, extra_env: dict | None = None, kernel_args: list | None = None) -> dict:
    """Start a kernel in its own session and return its status once every service is
    healthy, or failed for good (see :func:`settled`; the status says which and why).
    Refuses, changing nothing, if one is already running for ``home``."""
    with KernelClient(home, timeout=2.0) as client:
        if client.is_running():
            status = client.request(protocol.StatusReq())
            raise AlreadyRunning(f"a kernel is already running for {home} (pid {status['kernel']['pid']}); nothing changed")
    firstparty.ensure_installed(home)
    run = paths.run_dir(home)
    log = open(run / "kernel.log", "ab")
    cmd = [sys.executable, "-m", "kernel", "--home", str(home), "--workload", workload,
           "--heartbeat", str(heartbeat), "--workers", str(workers)] + list(kernel_args or [])  # e.g. --listen
    env = dict(os.environ, **(extra_env or {}))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(firstparty.source_root()), env.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env=env, close_fds=True)
    log.close()
    deadline = time.monotonic() + timeout
    with KernelClient(home, timeout=2.0) as client:
        while time.monotonic() < deadline:
            code = proc.poll()
            if code is not None:
                if code == paths.EXIT_ALREADY_RUNNING:
                    raise AlreadyRunning(f"a kernel is already running for {home}; nothing changed")
                raise LughError(f"the kernel exited during boot (status {code}):\n"
                                + _tail(run / "kernel.log"))
            try:
                status = client.request(protocol.StatusReq())
                if settled(status):
                    return status
            except LughError:
                pass
            time.sleep(0.1)
    down(home)
    raise LughError(f"the kernel did not become healthy within {timeout:g}s:\n" + _tail(run / "kernel.log"))


def down(home: Path, timeout: float = 15.0) -> bool:
    """Stop the kernel and everything it started. True if one was running."""
    pid = kernel_pid(home)
    with KernelClient(home, timeout=5.0) as client:
        try:
            client.request(protocol.ShutdownReq())
        except LughError:
            if pid is None:
                return False
    if pid is not None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)  # its children die with it (PR_SET_PDEATHSIG)
            while _alive(pid):
                time.sleep(0.05)
    return True


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
