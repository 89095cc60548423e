"""Real-time CPU scheduling for the dispatch path: the kernel and its scheduler service.

Every release waits on the kernel's loop and every start on the kernel and the
scheduler service. Under Linux's normal policy (SCHED_OTHER) they share the CPUs fairly
with the jobs themselves and with whatever floods the lanes, so a release can wait
milliseconds behind a worker spinning through its budget. As real-time applications on
Linux do, the kernel runs under SCHED_FIFO: it takes a CPU from any normal task the
moment it has work, and sleeps otherwise. The scheduler service runs one priority below
it. Everything else stays at the normal policy: workers (the jobs' own CPU time is what
the schedule divides among tasks, and a job spinning at a real-time priority would
starve the monitors that watch it), storage, monitors, the reincarnation server and
clients.

A thread inherits its creator's policy, and a process its parent's across fork and
exec. So the kernel applies its policy first thing, before NNG starts its threads (at
the first socket), and all its threads share it; :func:`kernel.processes.spawn` then
sets each child's policy explicitly, before the interpreter it execs has started any
thread of its own.

Linux keeps 5 % of every CPU for normal tasks (``/proc/sys/kernel/sched_rt_runtime_us``),
so a kernel gone wrong cannot lock the machine up. The default priority, 20, stays
below the threaded interrupt handlers of a PREEMPT_RT kernel (50). Raising the policy
needs CAP_SYS_NICE or an RLIMIT_RTPRIO allowance: without it the kernel runs at the
normal policy and `lugh status` says why.
"""

from __future__ import annotations

import os

DEFAULT_PRIORITY = 20
MAX_PRIORITY = 99


def service_priority(kernel_priority: int) -> int:
    """The scheduler service's priority under a kernel at ``kernel_priority`` (0: normal)."""
    return max(1, kernel_priority - 1) if kernel_priority else 0


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
