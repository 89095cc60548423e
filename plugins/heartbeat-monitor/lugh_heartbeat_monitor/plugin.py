"""A monitor that answers "is everything alive, and what went wrong lately?" in O(1)
memory: the kernel may send events for years, so nothing here grows with their number."""

from __future__ import annotations

from collections import Counter, deque

from lugh_sdk.api import hookimpl

DEADLINE_MISS = "deadline_miss"
KEPT_MISSES = 20


class HeartbeatMonitor:
    """Counts events by kind, keeps the last :data:`KEPT_MISSES` deadline misses and the
    time of the last event of each service (named by ``data["service"]``)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.misses: deque[dict] = deque(maxlen=KEPT_MISSES)
        self.last_seen: dict[str, float] = {}

    @hookimpl
    def monitor_event(self, kind: str, data: dict, at: float) -> None:
        self.counts[kind] += 1
        if kind == DEADLINE_MISS:
            self.misses.append({**data, "at": at})
        service = data.get("service")
        if isinstance(service, str):
            self.last_seen[service] = max(at, self.last_seen.get(service, at))

    @hookimpl
    def monitor_report(self) -> dict:
        return {
            "events": dict(self.counts),
            "deadline_misses": list(self.misses),
            "last_seen": dict(self.last_seen),
        }
