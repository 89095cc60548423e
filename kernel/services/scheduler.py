"""Scheduler service: maps the kernel's scheduling messages to a scheduler plugin's hooks.

Events change the plugin's view; requests (pick, export, import, health) are answered
on the lane they came on, with the stream position, so the kernel knows exactly which
events the answer accounts for.
"""

from __future__ import annotations

from kernel import protocol
from kernel.services.loop import report_error
from lugh_sdk.api.types import Job

MAX_SKIPPED = 256  # picks of busy tasks passed over in one decision, at most


class Server:
    def __init__(self, hook, stream, args):
        self.hook = hook
        self.stream = stream
        # The jobs released and not completed, by id: a pick skipped because its task
        # has a job on a worker is put back with its Job (several dispatch slots).
        self.jobs: dict[str, Job] = {}

    def _picks_until(self, now: float, wanted) -> tuple[str | None, list[str]]:
        """The plugin's picks up to the first one ``wanted`` accepts (None: the plugin
        has none left), and the ones before it, in order. Past ``MAX_SKIPPED`` picks the
        search ends with none accepted: every pick taken is among those before."""
        passed = []
        while len(passed) <= MAX_SKIPPED:
            job_id = self.hook.sched_pick_next(now=now, running=None)
            if job_id is None or wanted(job_id):
                return job_id, passed
            passed.append(job_id)
        return None, passed

    def _give_back(self, job_ids) -> None:
        for job_id in job_ids:
            self.hook.sched_job_released(job=self.jobs[job_id])

    def _pick_startable(self, msg) -> str | None:
        """The plugin's next pick that may start now: with several slots, a job whose
        task already has another job on a worker waits for it (a task's jobs run one
        after the other); the picks skipped go back to the plugin, in order."""
        on_workers = {job.id for job in msg.on_workers}
        busy = {job.task for job in msg.on_workers}
        job_id, skipped = self._picks_until(
            msg.now, lambda j: j in on_workers or j not in self.jobs or self.jobs[j].task not in busy)
        self._give_back(skipped)
        return job_id

    def handle(self, msg):
        hook = self.hook
        try:
            if isinstance(msg, protocol.PickNext):
                if msg.running is not None:
                    # Does anything preempt one of the running jobs? The plugin answers
                    # about one at a time; the first it would stop gives up its slot.
                    for running in (msg.running, *msg.others):
                        job_id = hook.sched_pick_next(now=msg.now, running=running)
                        if job_id is not None:
                            return protocol.Picked(req=msg.req, job_id=job_id, preempts=running.id,
                                                   applied_seq=self.stream.applied)
                    return protocol.Picked(req=msg.req, job_id=None, applied_seq=self.stream.applied)
                job_id = self._pick_startable(msg) if msg.on_workers else hook.sched_pick_next(now=msg.now, running=None)
                more = []
                # A batch: the plugin's next picks with no event in between are the order
                # in which it would start those jobs; one message carries them all.
                while job_id is not None and len(more) < msg.limit - 1:
                    following = hook.sched_pick_next(now=msg.now, running=None)
                    if following is None:
                        break
                    more.append(following)
                return protocol.Picked(req=msg.req, job_id=job_id, applied_seq=self.stream.applied, more=more)
            if isinstance(msg, protocol.JobReleased):
                self.jobs[msg.job.id] = msg.job
                hook.sched_job_released(job=msg.job)
            elif isinstance(msg, protocol.JobStarted):
                # Its pick, made by the kernel (protocol.JobStarted). A job the plugin
                # offers before it that the kernel already started (its fallback did) is
                # dropped, as picking it would have; any other goes back, in order.
                decided = set(msg.decided)
                _, before = self._picks_until(msg.at, lambda j: j == msg.job_id)
                self._give_back(j for j in before if j not in decided and j in self.jobs)
            elif isinstance(msg, protocol.JobCompleted):
                self.jobs.pop(msg.job.id, None)
                hook.sched_job_completed(job=msg.job)
            elif isinstance(msg, protocol.TaskAdded):
                hook.sched_task_added(task=msg.task)
            elif isinstance(msg, protocol.TaskRemoved):
                self.jobs = {k: job for k, job in self.jobs.items() if job.task != msg.name}
                hook.sched_task_removed(name=msg.name)
            elif isinstance(msg, protocol.ExportState):
                return protocol.Exported(req=msg.req, state=hook.sched_export_state(),
                                         applied_seq=self.stream.applied)
            elif isinstance(msg, protocol.ImportState):
                hook.sched_import_state(state=msg.state)
                self.jobs = {job.id: job for job in msg.state.ready}
                self.stream.applied = msg.applied_seq
                return protocol.Done(req=msg.req, ok=True, applied_seq=self.stream.applied)
            elif isinstance(msg, protocol.HealthCheck):
                ok = bool(hook.sched_health())
                return protocol.Done(req=msg.req, ok=ok, error="" if ok else "plugin reports unhealthy",
                                     applied_seq=self.stream.applied)
        except Exception as exc:
            self.stream.errors += 1
            report_error(type(msg).__name__, exc)
            req = getattr(msg, "req", None)
            if isinstance(msg, protocol.PickNext):
                return protocol.Picked(req=msg.req, job_id=None, applied_seq=self.stream.applied)
            if req is not None:
                return protocol.Done(req=req, ok=False, error=f"{type(exc).__name__}: {exc}",
                                     applied_seq=self.stream.applied)
        return None
