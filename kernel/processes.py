"""Child processes of the kernel: spawn (never fork a process holding NNG sockets: we
exec a fresh interpreter), enforce the memory budget, watch for exit at once with a
pidfd, stop cleanly.

The kernel owns every process of a running system (the reincarnation server, services
and workers): it is the one that waits for them, so nothing outlives ``lugh down``.
Children also die with the kernel (PR_SET_PDEATHSIG, set by :func:`die_with_parent`).
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

PR_SET_PDEATHSIG = 1


@dataclass
class Child:
    name: str
    popen: subprocess.Popen
    pidfd: int
    memory_budget: int
    log_path: Path
    started: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid


def spawn(name: str, module: str, args: list[str], *, env: dict[str, str], log_path: Path,
          memory_budget: int, started: float) -> Child:
    """Start ``python -m module args`` with its stdout/stderr in ``log_path`` and an
    address-space limit the OS enforces (RLIMIT_AS, set from here with prlimit so the
    child cannot skip it)."""
    log = open(log_path, "ab")
    try:
        popen = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            close_fds=True,
        )
    finally:
        log.close()
    if memory_budget:
        try:
            resource.prlimit(popen.pid, resource.RLIMIT_AS, (memory_budget, memory_budget))
        except (ProcessLookupError, PermissionError):
            pass  # it already died: the pidfd below reports it
    return Child(name=name, popen=popen, pidfd=os.pidfd_open(popen.pid), memory_budget=memory_budget,
                 log_path=log_path, started=started)


def reap(child: Child) -> int | None:
    """Exit status if the child has exited (and close its pidfd), else None."""
    code = child.popen.poll()
    if code is not None and child.pidfd >= 0:
        os.close(child.pidfd)
        child.pidfd = -1
    return code


def kill(child: Child, sig: int = signal.SIGKILL) -> None:
    try:
        child.popen.send_signal(sig)
    except ProcessLookupError:
        pass


def stop(child: Child, timeout: float = 2.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; always waits, so no zombie is left."""
    if child.popen.poll() is None:
        kill(child, signal.SIGCONT)  # a stopped (preempted) process cannot act on SIGTERM
        kill(child, signal.SIGTERM)
        try:
            child.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            kill(child, signal.SIGKILL)
            child.popen.wait()
    reap(child)


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def last_line(path: Path, limit: int = 4096) -> str:
    """The last non-empty line of a log: a service's own account of why it died."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            lines = [l for l in f.read().decode(errors="replace").splitlines() if l.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def die_with_parent(parent_pid: int) -> None:
    """Called first thing in every child: if the kernel dies, so do we (no orphans).
    The getppid check closes the race where the parent died before the prctl."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass
    if os.getppid() != parent_pid:
        os._exit(1)
