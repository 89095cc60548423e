"""Fixed priorities: the most predictable policy under overload, since the least important
tasks are the ones that miss their deadlines."""

from __future__ import annotations

from lugh_sdk.api import Job
from lugh_sdk.api.queues import KeyedScheduler


class PriorityScheduler(KeyedScheduler):
    """Highest ``priority`` first (a larger number is more important); preemptive.

    Ties: earlier release, then task name, then job id. A released job preempts the
    running one only if its priority is strictly higher.
    """

    KIND = "priority"

    @staticmethod
    def urgency(job: Job) -> int:
        return -job.priority
