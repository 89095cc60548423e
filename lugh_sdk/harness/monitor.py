"""Run a monitor plugin against recorded events, offline, through pluggy.

A recording is a list of :class:`Event` (kind, data, at), exactly what the kernel sends
a monitor service (``kernel.protocol.Event``): today ``deadline_miss`` with ``job``,
``task`` and ``late_ms``; later kernels may send more kinds, which a monitor must ignore
if it does not know them. Recordings are JSON Lines, one ``{"kind", "data", "at"}``
object per line (:func:`load_events`, :func:`save_events`).

:func:`sample_events` gives a deterministic recording with the kernel's schema: the
deadline misses of an overloaded non-preemptive scheduler in the simulator
(:func:`events_from_simulation` turns any simulation into the events the kernel would
have sent).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from kernel.protocol import MAX_MESSAGE_BYTES
from lugh_sdk.api import Task
from lugh_sdk.harness.loader import plugin_manager


@dataclass(frozen=True)
class Event:
    kind: str
    data: dict[str, Any]
    at: float  # kernel monotonic seconds


def load_events(path: str | Path) -> list[Event]:
    events = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            events.append(Event(kind=str(raw["kind"]), data=dict(raw.get("data", {})), at=float(raw["at"])))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{n}: not an event ({exc})") from None
    return events


def save_events(path: str | Path, events: Iterable[Event]) -> None:
    Path(path).write_text("".join(json.dumps({"kind": e.kind, "data": e.data, "at": e.at}) + "\n" for e in events))


def events_from_simulation(result) -> list[Event]:
    """The monitor events the kernel would have sent during a
    :func:`lugh_sdk.harness.scheduler.simulate` run (its ``deadline_miss`` events)."""
    return [Event(kind="deadline_miss", data={"job": j.id, "task": j.task, "late_ms": round(j.late_ms, 3)},
                  at=j.finish_ms / 1000) for j in result.jobs if j.missed]


def sample_events() -> list[Event]:
    """Some 80 ``deadline_miss`` events of 4 tasks: a non-preemptive FIFO scheduler
    at utilisation 0.95, simulated for one second."""
    from lugh_sdk.api.queues import ReadyQueueScheduler, RotationQueue
    from lugh_sdk.harness.scheduler import simulate

    class Fifo(ReadyQueueScheduler):
        KIND = "fifo"

        def make_queue(self) -> RotationQueue:
            return RotationQueue()

    tasks = [Task(name="breaker", period_ms=4, deadline_ms=4, budget_ms=1.2),
             Task(name="voltage", period_ms=10, deadline_ms=10, budget_ms=2.5),
             Task(name="frequency", period_ms=25, deadline_ms=20, budget_ms=5),
             Task(name="meter", period_ms=100, deadline_ms=100, budget_ms=5)]
    return events_from_simulation(simulate(Fifo, tasks, 1000))


@dataclass
class MonitorRun:
    report: Any  # what monitor_report returned at the end
    events: int  # events delivered
    errors: list[str] = field(default_factory=list)  # exceptions raised by the hooks


def replay(plugin: Any, events: Iterable[Event], *, hook=None) -> MonitorRun:
    """Deliver ``events`` in order to ``plugin`` (a class or a plugin object; or pass
    the ``hook`` relay of a PluginManager you keep), then ask for its report. An
    exception from a hook is recorded and the replay goes on, as the monitor service
    counts it and goes on."""
    hook = hook or plugin_manager("monitor", plugin).hook
    run = MonitorRun(report=None, events=0)
    for event in events:
        run.events += 1
        try:
            hook.monitor_event(kind=event.kind, data=event.data, at=event.at)
        except Exception as exc:
            run.errors.append(f"monitor_event #{run.events} ({event.kind}): {type(exc).__name__}: {exc}")
    try:
        run.report = hook.monitor_report()
    except Exception as exc:
        run.errors.append(f"monitor_report: {type(exc).__name__}: {exc}")
    return run


def report_size(report: Any) -> int:
    """Bytes of the report as it crosses IPC (msgpack); raises TypeError when it cannot."""
    try:
        return len(msgspec.msgpack.encode(report))
    except (TypeError, msgspec.EncodeError) as exc:
        raise TypeError(f"the report cannot be sent over IPC ({exc}); use dicts, lists, str, int, float, "
                        "bool, None and bytes") from None


# ---------------------------------------------------------------------------------
# Conformance cases.

from lugh_sdk.harness.conformance import ConformanceError, Context, case, expect  # noqa: E402


def _sendable(run: MonitorRun, what: str, *, limit: bool = True) -> int:
    expect(not run.errors, f"{what}: the monitor raised: " + "; ".join(run.errors[:3]))
    expect(isinstance(run.report, dict), f"{what}: monitor_report returned {type(run.report).__name__}, not a dict")
    try:
        size = report_size(run.report)
    except TypeError as exc:
        raise ConformanceError(f"{what}: {exc}") from None
    expect(size <= MAX_MESSAGE_BYTES or not limit,
           f"{what}: the report is {size} bytes; a message may carry {MAX_MESSAGE_BYTES}")
    return size


@case("monitor", "empty-report")
def _empty(ctx: Context) -> None:
    """Before any event, monitor_report returns a dict that can cross IPC."""
    _sendable(replay(ctx.instance(), []), "before any event")


@case("monitor", "recorded-events")
def _recorded(ctx: Context) -> None:
    """A recording of deadline misses (the kernel's schema) is taken without an error
    and the report can cross IPC."""
    _sendable(replay(ctx.instance(), sample_events()), "replaying the sample recording")


@case("monitor", "unknown-events-ignored")
def _unknown(ctx: Context) -> None:
    """Kinds this monitor does not know (a newer kernel's), and data without the usual
    fields, raise nothing."""
    odd = [Event("swap_committed", {"service": "scheduler", "plugin": "edf-scheduler"}, 1.0),
           Event("deadline_miss", {}, 2.0), Event("service_down", {"service": None, "nested": {"a": [1]}}, 3.0),
           Event("", {"x": b"\x00"}, 4.0)]
    _sendable(replay(ctx.instance(), odd), "unusual events")


@case("monitor", "bounded-report")
def _bounded(ctx: Context) -> None:
    """The report does not grow with the number of events (the kernel may send events
    for years): after 20 000 events it is at most a little larger than after 2 000."""
    ctx.require_fresh()
    base = sample_events()

    def events(n: int):
        for i in range(n):
            e = base[i % len(base)]
            yield Event(e.kind, e.data, e.at + (i // len(base)) * 1000.0)

    small = _sendable(replay(ctx.instance(), events(2_000)), "2 000 events", limit=False)
    large = _sendable(replay(ctx.instance(), events(20_000)), "20 000 events", limit=False)
    expect(large <= 2 * small + 4096, f"the report grows with the events: {small} bytes after 2 000, "
                                      f"{large} after 20 000; keep counters and a bounded window")
    expect(large <= MAX_MESSAGE_BYTES, f"the report is {large} bytes; a message may carry {MAX_MESSAGE_BYTES}")
