"""The heartbeat monitor driven through a real pluggy PluginManager."""

import pluggy
import pytest

import lugh_sdk.api.monitor
from lugh_heartbeat_monitor.plugin import DEADLINE_MISS, KEPT_MISSES, HeartbeatMonitor


@pytest.fixture
def hook():
    pm = pluggy.PluginManager("lugh")
    pm.add_hookspecs(lugh_sdk.api.monitor)
    pm.register(HeartbeatMonitor())
    return pm.hook


def test_an_empty_report(hook):
    assert hook.monitor_report() == {"events": {}, "deadline_misses": [], "last_seen": {}}


def test_counts_by_kind_and_last_event_of_each_service(hook):
    hook.monitor_event(kind="service_up", data={"service": "scheduler"}, at=1.0)
    hook.monitor_event(kind="heartbeat", data={"service": "scheduler"}, at=4.0)
    hook.monitor_event(kind="heartbeat", data={"service": "storage"}, at=3.0)
    hook.monitor_event(kind="swap", data={}, at=5.0)
    report = hook.monitor_report()
    assert report["events"] == {"service_up": 1, "heartbeat": 2, "swap": 1}
    assert report["last_seen"] == {"scheduler": 4.0, "storage": 3.0}


def test_keeps_only_the_latest_deadline_misses(hook):
    for n in range(KEPT_MISSES + 5):
        hook.monitor_event(kind=DEADLINE_MISS, data={"job": f"adc.{n}", "late_ms": n}, at=float(n))
    report = hook.monitor_report()
    assert report["events"] == {DEADLINE_MISS: KEPT_MISSES + 5}
    misses = report["deadline_misses"]
    assert len(misses) == KEPT_MISSES
    assert misses[0] == {"job": "adc.5", "late_ms": 5, "at": 5.0}
    assert misses[-1]["job"] == f"adc.{KEPT_MISSES + 4}"


def test_the_report_is_a_copy(hook):
    hook.monitor_event(kind="swap", data={"service": "scheduler"}, at=1.0)
    hook.monitor_report()["events"]["swap"] = 99
    assert hook.monitor_report()["events"] == {"swap": 1}
