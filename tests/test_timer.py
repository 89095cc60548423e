"""The kernel loop's release timer (kernel/timer.py): a timerfd armed at an absolute
time on the clock of time.monotonic()."""

from __future__ import annotations

import selectors
import time

import pytest

from kernel.timer import ReleaseTimer


@pytest.fixture
def timer():
    t = ReleaseTimer.create()
    if t is None:
        pytest.skip("no timerfd on this system (the loop falls back to a timeout)")
    sel = selectors.DefaultSelector()
    sel.register(t, selectors.EVENT_READ)
    yield t, sel
    sel.close()
    t.close()


def test_fires_not_before_its_time_and_only_once(timer):
    t, sel = timer
    at = time.monotonic() + 0.005
    t.arm(at)
    assert sel.select(5.0), "the timer did not fire within 5 s"
    assert time.monotonic() >= at
    t.clear()
    assert t.armed is None and sel.select(0.02) == []  # one shot: cleared, silent


def test_past_time_fires_at_once_and_infinity_disarms(timer):
    t, sel = timer
    t.arm(time.monotonic() - 1.0)
    assert sel.select(5.0)
    t.clear()
    t.arm(time.monotonic() + 0.01)
    t.arm(float("inf"))  # re-armed to never before it fired
    assert sel.select(0.05) == []
    assert t.armed == float("inf")
