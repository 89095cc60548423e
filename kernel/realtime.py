"""Real-time CPU scheduling: the dispatch path and the jobs above everything else.

Every release waits on the kernel's loop, every start on the kernel and the scheduler
service, and every job on its worker. Under Linux's normal policy (SCHED_OTHER) they
share the CPUs fairly with every other process, so a release or a start can wait
milliseconds behind whatever else is runnable: a flood of messages, a monitor, storage.
As real-time applications on Linux do, they run under SCHED_FIFO instead, which takes a
CPU from any normal task the moment it has work:

- the kernel at priority N (``--rt-priority N``, 3-99; ``DEFAULT_PRIORITY`` is the one
  to use), all its threads;
- the scheduler service at N - 1;
- the workers at 1, the lowest real-time priority: above every normal task, below the
  dispatch path, so the kernel and its scheduler always get the CPU from a job they are
  about to preempt. The jobs are the real-time work; which of them runs is the kernel's
  decision (it stops a preempted worker with a signal), not the OS's.

Everything else stays at the normal policy: storage, monitors, the reincarnation server,
the spare host, clients. A job that runs away at priority 1 is killed by the kernel
(kernel/core.py: past max(2 s, 20 x budget)), and Linux keeps about 5 % of every CPU
for normal tasks (``/proc/sys/kernel/sched_rt_runtime_us``, or the fair server of recent
kernels), which bounds what a job or a kernel gone wrong takes, though not every way it
can stall others (below); with as many slots as CPUs, normal tasks may get little more
than that while every slot runs a long job. The supervisor does not take a
service starved that way for hung (it discounts run-queue waiting, kernel/supervisor.py).

It is off unless asked for (``--rt-priority 0``, the default), for two reasons seen on a
2-CPU machine:

- a kernel saturated by its own work starves every normal-policy service: under `lugh
  chaos` with the grid workload (tests/test_chaos.py) the kernel's loop ran at 100 % of
  a CPU and the storage service was restarted until its restart limit gave it up;
- a livelock in Linux itself: reaping a child (``wait4`` -> ``release_task``) drops its
  ``/proc`` entries, and ``shrink_dcache_parent`` spins until every reader of them lets
  go. A real-time kernel spinning there, with the other CPU held by real-time work, never
  lets the normal-policy reader run (priority inversion). Three real-time kernels and
  their workers on 2 CPUs, with ``ps`` reading ``/proc``, stayed in that state for minutes,
  SIGKILL pending, until their policy was lowered by hand (``chrt -o -p 0``). Since then
  a real-time thread never reaps: :class:`kernel.processes._Popen` hands a wait that may
  reap to a thread at the normal policy. That livelock is no longer possible from the
  kernel's own waits; no real-time run long enough to show the fix in practice has
  been made since.

A real-time configuration is for a machine sized for it (more CPUs than real-time
slots), with the services it relies on checked under load there.

A thread inherits its creator's policy, and a process its parent's across fork and
exec. So the kernel applies its policy first thing, before NNG starts its threads (at
the first socket), and all its threads share it; :func:`kernel.processes.spawn` then
sets each child's policy explicitly, before the interpreter it execs has started any
thread of its own. ``DEFAULT_PRIORITY``, 20, stays below the threaded interrupt
handlers of a PREEMPT_RT kernel (50). Raising the policy needs CAP_SYS_NICE or an RLIMIT_RTPRIO
allowance: without it everything runs at the normal policy and `lugh status` says why.
"""

from __future__ import annotations

import os

DEFAULT_PRIORITY = 20
MIN_PRIORITY = 3  # the kernel's, when not 0: room for the scheduler service and the workers below it
MAX_PRIORITY = 99
WORKER_PRIORITY = 1


def child_priority(kernel_priority: int, kind: str) -> int:
    """The priority of a child of ``kind`` under a kernel at ``kernel_priority`` (0: the
    normal policy, for everything)."""
    if not kernel_priority:
        return 0
    return {"scheduler": kernel_priority - 1, "worker": WORKER_PRIORITY}.get(kind, 0)


def apply(pid: int, priority: int) -> str:
    """Put ``pid`` (0: the calling thread; otherwise a process's main thread) under
    SCHED_FIFO at ``priority``, or for 0 under the normal policy. Returns '' or why not."""
    try:
        if priority:
            os.sched_setscheduler(pid, os.SCHED_FIFO, os.sched_param(priority))
        else:
            os.sched_setscheduler(pid, os.SCHED_OTHER, os.sched_param(0))
    except ProcessLookupError:
        return "the process has exited"
    except OSError as exc:
        return f"SCHED_FIFO {priority} refused: {exc.strerror} (needs CAP_SYS_NICE or RLIMIT_RTPRIO >= {priority})"
    return ""


def describe(pid: int) -> dict:
    """The policy and priority ``pid``'s main thread runs under."""
    try:
        policy, priority = os.sched_getscheduler(pid), os.sched_getparam(pid).sched_priority
    except ProcessLookupError:
        return {"policy": "gone", "priority": 0}
    names = {os.SCHED_FIFO: "fifo", os.SCHED_RR: "rr", os.SCHED_OTHER: "other"}
    return {"policy": names.get(policy & ~getattr(os, "SCHED_RESET_ON_FORK", 0), str(policy)), "priority": priority}
