"""Round-robin: fair and simple, but blind to deadlines and priorities; a baseline, and
the policy to fall back on when task parameters cannot be trusted."""

from __future__ import annotations

from lugh_sdk.api.queues import ReadyQueueScheduler, RotationQueue


class RoundRobinScheduler(ReadyQueueScheduler):
    """FIFO of releases, with rotation among tasks: a task with several ready jobs gets
    one per turn and goes to the back. Non-preemptive: a released job never interrupts
    the running one, it waits for its turn."""

    KIND = "round-robin"

    def make_queue(self) -> RotationQueue:
        return RotationQueue()
