"""The kernel process: ``python -m kernel --home DIR``.

Boots the system (reincarnation server, services, workers, tasks), serves the control
channel, and runs the loop until ``lugh down`` or SIGTERM. Only one kernel runs per
home: the runtime directory's lock file says which.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import signal
import sys
from pathlib import Path

import msgspec

from kernel import control, paths, realtime
from kernel.core import Kernel, Options
from kernel.workload import grid_tasks
from lugh_sdk.api.types import Task


def load_tasks(home: Path, workload: str) -> list[Task]:
    saved = home / "state" / "tasks.json"
    if saved.exists():
        return msgspec.json.decode(saved.read_bytes(), type=list[Task])
    return grid_tasks() if workload == "grid" else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kernel")
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--workload", choices=["grid", "none"], default="grid")
    parser.add_argument("--heartbeat", type=float, default=0.1)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--memory-budget", type=int, default=Options.memory_budget)
    parser.add_argument("--dispatch-batch", type=int, default=Options.dispatch_batch, choices=range(1, 65),
                        metavar="1..64", help="scheduler decisions per answer (the dispatch queue, kernel/core.py)")
    parser.add_argument("--slots", type=int, default=Options.slots,
                        help="jobs running at once (dispatch slots; at most --workers, and more workers than slots "
                             "leave room for preemption)")
    parser.add_argument("--no-spare", dest="spare", action="store_false",
                        help="no pre-imported spare host: every restart starts a new interpreter")
    parser.add_argument("--rt-priority", type=int, default=Options.rt_priority,
                        help="SCHED_FIFO priority of the kernel (3-99, e.g. 20; its scheduler service runs one "
                             "below, workers at 1); 0, the default: the normal policy (kernel/realtime.py)")
    parser.add_argument("--listen", default=None, help="also serve control on tls+tcp://HOST:PORT (kernel/remote.py)")
    parser.add_argument("--tls-dir", type=Path, default=None, help="ca.pem, server.pem, server.key for --listen")
    args = parser.parse_args(argv)
    try:
        options = Options(heartbeat=args.heartbeat, workers=args.workers, memory_budget=args.memory_budget,
                          dispatch_batch=args.dispatch_batch, slots=args.slots, spare=args.spare,
                          rt_priority=args.rt_priority)
    except ValueError as exc:
        parser.error(str(exc))
    home = args.home.resolve()
    run_dir = paths.run_dir(home)
    lock = open(run_dir / "kernel.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"a kernel is already running for {home}", file=sys.stderr)
        return paths.EXIT_ALREADY_RUNNING
    paths.clear_stale(run_dir)
    # First, before any socket: NNG's threads, started at the first one, inherit the policy.
    if options.rt_priority and (refused := realtime.apply(0, options.rt_priority)):
        print(f"kernel: running at the normal CPU policy: {refused}", file=sys.stderr, flush=True)
    kernel = Kernel(home, run_dir, options)
    stop = lambda *_: kernel.call(setattr, kernel, "stopping", True)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server = control.ControlServer(kernel, run_dir)
    remote = None
    if args.listen:
        from kernel.remote import RemoteControlServer

        remote = RemoteControlServer(kernel, args.listen, args.tls_dir or home / "tls")
    try:
        kernel.boot(load_tasks(home, args.workload))
        (run_dir / "kernel.pid").write_text(json.dumps({"pid": os.getpid()}))
        print(f"kernel {os.getpid()} up, control at {paths.control_address(run_dir)}"
              + (f" and {args.listen}" if args.listen else ""), flush=True)
        kernel.run()
    finally:
        server.close()
        if remote is not None:
            remote.close()
        (run_dir / "kernel.pid").unlink(missing_ok=True)
        paths.clear_stale(run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
