"""A precise wake-up for the kernel's loop at the next job release: a Linux timerfd armed
at an absolute time on CLOCK_MONOTONIC (the clock of ``time.monotonic()``), watched by
the loop's selector like any socket.

Why: a selector's timeout is rounded up to whole milliseconds (``epoll_wait`` takes
milliseconds), so a loop that waits for the next release by timeout wakes 0 to 1 ms
late, every time (the release jitter of bench/edf.py). A timerfd fires from the
system's high-resolution timer. Python has ``os.timerfd_create`` only from 3.13, so it
is reached through ctypes; where that is not possible, :meth:`ReleaseTimer.create`
returns None and the loop keeps waiting by timeout.
"""

from __future__ import annotations

import ctypes
import math
import os

CLOCK_MONOTONIC = 1
TFD_NONBLOCK = os.O_NONBLOCK
TFD_CLOEXEC = os.O_CLOEXEC
TFD_TIMER_ABSTIME = 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class ReleaseTimer:
    """One-shot, re-armed by the loop on every pass (free when the time is unchanged)."""

    def __init__(self, libc, fd: int):
        self._libc = libc
        self.fd = fd
        self.armed: float | None = None  # the time it is set to fire at (None: not set)

    @classmethod
    def create(cls) -> "ReleaseTimer | None":
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
        except (OSError, AttributeError):  # not Linux, or no timerfd in its libc
            return None
        return cls(libc, fd) if fd >= 0 else None

    def fileno(self) -> int:
        return self.fd

    def arm(self, at: float) -> None:
        """Fire at monotonic time ``at`` (in the past: at once; infinite: never)."""
        if at == self.armed:
            return
        spec = _Itimerspec()
        if math.isfinite(at):
            # Rounded up, so that when it fires the loop's clock has reached ``at``.
            sec = math.floor(at)
            nsec = math.ceil((at - sec) * 1e9)
            if nsec >= 1_000_000_000:
                sec, nsec = sec + 1, 0
            spec.it_value = _Timespec(sec, nsec or (0 if sec else 1))  # all zero would disarm it
        if self._libc.timerfd_settime(self.fd, TFD_TIMER_ABSTIME, ctypes.byref(spec), None) != 0:
            raise OSError(ctypes.get_errno(), "timerfd_settime failed")
        self.armed = at

    def clear(self) -> None:
        """After it fired: consume the expiration (the selector would see it again)."""
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            pass
        self.armed = None

    def close(self) -> None:
        os.close(self.fd)
