"""Child processes of the kernel: spawn (never fork a process holding NNG sockets: we
exec a fresh interpreter), enforce the memory budget, watch for exit at once with a
pidfd, stop cleanly.

The kernel owns every process of a running system (the reincarnation server, services
and workers): it is the one that waits for them, so nothing outlives ``lugh down``.
Children also die with the kernel (PR_SET_PDEATHSIG, set by :func:`die_with_parent`).
"""

from __future__ import annotations

import ctypes
import json
import os
import queue
import resource
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from kernel import realtime

PR_SET_PDEATHSIG = 1
SPARE_RETRY = 5.0  # after a spare died before it was taken, before the next one


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


class _Popen(subprocess.Popen):
    """A Popen that never reaps from a real-time thread (kernel/realtime.py). Reaping a
    child drops its /proc entries, and Linux then waits, spinning, for every reader of
    them to let go: a real-time thread spinning there can keep that normal-policy
    reader off the CPU for good (a livelock). So a wait that may reap runs on a
    short-lived thread at the normal policy while the caller sleeps; a poll of a child
    still running reaps nothing and stays where it is."""

    def poll(self):
        if self.returncode is None and _realtime_thread() and _exited(self.pid):
            return _at_normal_policy(super().poll)
        return super().poll()

    def wait(self, timeout=None):
        if self.returncode is None and _realtime_thread():
            return _at_normal_policy(super().wait, timeout)
        return super().wait(timeout)


def _realtime_thread() -> bool:
    return os.sched_getscheduler(0) != os.SCHED_OTHER


def _exited(pid: int) -> bool:
    """Whether ``pid`` has exited and waits to be reaped (without reaping it)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True  # reaped already: Popen's own poll says so


def _at_normal_policy(fn, *args):
    result: list = []

    def run() -> None:
        realtime.apply(0, 0)  # this thread only: it was born with its creator's policy
        try:
            result.append((True, fn(*args)))
        except BaseException as exc:  # handed back to the caller as is
            result.append((False, exc))

    thread = threading.Thread(target=run, name="lugh-reap", daemon=True)
    thread.start()
    thread.join()
    ok, value = result[0]
    if not ok:
        raise value
    return value


def spawn(name: str, module: str, args: list[str], *, env: dict[str, str], log_path: Path,
          memory_budget: int, started: float, stdin=subprocess.DEVNULL, rt_priority: int = 0) -> Child:
    """Start ``python -m module args`` with its stdout/stderr in ``log_path``, an
    address-space limit the OS enforces (RLIMIT_AS, set from here with prlimit so the
    child cannot skip it) and the CPU policy of ``rt_priority`` (kernel/realtime.py; 0:
    the normal policy)."""
    log = open(log_path, "ab")
    try:
        popen = _Popen(
            [sys.executable, "-m", module, *args],
            env=env, stdin=stdin, stdout=log, stderr=subprocess.STDOUT,
            close_fds=True,
        )
    finally:
        log.close()
    if memory_budget:
        try:
            resource.prlimit(popen.pid, resource.RLIMIT_AS, (memory_budget, memory_budget))
        except (ProcessLookupError, PermissionError):
            pass  # it already died: the pidfd below reports it
    _set_policy(popen.pid, rt_priority)
    return Child(name=name, popen=popen, pidfd=os.pidfd_open(popen.pid), memory_budget=memory_budget,
                 log_path=log_path, started=started)


class Spare:
    """One spare interpreter, started ahead of need: a fresh process (spawned like any
    other, under the same memory budget) that has imported ``module`` and everything it
    needs, and waits on its stdin. :meth:`take` gives it
    its identity (arguments, secret environment) and it runs as if just started; then a
    new spare is started ``refill_after`` seconds later: once the one taken has had the
    CPU to load its plugin and connect, soon enough to be ready for the next crash.

    It is what a fork server would buy (no interpreter start, no imports on the
    critical path of a restart) without forking: NNG is not fork-safe once a socket is
    open, and a spare opens none until it is taken. It holds no plugin and no state.
    The module must accept the single argument ``--spare`` (kernel.services.host);
    ``env()`` gives its environment, less what :meth:`take` adds.

    Spares are spawned by a thread of their own, so that the caller's loop never waits
    for a fork and exec: a thread that lives until :meth:`close`, because
    PR_SET_PDEATHSIG follows the thread that spawned a process, and a spare taken is a
    service that must die with the kernel, not with a passing thread."""

    def __init__(self, module: str, run_dir: Path, env, memory_budget: int, refill_after: float = 0.1):
        self.module, self.run_dir, self.env, self.memory_budget = module, run_dir, env, memory_budget
        self.refill_after = refill_after
        self.child: Child | None = None
        self.due = 0.0
        self.spawned = 0
        self._lock = threading.Lock()  # self.child and self._spawning, shared with the spawner
        self._spawning = False
        self._closed = False
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._spawner: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        child = self.child
        return child.pid if child else None

    def refill(self, now: float) -> None:
        """Have a spare started if none is waiting and it is time (it is, a moment later)."""
        with self._lock:
            dead = self.child if self.child is not None and self.child.popen.poll() is not None else None
            if dead is not None:
                self.child, self.due = None, now + SPARE_RETRY
            start = self.child is None and not self._spawning and not self._closed and now >= self.due
            if start:
                self._spawning = True
                self.spawned += 1
        if dead is not None:
            self._discard(dead, keep_log=True)  # its log says why
        if start:
            if self._spawner is None:
                self._spawner = threading.Thread(target=self._spawn_loop, name="lugh-spare", daemon=True)
                self._spawner.start()
            self._requests.put(self.spawned)

    def _spawn_loop(self) -> None:
        while (n := self._requests.get()) is not None:
            try:
                child = spawn(f"spare-{n}", self.module, ["--spare"], env=self.env(),
                              log_path=self.run_dir / f"spare-{n}.log", memory_budget=self.memory_budget,
                              started=time.monotonic(), stdin=subprocess.PIPE)
            except Exception as exc:  # the kernel runs on without spares; a plain spawn will tell why
                print(f"kernel: cannot start a spare host: {type(exc).__name__}: {exc}", file=sys.stderr)
                child = None
            with self._lock:
                self._spawning = False
                if child is None:
                    self.due = time.monotonic() + SPARE_RETRY
                elif not self._closed:
                    self.child, child = child, None
            if child is not None:  # closed meanwhile
                self._discard(child)

    def take(self, name: str, args: list[str], *, env: dict[str, str], log_path: Path,
             started: float, rt_priority: int = 0) -> Child | None:
        """The waiting spare, now running ``module args`` as ``name`` (its log renamed to
        ``log_path``) under the CPU policy of ``rt_priority``; None if there is none, or
        it died meanwhile."""
        with self._lock:
            child, self.child = self.child, None
            self.due = started + self.refill_after
        if child is None:
            return None
        try:
            if child.popen.poll() is not None:
                raise BrokenPipeError
            if rt_priority:  # before it opens a socket: NNG's threads inherit it
                _set_policy(child.pid, rt_priority)
            child.popen.stdin.write(json.dumps({"argv": args, "env": env}).encode() + b"\n")
            child.popen.stdin.close()
        except OSError:
            self._discard(child, keep_log=True)
            return None
        try:
            os.replace(child.log_path, log_path)
        except OSError:
            pass  # the log keeps its spare name; the Child says where it is
        else:
            child.log_path = log_path
        child.name, child.started = name, started
        return child

    def close(self) -> None:
        with self._lock:
            self._closed = True
            child, self.child = self.child, None
        if child is not None:
            self._discard(child)
        if self._spawner is not None:
            self._requests.put(None)
            self._spawner.join(5.0)

    @staticmethod
    def _discard(child: Child, keep_log: bool = False) -> None:
        try:
            child.popen.stdin.close()  # EOF: a waiting spare exits on its own
        except OSError:
            pass
        stop(child, timeout=1.0)
        if not keep_log:
            child.log_path.unlink(missing_ok=True)


def _set_policy(pid: int, rt_priority: int) -> None:
    """A child inherits a real-time kernel's policy: set the one it is meant to have
    while its interpreter is still starting, before any thread of its own exists."""
    if rt_priority or _realtime_thread():
        if (why := realtime.apply(pid, rt_priority)) and why != "the process has exited":
            print(f"kernel: CPU policy of child {pid}: {why}", file=sys.stderr)


def reap(child: Child) -> int | None:
    """Exit status if the child has exited (and close its pidfd), else None."""
    code = child.popen.poll()
    if code is not None and child.pidfd >= 0:
        os.close(child.pidfd)
        child.pidfd = -1
    return code


def kill(child: Child, sig: int = signal.SIGKILL) -> None:
    """Signal ``child`` through its pidfd: one system call on the dispatch path (each
    preemption and resume), never a reap (``Popen.send_signal`` polls first, which from
    a real-time thread costs the checks of ``_Popen``), never a process that took over
    the pid of one already reaped."""
    if child.pidfd < 0:
        return  # reaped: nothing left to signal
    try:
        signal.pidfd_send_signal(child.pidfd, sig)
    except ProcessLookupError:
        pass  # exited, not reaped yet: its exit is reported through the same pidfd


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
