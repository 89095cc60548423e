"""The energy-grid demo workload: 50 sensor tasks across feeders.

Each task samples one simulated sensor and writes the reading through the storage
service. Periods follow what grid protection and monitoring need: frequency fastest
(10 ms), breaker state and voltage next, current and slow telemetry last (up to 1 s).
About 300 jobs per second in all, a utilisation well under 1 for the dispatch slot.
"""

from __future__ import annotations

from lugh_sdk.api.types import Task

# quantity, how many sensors, period ms, priority (larger = more important)
_GRID = [
    ("frequency", 1, 10, 90),
    ("breaker", 4, 50, 80),
    ("voltage", 12, 200, 60),
    ("current", 21, 500, 40),
    ("voltage", 6, 1000, 20),
    ("current", 6, 1000, 10),
]


def grid_tasks() -> list[Task]:
    tasks = []
    serial = 0
    for quantity, count, period, priority in _GRID:
        for i in range(count):
            serial += 1
            feeder = f"f{(serial % 8) + 1}"
            name = f"{quantity}-{feeder}-{serial:02d}"
            # Phases spread over the period, as a grid operator staggers polling, so that
            # the demo has no critical instant where all 50 tasks release together.
            tasks.append(Task(name=name, period_ms=period, deadline_ms=period, budget_ms=min(2.0, period / 5),
                              priority=priority, action=f"sample:{quantity}:{feeder}.{serial:02d}",
                              offset_ms=round(period * i / count, 3)))
    return tasks
