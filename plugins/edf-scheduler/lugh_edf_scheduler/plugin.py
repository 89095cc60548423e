"""EDF: optimal on one CPU for independent preemptive jobs (all deadlines are met
whenever utilisation is at most 1), which is why it suits periodic sensor tasks."""

from __future__ import annotations

from lugh_sdk.api import Job
from lugh_sdk.api.queues import KeyedScheduler


class EdfScheduler(KeyedScheduler):
    """Earliest absolute ``deadline`` first; preemptive.

    Ties: earlier release, then task name, then job id. A released job preempts the
    running one only if its deadline is strictly earlier.
    """

    KIND = "edf"

    @staticmethod
    def urgency(job: Job) -> float:
        return job.deadline
