"""The kernel: one loop over messages, releases and timers.

The loop (one thread) owns every piece of kernel state. Other threads (the control
channel, a live swap) never touch that state: they hand a function to the loop with
:meth:`Kernel.call` and wait for its result.

Each pass of the loop:
1. releases the jobs that are due on the monotonic clock;
2. drains the HIGH lane completely, then handles MEDIUM and LOW messages one at a time,
   looking at HIGH again after each (so a LOW flood never delays HIGH traffic);
3. runs calls from other threads, then the watchdogs.

Inbound MEDIUM and LOW messages wait in bounded queues (``LANE_CAP``); past the bound
the newest is dropped, counted, and a request among them is answered with an error.
HIGH is never dropped.

Dispatching: ``Options.slots`` jobs run at once (one dispatch slot by default, as on a
uniprocessor; on a multi-core machine more slots make the schedule a global one, as
Linux's SCHED_DEADLINE does across a root domain). The scheduler service is asked for
every decision: "what runs now" while a slot is free, "does anything preempt" when a job
is released while every slot is busy. Except one with a single answer: a slot free, a
worker idle and exactly one ready job that may start; that job starts at once
(``_start_sole_ready``). While the scheduler cannot answer (swapping,
restarting, stalled past ``PICK_TIMEOUT``) the kernel's fallback policy (EDF, see
:mod:`kernel.tasks`) decides, so dispatching never stops. A scheduler silent for
``EJECT_AFTER`` is killed (ejected); the reincarnation server restarts it.

Dispatch queue (``Options.dispatch_batch`` > 1, as sched_ext's local dispatch queues):
the scheduler decides up to that many jobs in one answer, and the kernel asks for the
next batch while a job runs. Decided jobs go at once to the running job's worker, which
keeps them in its deck (its inbound socket: a batch of RunJobs in one NNG message) and
starts each the moment the one before it ends, with no kernel round trip; the worker
reports the completions of short jobs together, each with the instant it finished
(``JobDone.finished``), so the kernel handles a deck in one pass. Decided jobs are
committed: they start in the scheduler's order, and a job released meanwhile waits
behind at most ``2 x dispatch_batch - 1`` of them (the next batch is asked for while
fewer than ``dispatch_batch`` wait in the deck), unless it preempts the running job
(every release is still put to the scheduler). A preemption stops the worker with its
deck, which continues after the preempted job when that one is resumed. With 1 (the
default) every start is asked for. The dispatch queue needs a single slot (its
committed order is one slot's order).

With several slots, a release while every slot is busy asks about the running jobs
least urgent first by the kernel's own order (latest deadline); the scheduler service
puts the question to its plugin about each in turn, and the first job the plugin says
must preempt one takes that one's slot. A preempted job keeps its worker (stopped), so
a preemption needs an idle worker: run more workers than slots.
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import os
import platform
import queue
import secrets
import selectors
import signal
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pynng

from kernel import KERNEL_VERSION, ipc, plugin_store, processes, protocol, realtime, supervisor
from kernel.background import Background
from kernel.journal import Journal, unfinished, write_atomically
from kernel.memory import RegionTable
from kernel.protocol import Lane
from kernel.tasks import JobRecord, TaskTable, fallback_key
from kernel.timer import ReleaseTimer
from lugh_sdk.api.types import Job, SchedulerState, Task

LANE_CAP = 20_000
HIGH_FLUSH_EVERY = 32  # HIGH messages handled between two flushes in one long drain
# MEDIUM and LOW may take at most BULK_SHARE of the loop's time in each BULK_WINDOW; past
# that the loop leaves them in NNG (their senders' non-blocking sends are refused:
# backpressure) and sleeps to the window's end unless HIGH traffic or a timer wakes it.
# A flood then cannot keep the kernel on a CPU: on a small machine the HIGH senders,
# NNG's threads and this loop find one at once (HIGH p99 under a LOW flood, bench/lanes.py).
BULK_SHARE = 0.5
BULK_WINDOW = 0.005
PICK_TIMEOUT = 0.02
EJECT_AFTER = float(os.environ.get("LUGH_EJECT_AFTER", "0.5"))  # a QEMU/TCG target sets more (lugh_sdk/qemu.py)
WORKERS = 3
WATCH_PERIOD = 0.005  # seconds between two looks at every process, unless one is due sooner
JOB_KILL_FLOOR = 2.0  # a job running longer than max(this, 20 x budget) has its worker killed
PLUGIN_KINDS = ("scheduler", "storage", "monitor")
SPARE_AFTER_BOOT = 1.0  # the first spare host waits until the boot's own imports are done
DEFAULT_PLUGINS = {"scheduler": "round-robin-scheduler", "storage": "sqlite-storage", "monitor": "heartbeat-monitor"}
DEFAULT_BUDGET = 768 * 1024 * 1024


@dataclass
class Options:
    heartbeat: float = 0.1
    # hang tolerance, restart policy, standby: per service in kernel/supervision.py
    workers: int = WORKERS
    memory_budget: int = DEFAULT_BUDGET
    dispatch_batch: int = 1  # decisions per scheduler answer (the dispatch queue, see above)
    slots: int = 1  # jobs running at once (see above)
    spare: bool = True  # keep a pre-imported host interpreter for restarts (kernel/processes.py, Spare)
    rt_priority: int = 0  # SCHED_FIFO for the kernel, scheduler service, workers; 0: none (kernel/realtime.py)

    def __post_init__(self) -> None:
        if not 1 <= self.slots <= max(1, self.workers):  # no workers (storage-only tests): nothing dispatches
            raise ValueError(f"slots must be between 1 and the number of workers ({self.workers}), not {self.slots}")
        if self.slots > 1 and self.dispatch_batch > 1:
            raise ValueError("the dispatch queue (dispatch_batch > 1) needs a single slot")
        if self.rt_priority and not realtime.MIN_PRIORITY <= self.rt_priority <= realtime.MAX_PRIORITY:
            raise ValueError(f"rt_priority must be 0 (the normal policy) or between {realtime.MIN_PRIORITY} and "
                             f"{realtime.MAX_PRIORITY}, not {self.rt_priority}")


@dataclass
class Instance:
    """One process: an incarnation of a service, or a worker."""
    peer: str
    service: "Service"
    child: processes.Child | None  # None for an attached client: not ours to supervise
    outbox: ipc.Outbox
    token: str
    lanes: set = field(default_factory=set)
    plugin: str = ""
    plugin_version: str = ""
    last_beat: float = 0.0
    applied: int = 0
    lost: int = 0
    errors: int = 0
    job: str | None = None  # workers: the job it holds (running or preempted)
    deck: collections.deque = field(default_factory=collections.deque)  # workers: jobs sent to start after ``job``
    stopped: bool = False   # workers: preempted (protocol.PREEMPT_SIGNAL), until SIGCONT
    ready_future: Future = field(default_factory=Future)
    # supervision (kernel/supervisor.py)
    marks: tuple = (0.0, 0.0)  # CPU-wait clocks (kernel, peer) at its last sign of life (Supervisor.mark)
    marked_at: float = -math.inf  # when they were read
    kill_reason: str = ""  # why the kernel killed it (hang, ejection...): its exit reports this
    retiring: float = 0.0  # an operator restart began then: its exit is not a failure
    promoting: float = 0.0  # a hot standby taking over since then
    spec: tuple = ()  # a standby: what it was started for (plugin, data directory)
    stopped_at: float = 0.0  # workers: preempted since
    paused: float = 0.0  # workers: time the current job spent preempted (not running)

    @property
    def connected(self) -> bool:
        return len(self.lanes) == 3


@dataclass
class Service:
    name: str
    kind: str  # scheduler, storage, monitor, rs, worker
    plugin: str = ""
    incarnations: int = 0
    restarts: int = 0
    active: Instance | None = None
    started: float = 0.0
    last_failure: str = ""
    failed: bool = False
    seq: int = 0
    replay: collections.deque = field(default_factory=collections.deque)
    replay_lost: int = 0
    held: bool = False  # quiesced by a swap: stream messages wait in the replay log
    # Storage swap, health window: the replay log keeps everything after this seq (the
    # old instance's position, for a rollback), and the new instance's answers to stream
    # requests wait here until the swap commits (sent) or rolls back (dropped: the old
    # instance applies the requests again and answers them itself).
    replay_floor: int | None = None
    held_acks: list | None = None
    # A live swap past its redirect: the old instance, still running. If the new one dies
    # now, the swap rolls back to it; the reincarnation server is not asked to restart.
    swap_fallback: Instance | None = None
    # supervision (kernel/supervisor.py)
    failures: int = 0
    last_peer: str = ""  # the incarnation that failed last (a restart answers it)
    standby: Instance | None = None  # the hot standby, when configured
    safe_mode: str = ""  # what the kernel does instead, once the RS has given up
    buffer_dropped: int = 0  # MEDIUM/LOW stream messages refused while the replay log was full
    times: dict = field(default_factory=dict)  # the last recovery: down, hang seen, serving again


class Kernel:
    def __init__(self, home: Path, run_dir: Path, options: Options | None = None):
        self.home = home
        self.run_dir = run_dir
        self.state_dir = home / "state"
        self.options = options or Options()
        # The policy this process runs under, as its entry module set it: its scheduler
        # service and workers run below it (kernel/realtime.py).
        cpu = realtime.describe(0)
        self.rt_priority = cpu["priority"] if cpu["policy"] == "fifo" else 0
        self.started = time.monotonic()
        self.journal = Journal(self.state_dir / "journal.log")
        self.table = TaskTable()
        self.regions = RegionTable(f"lugh{os.getpid()}")
        self.sel = selectors.DefaultSelector()
        self.inbox = ipc.Inbox(run_dir)
        self.closer = Background("socket-closer")  # a departed peer's sockets, closed off the loop thread
        for lane, fd in self.inbox.fds().items():
            self.sel.register(fd, selectors.EVENT_READ, ("lane", lane))
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        # The next job release wakes the loop through a timerfd (kernel/timer.py): a
        # selector timeout would be rounded up to a whole millisecond.
        self.release_timer = ReleaseTimer.create()
        if self.release_timer is not None:
            self.sel.register(self.release_timer, selectors.EVENT_READ, ("release", None))
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self.pipes: dict[int, Instance] = {}
        # Pipes of instances that exited: the kernel sees an exit (pidfd) before it has
        # read everything the process sent, and a storage answer sent just before a
        # crash is still an answer (the data is committed). Only KvResults count.
        self.departed: collections.OrderedDict[int, Instance] = collections.OrderedDict()
        self.instances: dict[str, Instance] = {}
        self.watch_at = 0.0  # the next look at every process (_watchdogs)
        self.unflushed: set[ipc.Outbox] = set()  # outboxes holding messages not yet handed to NNG (_flush)
        self.services: dict[str, Service] = {}
        self.clients: dict[str, Service] = {}
        self._clients = 0
        self.queues = {Lane.MEDIUM: collections.deque(), Lane.LOW: collections.deque()}
        self.bulk_window_end = 0.0
        self.bulk_used = 0.0  # loop time spent on MEDIUM and LOW in the current window
        self.bulk_paused = False  # their sockets out of the selector until the window ends
        self.counters = collections.Counter()
        self.lane_drops = {lane: 0 for lane in ipc.LANES}
        self.lane_handled = {lane: 0 for lane in ipc.LANES}
        self.handled_seq = 0  # order in which messages were handled, for the lane tests
        self.requests: dict[int, tuple[Future, Instance | None]] = {}
        self._req = 0
        self.running: set[str] = set()  # jobs on a worker now (at most Options.slots)
        self.pick_req: int | None = None
        self.pick_sent = 0.0
        self.pick_dirty = False
        self.pick_late = False  # the pick is past PICK_TIMEOUT: the fallback decides until it is answered
        self.pick_for: tuple[str, ...] = ()  # the running jobs the pick asks about (none: "what runs now")
        self.decked: set[str] = set()  # decided, sent to a worker's deck, not started (Instance.deck)
        self.fallback_only = False  # set while a swap has quiesced the scheduler
        self.swapping: str | None = None  # id of the swap in progress
        self.swap_marks = (0.0, {}, 0)
        self.wait_start: float | None = None  # a job ready and a slot free since
        # A dispatch wait is the scheduler's deliberation (a PickNext in flight, at most
        # PICK_TIMEOUT) plus the rest, the *stall*: no one was deciding, the kernel
        # itself held the job back (its loop busy or blocked, e.g. by a swap step).
        self.wait_decided = 0.0  # deliberation within the current wait
        self.pick_open = False  # a PickNext that dispatching waits for (sent, not answered, not late)
        self.gaps = collections.deque(maxlen=4096)  # (dispatched at, wait, stall)
        self.max_gap = 0.0
        self.last_dispatch: float | None = None
        self.intervals = collections.deque(maxlen=4096)  # (dispatched at, time since the previous dispatch)
        self.stopping = False
        self.boot_tasks: list[Task] | None = None
        self.stopped = threading.Event()
        self.config = self._load_config()
        self.sup = supervisor.Supervisor(self)  # detection and mechanism of the reincarnation server
        # A pre-imported host interpreter: a restart, standby or swap of a plugin service
        # takes it instead of starting Python and importing (kernel/processes.py, Spare).
        self.spare = processes.Spare("kernel.services.host", run_dir, self._child_env, self.options.memory_budget)
        self.spare.due = time.monotonic() + SPARE_AFTER_BOOT

    # ---------------------------------------------------------------- boot & shutdown

    def _load_config(self) -> dict:
        path = self.state_dir / "services.json"
        config = {"plugins": dict(DEFAULT_PLUGINS), "op_seq": 0}
        if path.exists():
            config.update(json.loads(path.read_text()))
        return config

    def save_config(self) -> None:
        write_atomically(self.state_dir / "services.json", json.dumps(self.config, indent=2).encode())

    def recover(self) -> None:
        """Resolve operations a crash left open: a swap never committed is reverted
        (the active configuration was never changed), a committed one whose
        configuration write was lost is rolled forward."""
        records = self.journal.records()
        for rec in unfinished(records, "swap"):
            self.journal.append("swap.rollback", id=rec["data"]["id"], service=rec["data"]["service"],
                                reason="not committed when the kernel stopped; reverted at boot")
        for rec in records:
            if rec["op"] in ("swap.commit", supervisor.ROLLBACK_OP) and rec["seq"] > self.config["op_seq"]:
                self.config["plugins"][rec["data"]["service"]] = rec["data"]["to"]
                self.config["op_seq"] = rec["seq"]
                if "data_dir" in rec["data"]:  # a storage swap handed the data set to a new directory
                    self.config.setdefault("data_dirs", {})[rec["data"]["service"]] = rec["data"]["data_dir"]
                self.journal.append("swap.rollforward", id=rec["data"]["id"], service=rec["data"]["service"],
                                    to=rec["data"]["to"])
                self.save_config()
        from kernel.swap import prune_data_dirs

        prune_data_dirs(self)
        from kernel import install

        install.recover(self.home, self.journal)  # after the swaps: an install whose swap committed rolls forward

    def data_dir(self, name: str) -> Path:
        """A service's data directory: ``data/<name>``, or the one a live swap of its
        plugin handed the data set to."""
        return self.home / "data" / self.config.get("data_dirs", {}).get(name, name)

    def boot(self, tasks: list[Task]) -> None:
        self.recover()
        for name in ("rs", *PLUGIN_KINDS):
            kind = name
            self.services[name] = Service(name=name, kind=kind, plugin=self.config["plugins"].get(name, ""))
        for i in range(self.options.workers):
            self.services[f"w{i}"] = Service(name=f"w{i}", kind="worker")
        for service in self.services.values():
            self.start_instance(service, activate=True)
        self.boot_tasks = tasks  # released once every service is up (see _on_connected)

    def start_instance(self, service: Service, *, plugin: str | None = None, activate: bool,
                       data_dir: Path | None = None, standby: bool = False) -> Instance:
        """Spawn a new process for ``service``. Must run on the loop thread (the
        spawning thread is the one PR_SET_PDEATHSIG watches)."""
        service.incarnations += 1
        peer = f"{service.name}-{service.incarnations}"
        plugin = plugin or service.plugin
        outbox = self._outbox(peer)
        token = secrets.token_hex(16)
        args = ["--peer", peer, *self.sup.spawn_args(service, standby)]
        if service.kind in PLUGIN_KINDS:
            module = "kernel.services.host"
            try:
                plugin_dir = plugin_store.locate(self.home, plugin)
            except plugin_store.PluginError:
                outbox.close()
                raise
            args += ["--kind", service.kind, "--plugin-dir", str(plugin_dir),
                     "--data-dir", str(data_dir or self.data_dir(service.name))]
        else:
            module = {"rs": "kernel.services.rs", "worker": "kernel.services.worker"}[service.kind]
        log_path, now = self.run_dir / f"{peer}.log", time.monotonic()
        rt_priority = realtime.child_priority(self.rt_priority, service.kind)  # kernel/realtime.py
        child = module == self.spare.module and self.spare.take(peer, args, env={"LUGH_TOKEN": token},
                                                                  log_path=log_path, started=now,
                                                                  rt_priority=rt_priority)
        if child:
            self.counters["spare_taken"] += 1
        else:
            child = processes.spawn(peer, module, args, env=dict(self._child_env(), LUGH_TOKEN=token),
                                    log_path=log_path, memory_budget=self.options.memory_budget, started=now,
                                    rt_priority=rt_priority)
        inst = Instance(peer=peer, service=service, child=child, outbox=outbox, token=token,
                        last_beat=time.monotonic())
        self.sup.mark(inst)
        self.instances[peer] = inst
        self.sel.register(child.pidfd, selectors.EVENT_READ, ("exit", inst))
        if activate:
            service.active = inst
            service.started = time.monotonic()
        return inst

    def _outbox(self, peer: str) -> ipc.Outbox:
        return ipc.Outbox(self.run_dir, peer, cap=LANE_CAP, dirty=self.unflushed)

    def _child_env(self) -> dict[str, str]:
        """The environment of every child, less its own token."""
        return dict(os.environ, LUGH_RUN_DIR=str(self.run_dir), LUGH_PARENT_PID=str(os.getpid()),
                    MALLOC_ARENA_MAX="2", PYTHONDONTWRITEBYTECODE="1")

    def attach_client(self, name: str) -> dict:
        self._clients += 1
        service = Service(name=f"c{self._clients}{name}"[:24], kind="client")
        peer = service.name
        inst = Instance(peer=peer, service=service, child=None, outbox=self._outbox(peer),
                        token=secrets.token_hex(16), last_beat=time.monotonic())
        service.active = inst
        self.clients[peer] = service
        self.instances[peer] = inst
        return {"peer": peer, "token": inst.token, "run_dir": str(self.run_dir)}

    def detach_client(self, peer: str) -> Future:
        """Forget a client; the future is done when its sockets are closed and its
        endpoints removed (off the loop thread: the caller waits for it, not the loop)."""
        service = self.clients.pop(peer, None)
        if service is None:
            raise KeyError(peer)
        return self._forget(service.active)

    def shutdown(self) -> None:
        self.stopping = True
        for inst in list(self.instances.values()):
            inst.outbox.discard()
            try:
                inst.outbox.socks[Lane.HIGH].send(protocol.encode(protocol.Stop()), block=False)
            except pynng.NNGException:
                pass
        deadline = time.monotonic() + 3.0
        for inst in list(self.instances.values()):
            if inst.child is None:
                self._forget(inst)
                continue
            if inst.stopped:
                processes.kill(inst.child, signal.SIGCONT)
            try:
                inst.child.popen.wait(max(0.05, deadline - time.monotonic()))
            except Exception:
                pass
            processes.stop(inst.child, timeout=1.0)
            self._forget(inst)
        self.spare.close()
        self.regions.clear()
        self.closer.stop()
        self.inbox.close()
        self.sup.close()
        self.journal.close()

    # ---------------------------------------------------------------- the loop

    def call(self, fn, *args) -> Future:
        """Run ``fn(*args)`` on the loop thread; the future holds its result."""
        fut: Future = Future()
        self._calls.put((fn, args, fut))
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass
        return fut

    def run(self) -> None:
        try:
            while not self.stopping:
                now = time.monotonic()
                release = self.table.next_release()
                if self.release_timer is not None:
                    self.release_timer.arm(release)
                    release = now + 0.05
                timeout = max(0.0, min(release, now + 0.05, self.sup.wake_at) - now)
                if self.pick_req is not None:  # wake when the pick is late, then when it is due for ejection
                    due = self.pick_sent + (EJECT_AFTER if self.pick_late else PICK_TIMEOUT)
                    timeout = min(timeout, max(0.005 if self.pick_late else 0.0, due - now))
                if self.bulk_paused:
                    timeout = min(timeout, max(0.0, self.bulk_window_end - now))
                for key, _ in self.sel.select(timeout):
                    what, obj = key.data
                    if what == "exit":
                        self._on_exit(obj)
                    elif what == "wake":
                        try:
                            os.read(self._wake_r, 4096)
                        except BlockingIOError:
                            pass
                    elif what == "release":
                        self.release_timer.clear()
                self._pump()
        finally:
            self.shutdown()
            self.stopped.set()

    def _pump(self) -> None:
        self._release_due()
        self._drain_high()
        self._flush()
        now = time.monotonic()
        if now >= self.bulk_window_end:
            self.bulk_window_end, self.bulk_used = now + BULK_WINDOW, 0.0
            self._pause_bulk(False)
        for _ in range(2048):  # bounded, so calls and watchdogs below get their turn
            if self.bulk_used >= BULK_SHARE * BULK_WINDOW:
                self._pause_bulk(True)
                break
            self._fill(Lane.MEDIUM)
            self._fill(Lane.LOW)
            lane = Lane.MEDIUM if self.queues[Lane.MEDIUM] else Lane.LOW if self.queues[Lane.LOW] else None
            if lane is None:
                break
            self._handle(lane, *self.queues[lane].popleft())
            self._drain_high()
            self._release_due()
            self._flush()
            self.bulk_used += time.monotonic() - now
            now = time.monotonic()
        while not self._calls.empty():
            fn, args, fut = self._calls.get()
            try:
                result = fn(*args)
            except BaseException as exc:
                fut.set_exception(exc)
            else:
                fut.set_result(result)
        self._watchdogs(time.monotonic())
        self._flush()

    def _flush(self) -> None:
        """Hand what the last steps queued to NNG, one batch per peer and lane. An
        outbox that cannot send it all (its peer's socket full, or held by a swap)
        stays in the set and is tried again at every flush."""
        for outbox in list(self.unflushed):
            if outbox.flush():
                self.unflushed.discard(outbox)

    def _pause_bulk(self, paused: bool) -> None:
        if paused != self.bulk_paused:
            self.bulk_paused = paused
            self.counters["bulk_paused"] += paused
            for lane, fd in self.inbox.fds().items():
                if lane is not Lane.HIGH:
                    if paused:
                        self.sel.unregister(fd)
                    else:
                        self.sel.register(fd, selectors.EVENT_READ, ("lane", lane))

    def _drain_high(self) -> None:
        for n in itertools.count(1):
            msg = self.inbox.recv(Lane.HIGH)
            if msg is None:
                return
            self._handle(Lane.HIGH, msg.bytes, msg.pipe.id)
            if n % HIGH_FLUSH_EVERY == 0:  # a long burst: the first answers do not wait for the last
                self._flush()

    def _fill(self, lane: Lane) -> None:
        q = self.queues[lane]
        for _ in range(256):
            msg = self.inbox.recv(lane)
            if msg is None:
                return
            if len(q) >= LANE_CAP:
                self.lane_drops[lane] += 1
                self._refuse_dropped(msg.bytes, msg.pipe.id)
                continue
            q.append((msg.bytes, msg.pipe.id))

    def _refuse_dropped(self, data: bytes, pipe: int) -> None:
        inst = self.pipes.get(pipe)
        for msg in protocol.unpack(data)[0] if inst else ():
            if isinstance(msg, protocol.KV_REQUESTS):
                self._send(inst, protocol.KvResult(req=msg.req, ok=False, error="dropped: kernel lane queue full"),
                           Lane.LOW)

    # ---------------------------------------------------------------- messages

    def _handle(self, lane: Lane, data: bytes, pipe: int) -> None:
        """One NNG message from a peer: its messages in order (a batch carries several)."""
        if len(data) > protocol.MAX_MESSAGE_BYTES:  # refused even if it would decode
            msgs, bad, kind = [], 1, "bad_oversized"
        else:
            (msgs, bad), kind = protocol.unpack(data), "bad_schema"
        if bad:
            self.counters["bad_messages"] += bad
            self.counters[kind] += bad
        for msg in msgs:
            self._handle_one(lane, msg, pipe)

    def _handle_one(self, lane: Lane, msg, pipe: int) -> None:
        inst = self.pipes.get(pipe)
        if isinstance(msg, protocol.Hello):
            self._on_hello(msg, pipe, lane)
            return
        if inst is None and isinstance(msg, protocol.KvResult):
            inst = self.departed.get(pipe)
        if inst is None:
            self.counters["unauthenticated"] += 1
            return
        self.handled_seq += 1
        self.lane_handled[lane] += 1
        handler = self._handlers.get(type(msg))
        if handler is None:
            self.counters["unexpected_messages"] += 1
            return
        try:
            handler(self, inst, msg, lane)
        except Exception as exc:  # a peer's message must never take the kernel down
            self.counters["handler_errors"] += 1
            print(f"kernel: error handling {type(msg).__name__} from {inst.peer}: {exc!r}", file=sys.stderr)

    def _on_hello(self, msg: protocol.Hello, pipe: int, lane: Lane) -> None:
        inst = self.instances.get(msg.peer)
        if inst is None or not secrets.compare_digest(inst.token, msg.token) or lane in inst.lanes:
            self.counters["unauthenticated"] += 1
            return
        inst.lanes.add(lane)
        self.pipes[pipe] = inst
        inst.plugin, inst.plugin_version = msg.plugin, msg.plugin_version
        inst.applied = msg.applied_seq
        self.sup.mark(inst)
        if inst.connected:
            self._on_connected(inst)

    def _on_connected(self, inst: Instance) -> None:
        service = inst.service
        if not inst.ready_future.done():
            inst.ready_future.set_result(inst)
        if service.active is not inst:
            return  # a swap candidate: the swap decides what it gets
        self._resume(service, inst)
        if self.boot_tasks is not None and all(s.active and s.active.connected for s in self.services.values()):
            tasks, self.boot_tasks = self.boot_tasks, None
            now = time.monotonic()
            for task in tasks:
                self.add_task(task, now)

    def _resume(self, service: Service, inst: Instance) -> None:
        """Bring an active instance up to date: a scheduler gets the kernel's truth, any
        other service the stream messages it has not applied."""
        if service.kind == "scheduler":
            self._sync_scheduler(inst)
        elif service.kind == "rs":
            self.sup.resume_rs(inst)  # its policy state first, then the events after it
        elif not service.held:  # held: a swap, or storage's safe mode (a read-only incarnation)
            self._replay(service, inst)
        if service.kind == "worker":
            self._want_decision()
        elif service.kind == "scheduler" and self._slot_free() and self._waiting():
            self._want_decision()
        self.sup.resumed(service, inst)

    def _replay(self, service: Service, inst: Instance) -> None:
        for seq, lane, data in service.replay:
            if seq > inst.applied:
                inst.outbox.send(data, lane)
                self.counters["replayed"] += 1

    def _sync_scheduler(self, inst: Instance) -> None:
        """Give a scheduler the kernel's truth (task table, ready jobs); it supersedes
        the stream so far, which the instance has before this on the same lane."""
        self.request(inst, protocol.ImportState(req=0, state=self.truth_state(), applied_seq=inst.service.seq),
                     Lane.HIGH)
        inst.applied = inst.service.seq

    def _on_heartbeat(self, inst, msg, lane):
        self.sup.mark(inst)
        self._ack(inst, msg.applied_seq)
        service = inst.service
        if msg.errors > inst.errors and service.kind == "scheduler" and service.active is inst and not service.held:
            # Its plugin raised in a hook: its queue may lack a job (a release it never
            # took in), which it would then never pick. The kernel's truth restores it.
            self.counters["scheduler_resyncs"] += 1
            self._sync_scheduler(inst)
        inst.lost, inst.errors = msg.lost, msg.errors

    def _ack(self, inst: Instance, applied: int) -> None:
        inst.applied = max(inst.applied, applied)
        service = inst.service
        if service.active is inst:
            keep = inst.applied if service.replay_floor is None else min(inst.applied, service.replay_floor)
            while service.replay and service.replay[0][0] <= keep:
                service.replay.popleft()

    def _on_picked(self, inst, msg, lane):
        inst.last_beat = time.monotonic()
        self._ack(inst, msg.applied_seq)
        if msg.req != self.pick_req or inst.service.active is not inst:
            self.counters["late_decisions"] += 1
            return
        self._pick_closed()
        self.pick_req = None
        dispatched = self.counters["dispatched"]
        if not self.pick_for and self.running and self.options.dispatch_batch > 1:
            if msg.job_id is not None:  # asked ahead while a job runs: the batch joins the deck
                self._deck([msg.job_id, *msg.more])
        else:
            victim = (msg.preempts if msg.preempts in self.pick_for else self.pick_for[0]) if self.pick_for else None
            self._apply_decision(msg.job_id, victim)
            if msg.more:
                self._deck(msg.more)
        # Ask again: for what was released while the question was out (it may preempt),
        # or for the next free slot after a start.
        dirty, self.pick_dirty = self.pick_dirty, False
        if dirty or (self.counters["dispatched"] > dispatched and self._slot_free()):
            self._want_decision(preempt_check=dirty)

    def _on_reply(self, inst, msg, lane):
        if isinstance(msg, (protocol.Done, protocol.Exported, protocol.Handover)):
            self._ack(inst, msg.applied_seq)
        fut, _ = self.requests.pop(msg.req, (None, None))
        if fut is not None and not fut.done():
            fut.set_result(msg)

    def _on_ping(self, inst, msg, lane):
        self._send(inst, protocol.Pong(req=msg.req, payload=msg.payload, order=self.handled_seq), lane)

    def _on_job_done(self, inst, msg, lane):
        if inst.job != msg.job_id:
            self.counters["unexpected_messages"] += 1
            return
        now = time.monotonic()
        finished = min(now, msg.finished) if msg.finished else now  # a deck's completions arrive together
        inst.job = None
        self.sup.mark(inst)  # a sign of life: a worker does not heartbeat while it runs a job
        record = self.table.finish(msg.job_id, finished, msg.ok)
        was_running = msg.job_id in self.running
        self.running.discard(msg.job_id)
        if record is not None:
            self._stream("scheduler", protocol.JobCompleted(seq=0, job=record.job))
        if inst.deck:
            self._next_from_deck(inst, finished, was_running and not inst.stopped)
        elif inst.stopped:
            # It finished just before the kernel stopped it to preempt (the JobDone was
            # in flight): wake it, it holds nothing.
            processes.kill(inst.child, signal.SIGCONT)
            inst.stopped = False
        if self._slot_free() and self._waiting():
            self._mark_waiting(now)
        self._want_decision()
        if record is not None and finished > record.job.deadline:  # after the next question: the monitor can wait
            self._event("monitor", "deadline_miss", job=record.job.id, task=record.job.task,
                        late_ms=round((finished - record.job.deadline) * 1000, 3))

    def _on_kv(self, inst, msg, lane):
        if isinstance(msg, protocol.KvAdmin):
            self._send(inst, protocol.KvResult(req=msg.req, ok=False, error="rollback and compaction are "
                                               "for the control channel (lugh kv)"), lane)
            return
        if any(k.startswith(protocol.RESERVED_KEY_PREFIX) for k in _keys(msg)):
            self._send(inst, protocol.KvResult(req=msg.req, ok=False, error="reserved key"), lane)
            return
        storage = self.services["storage"]
        refusal = self.sup.kv_refusal(storage, msg)  # storage's safe mode: writes refused, reads if possible
        if refusal:
            self._send(inst, protocol.KvResult(req=msg.req, ok=False, error=refusal), lane)
            return
        msg = msgspec.structs.replace(msg, origin=inst.peer)
        if isinstance(msg, protocol.KV_STREAMED):
            self._stream("storage", msg, lane)
        else:
            self.sup.forward(storage, msg, lane)  # a read: to storage, or parked while it restarts

    def _on_kv_result(self, inst, msg, lane):
        self.sup.answered(inst.service, msg)  # a read in flight is done
        held = inst.service.held_acks
        if held is not None and msg.seq and inst.service.active is inst:
            held.append((msg, lane))  # a storage swap's health window (Service.held_acks)
            return
        self.route_kv_result(msg, lane)

    def route_kv_result(self, msg, lane):
        if msg.origin.startswith("ctl:"):
            fut, _ = self.requests.pop(int(msg.origin[4:]), (None, None))
            if fut is not None and not fut.done():
                fut.set_result(msg)
            return
        target = self.instances.get(msg.origin)
        if target is not None:
            self._send(target, msg, lane)
        self.counters["kv_acks" if msg.ok else "kv_errors"] += 1

    def _on_shm_alloc(self, inst, msg, lane):
        try:
            budget = inst.child.memory_budget if inst.child else self.options.memory_budget
            region = self.regions.allocate(inst.peer, msg.size, budget)
            reply = protocol.ShmGranted(req=msg.req, name=region.name, size=region.size)
        except (MemoryError, OSError) as exc:
            reply = protocol.ShmGranted(req=msg.req, error=str(exc))
        self._send(inst, reply, lane)

    def _on_shm_free(self, inst, msg, lane):
        if not self.regions.free(inst.peer, msg.name):
            self.counters["unexpected_messages"] += 1

    def _on_restart(self, inst, msg, lane):
        if inst.service.kind != "rs":
            self.counters["unauthorized"] += 1
            return
        self.sup.on_restart(msg)

    def _on_give_up(self, inst, msg, lane):
        if inst.service.kind != "rs":
            self.counters["unauthorized"] += 1
            return
        self.sup.on_give_up(msg)  # a crash-loop rollback, else the kind's safe mode

    _handlers = {
        protocol.Heartbeat: _on_heartbeat,
        protocol.Picked: _on_picked,
        protocol.Done: _on_reply,
        protocol.Exported: _on_reply,
        protocol.Pong: _on_reply,
        protocol.Ping: _on_ping,
        protocol.MonitorReport: _on_reply,
        protocol.JobDone: _on_job_done,
        protocol.KvPut: _on_kv,
        protocol.KvGet: _on_kv,
        protocol.KvResult: _on_kv_result,
        protocol.KvScan: _on_kv,
        protocol.KvTxn: _on_kv,
        protocol.KvInfo: _on_kv,
        protocol.KvAdmin: _on_kv,
        protocol.Handover: _on_reply,
        protocol.ShmAlloc: _on_shm_alloc,
        protocol.ShmFree: _on_shm_free,
        protocol.Restart: _on_restart,
        protocol.GiveUp: _on_give_up,
        protocol.PolicyState: lambda self, inst, msg, lane: self.sup.on_policy_state(inst, msg),
    }

    # ---------------------------------------------------------------- sending

    def _send(self, inst: Instance, msg, lane: Lane) -> None:
        inst.outbox.send(protocol.encode(msg), lane)

    def _stream(self, name: str, msg, lane: Lane = Lane.HIGH) -> None:
        """Send a stream message to a service: numbered, kept for replay until the
        service has applied it, delivered to whichever instance is active."""
        service = self.services[name]
        if not self.sup.admit(service, msg, lane):  # bounded while down; HIGH is never dropped
            return
        service.seq += 1
        msg = msgspec.structs.replace(msg, seq=service.seq)
        data = protocol.encode(msg)
        service.replay.append((service.seq, lane, data))
        if service.active is not None and service.active.connected and not service.held:
            service.active.outbox.send(data, lane)

    def _event(self, to: str, kind: str, **data) -> None:
        self._stream(to, protocol.Event(kind=kind, at=time.monotonic(), data=data),
                     Lane.HIGH if to == "rs" else Lane.LOW)

    def next_req(self) -> int:
        self._req += 1
        return self._req

    def request(self, inst: Instance, msg, lane: Lane) -> Future:
        """Send a request (its ``req`` is assigned here); the future gets the reply."""
        msg = msgspec.structs.replace(msg, req=self.next_req())
        fut: Future = Future()
        self.requests[msg.req] = (fut, inst)
        self._send(inst, msg, lane)
        return fut

    # ---------------------------------------------------------------- tasks & dispatch

    def add_task(self, task: Task, now: float | None = None) -> None:
        from kernel.services.worker import parse_action

        parse_action(task.action)
        self.table.add(task, time.monotonic() if now is None else now)
        self._stream("scheduler", protocol.TaskAdded(seq=0, task=task))

    def remove_task(self, name: str) -> int:
        dropped = self.table.remove(name)
        self._stream("scheduler", protocol.TaskRemoved(seq=0, name=name))
        return len(dropped)

    def _release_due(self) -> None:
        now = time.monotonic()
        jobs = self.table.release_due(now)
        for job in jobs:
            self._stream("scheduler", protocol.JobReleased(seq=0, job=job))
        if jobs:
            free = self._slot_free()
            if free:
                self._mark_waiting(now)
            busy = self._busy_tasks() if not free else ()
            # A job whose task is on a worker cannot preempt anything: no question for it.
            self._want_decision(preempt_check=not free and any(job.task not in busy for job in jobs))

    def _mark_waiting(self, now: float) -> None:
        if self.wait_start is None:
            self.wait_start = now

    def _slot_free(self) -> bool:
        return len(self.running) < self.options.slots

    def _waiting(self) -> bool:
        """A ready job is off the CPU (queued, or preempted): there is something to start."""
        return len(self.table.ready) > len(self.running) + len(self.decked)

    def _least_urgent_first(self) -> list[Job]:
        """The running jobs, the one a preemption would stop first (latest deadline) first."""
        return sorted((self.table.ready[j].job for j in self.running), key=fallback_key, reverse=True)

    def _on_workers(self) -> list[Job]:
        """The jobs a worker holds, running or preempted."""
        return [self.table.ready[i.job].job for i in self.instances.values() if i.job in self.table.ready]

    def _busy_tasks(self) -> set[str]:
        """With several slots, the tasks whose next job must wait: one of theirs is on a
        worker. A task's jobs run one after the other (one slot cannot do otherwise)."""
        return {job.task for job in self._on_workers()} if self.options.slots > 1 else set()

    def _waits_for_its_task(self, record: JobRecord) -> bool:
        return record.worker is None and record.job.task in self._busy_tasks()

    def _can_start(self, record: JobRecord) -> bool:
        """A worker for it: its own (preempted, stopped) or an idle one."""
        return record.worker is not None or self._idle_worker() is not None

    def _scheduler_usable(self) -> Instance | None:
        sched = self.services["scheduler"]
        inst = sched.active
        if self.fallback_only or sched.failed or inst is None or not inst.connected:
            return None
        return inst

    def _want_decision(self, preempt_check: bool = False) -> None:
        free = self._slot_free()
        if not free and not (preempt_check and self._idle_worker()):
            return
        if free and not self._waiting():
            return
        inst = self._scheduler_usable()
        if inst is None:
            self._fallback_decide()
            return
        if self.pick_req is not None:
            self.pick_dirty = True
            if self.pick_late:  # the scheduler is stalled: dispatching does not wait for it
                self._fallback_decide()
            return
        if free and self._start_sole_ready():
            return
        self._ask(inst, () if free else self._least_urgent_first())

    def _start_sole_ready(self) -> bool:
        """Direct dispatch, as sched_ext's to an idle CPU: with a slot free and exactly
        one ready job that may start (a new one on an idle worker, or a preempted one on
        its own), the question has one answer (the kernel overrules one that leaves a
        startable job waiting, ``_apply_decision``), so the job starts without the
        scheduler's round trip, which on a loaded machine is most of a start's latency.
        The scheduler is told first (JobStarted), so its queue is as if it had picked
        the job, before any later question reaches it."""
        if len(self.table.ready) != len(self.running) + len(self.decked) + 1:
            return False
        job_id = next(j for j in self.table.ready if j not in self.running and j not in self.decked)
        record = self.table.ready[job_id]
        if record.worker is not None:  # preempted: it continues on its own worker
            if record.worker not in self.instances:
                return False
            self.counters["direct_resumes"] += 1
        elif self._waits_for_its_task(record) or self._idle_worker() is None:
            return False
        self._stream("scheduler", protocol.JobStarted(seq=0, job_id=job_id, at=time.monotonic(),
                                                      decided=[*self.running, *self.decked]))
        self.counters["direct_dispatches"] += 1
        self._dispatch(job_id)
        return True

    def _ask(self, inst: Instance, about: list[Job] | tuple = (), limit: int = 1) -> None:
        """Send the one outstanding PickNext: what runs now (``about`` empty, up to
        ``limit`` decisions), or does anything preempt one of the running jobs ``about``."""
        self.pick_for = tuple(job.id for job in about)
        self.pick_req = self.next_req()
        self.pick_sent = time.monotonic()
        self.pick_late = False
        self.pick_open = True  # if a slot frees before the answer, the wait is deliberation
        self._send(inst, protocol.PickNext(through=self.services["scheduler"].seq, req=self.pick_req,
                                          now=self.pick_sent, running=about[0] if about else None,
                                          others=list(about[1:]), limit=limit,
                                          on_workers=self._on_workers() if self.options.slots > 1 else []),
                   Lane.HIGH)

    def _pick_closed(self) -> None:
        """The pick stops holding dispatching back (answered, late, or its scheduler
        gone): the part of the current wait it covered was deliberation, not a stall."""
        if self.pick_open and self.wait_start is not None:
            self.wait_decided += time.monotonic() - max(self.pick_sent, self.wait_start)
        self.pick_open = False

    def _fallback_decide(self) -> None:
        self.counters["fallback_decisions"] += 1
        while self._slot_free():
            job = self.table.fallback_pick(exclude=self.running | self.decked, busy=self._busy_tasks())
            if job is None:
                return
            self._dispatch(job.id)
            if job.id not in self.running:  # no worker free for it
                return
        candidate = self.table.fallback_pick(exclude=self.running | self.decked, busy=self._busy_tasks())
        victim = self._least_urgent_first()[0]
        if (candidate is not None and fallback_key(candidate) < fallback_key(victim)
                and self._can_start(self.table.ready[candidate.id])):
            self._preempt(victim.id, candidate.id)

    def _apply_decision(self, job_id: str | None, victim: str | None) -> None:
        """Act on the scheduler's answer: to "what runs now?" (``victim`` None), or to
        "does anything preempt?", answered with the running job ``job_id`` displaces."""
        record = self.table.ready.get(job_id) if job_id else None
        if record is None or job_id in self.running or job_id in self.decked:
            if (victim is None and self._slot_free() and self._waiting() and self.table.fallback_pick(
                    exclude=self.running | self.decked, busy=self._busy_tasks()) is not None):
                # Work-conserving: a ready job that may start never waits because the
                # scheduler said something the kernel cannot do.
                self.counters["decisions_overruled"] += 1
                self._fallback_decide()
            return  # a "does anything preempt" answered no, or about a job gone since
        if self._waits_for_its_task(record):
            # Another job of its task is on a worker (it started meanwhile). The plugin
            # gets it back; if it stopped a running job for it, that job is back on its
            # queue while it runs: the kernel's truth puts the plugin right.
            self._give_back(record, "decisions_refused")
            if victim is not None and (inst := self._scheduler_usable()) is not None:
                self._sync_scheduler(inst)
            return
        if victim in self.running and self._can_start(record):
            # The plugin put ``victim`` back on its queue: it must come off the CPU, even
            # if a slot freed meanwhile (that slot is asked for next).
            self._preempt(victim, job_id)
        elif self._slot_free():
            self._dispatch(job_id)
        if job_id not in self.running:
            # The scheduler took ``job_id`` off its queue for a decision that no longer
            # applies (no worker for it, or the fallback filled the slots): give it back.
            self._give_back(record, "decisions_stale")

    def _give_back(self, record, counter: str) -> None:
        """A job the scheduler took off its queue but that did not start (or stopped):
        it is ready again, and the scheduler must know to pick it."""
        self.counters[counter] += 1
        self._stream("scheduler", protocol.JobReleased(seq=0, job=record.job))

    def _idle_worker(self) -> Instance | None:
        for service in self.services.values():
            inst = service.active
            if service.kind == "worker" and inst and inst.connected and inst.job is None:
                return inst
        return None

    def _dispatch(self, job_id: str) -> None:
        now = time.monotonic()
        record = self.table.ready[job_id]
        if record.worker is not None:  # preempted earlier: continue it where it stopped
            inst = self.instances.get(record.worker)
            if inst is None:
                return
            processes.kill(inst.child, signal.SIGCONT)
            inst.stopped = False
            inst.paused += now - inst.stopped_at  # preempted time is not the job's running time
            self.counters["resumed"] += 1
        else:
            inst = self._idle_worker()
            if inst is None:
                return
            record.worker, record.started, inst.job, inst.paused = inst.peer, now, job_id, 0.0
            self._send(inst, self._run_job(record), Lane.HIGH)
        self._started(job_id, now, waited=True)

    def _run_job(self, record: JobRecord) -> protocol.RunJob:
        task = self.table.tasks.get(record.job.task)
        return protocol.RunJob(job=record.job, action=task.task.action if task else "noop")

    def _started(self, job_id: str, now: float, waited: bool) -> None:
        """``job_id`` holds a slot from ``now`` (``waited``: the slot was free and a job
        waited for it, a dispatch gap; a deck's next job follows without one)."""
        self.running.add(job_id)
        self.counters["dispatched"] += 1
        if self.last_dispatch is not None:
            self.intervals.append((now, now - self.last_dispatch))
        self.last_dispatch = now
        if waited and self.wait_start is not None:
            gap = now - self.wait_start
            self.gaps.append((now, gap, max(0.0, gap - self.wait_decided)))
            self.max_gap = max(self.max_gap, gap)
        # Another job still waiting for another free slot starts a wait of its own.
        self.wait_start = now if self._slot_free() and self._waiting() else None
        self.wait_decided = 0.0
        if self.options.dispatch_batch > 1:
            self._ask_ahead()

    def _ask_ahead(self) -> None:
        """While a job runs, ask for the next batch, so that it is decided by the time
        the slot frees."""
        worker = self._running_worker()
        if (worker is not None and len(worker.deck) < self.options.dispatch_batch and self.pick_req is None
                and self._waiting()):
            inst = self._scheduler_usable()
            if inst is not None:
                self._ask(inst, (), self.options.dispatch_batch)

    def _running_worker(self) -> Instance | None:
        """The worker of the running job (the dispatch queue runs one slot)."""
        job_id = next(iter(self.running), None)
        return self.instances.get(self.table.ready[job_id].worker) if job_id is not None else None

    def _deck(self, job_ids: list[str]) -> None:
        """Send decided jobs to the running job's worker, to start after it in this order."""
        inst = self._running_worker()
        for job_id in job_ids:
            record = self.table.ready.get(job_id)
            if record is None or job_id in self.running or job_id in self.decked:
                continue  # finished or decided meanwhile (the fallback)
            if inst is None or record.worker is not None:
                # No slot to queue behind, or a preempted job (a resume, not a start):
                # the scheduler keeps it.
                self._give_back(record, "decisions_stale")
                continue
            record.worker = inst.peer
            inst.deck.append(job_id)
            self.decked.add(job_id)
            self._send(inst, self._run_job(record), Lane.HIGH)
        self._ask_ahead()

    def _next_from_deck(self, inst: Instance, at: float, runs: bool) -> None:
        """The worker started the next job of its deck at ``at`` (when the last ended)."""
        job_id = inst.deck.popleft()
        self.decked.discard(job_id)
        record = self.table.ready[job_id]
        record.started, inst.job, inst.paused = at, job_id, 0.0
        self.counters["deck_starts"] += 1
        if runs:
            self._started(job_id, at, waited=False)
        else:
            # Its worker is stopped (preempted while the JobDone was in flight): this job
            # is the one preempted now, and the scheduler decides when it continues.
            self._give_back(record, "decisions_returned")

    def _preempt(self, victim: str, job_id: str) -> None:
        inst = self.instances.get(self.table.ready[victim].worker)
        if inst is not None:
            processes.kill(inst.child, protocol.PREEMPT_SIGNAL)
            inst.stopped = True
            inst.stopped_at = time.monotonic()
        self.counters["preemptions"] += 1
        self.running.discard(victim)
        self.wait_start = time.monotonic()
        self._dispatch(job_id)

    def truth_state(self) -> SchedulerState:
        """The scheduler state the kernel can vouch for: every task, every ready job
        (including a preempted one, excluding the running ones and those in a worker's
        deck: their decision is made) in fallback order."""
        decided = {*self.running, *self.decked}
        ready = sorted((r.job for r in self.table.ready.values() if r.job.id not in decided), key=fallback_key)
        return SchedulerState(kind="kernel", tasks=[r.task for r in self.table.tasks.values()], ready=ready)

    # ---------------------------------------------------------------- failures

    def _on_exit(self, inst: Instance) -> None:
        if inst.child.popen.poll() is None:
            return
        self.sel.unregister(inst.child.pidfd)
        code = processes.reap(inst.child)
        self._gone(inst, f"exit status {code}: {processes.last_line(inst.child.log_path)}"[:300])

    def _gone(self, inst: Instance, reason: str) -> None:
        self._forget(inst)
        if not inst.ready_future.done():
            inst.ready_future.set_exception(RuntimeError(f"{inst.peer} exited before it was ready ({reason})"))
        for req, (fut, owner) in list(self.requests.items()):
            if owner is inst:
                del self.requests[req]
                fut.set_exception(RuntimeError(f"{inst.peer} exited ({reason})"))
        if not self.stopping:
            self.sup.gone(inst, reason)  # reported once; restarted by the RS (the RS and workers: here)

    def _worker_lost(self, inst: Instance, service: Service) -> None:
        if inst.job is not None:
            record = self.table.ready.get(inst.job)
            if record is not None:
                record.worker = record.started = None
                self._give_back(record, "redispatched")
            if inst.job in self.running:
                self.running.discard(inst.job)
                self._mark_waiting(time.monotonic())
        for job_id in inst.deck:  # decided, never started: the scheduler decides again
            self.decked.discard(job_id)
            record = self.table.ready.get(job_id)
            if record is not None:
                record.worker = None
                self._give_back(record, "redispatched")
        inst.deck.clear()

    def _forget(self, inst: Instance) -> Future:
        self.instances.pop(inst.peer, None)
        for pipe in [p for p, i in self.pipes.items() if i is inst]:
            self.departed[pipe] = self.pipes.pop(pipe)
        while len(self.departed) > 1024:
            self.departed.popitem(last=False)
        self.regions.reclaim(inst.peer)
        self.unflushed.discard(inst.outbox)
        return self.closer.run(self._close_peer, inst.outbox, inst.peer)

    def _close_peer(self, outbox: ipc.Outbox, peer: str) -> None:
        """On the closer's thread: the loop does not wait for ``nng_close``."""
        outbox.close()
        for path in self.run_dir.glob(f"{peer}.?"):
            path.unlink(missing_ok=True)

    def _watchdogs(self, now: float) -> None:
        if self.pick_req is not None and now - self.pick_sent > PICK_TIMEOUT:
            sched = self.services["scheduler"].active
            if (sched is not None and now - self.pick_sent > EJECT_AFTER
                    and self.sup.charged(sched, now - self.pick_sent) > EJECT_AFTER):  # starved is not stalled
                self.counters["scheduler_ejected"] += 1
                # Journaled by the supervision writer: the loop never waits for an fsync.
                self.sup.record("scheduler.eject", peer=sched.peer, reason=f"no decision for {EJECT_AFTER}s")
                self.sup.kill(sched, f"ejected: no scheduling decision for {EJECT_AFTER:g}s")
                self._pick_closed()
                self.pick_req = None
                self._fallback_decide()  # no event may come to ask (e.g. every task at its backlog cap)
            elif not self.pick_late:
                # Keep dispatching with the fallback while the answer is late (here, then
                # in _want_decision on every event); the pick stays outstanding so a
                # scheduler that never answers is ejected.
                self.counters["pick_timeouts"] += 1
                self._pick_closed()
                self.pick_late = self.pick_dirty = True
                # With the late pick still outstanding: nothing may ask again meanwhile
                # (the dispatch queue's ask-ahead did, and each new question restarted
                # the ejection clock, so a hung scheduler was never ejected).
                self._fallback_decide()
        if now < self.sup.wake_at and now < self.watch_at:
            return
        # The rest looks at every process: every WATCH_PERIOD, or sooner when the
        # supervisor has something due (its wake_at). On every pass it was a fifth of the
        # kernel's time under load, for limits of 100s of milliseconds.
        self.watch_at = now + WATCH_PERIOD
        self.sup.check(now)  # hangs (charged silence), start timeouts, standbys, the kernel's own restarts
        if self.options.spare and not self.stopping and not self.swapping:  # a spare's imports do not compete with a swap
            self.spare.refill(now)
        for inst in list(self.instances.values()):
            if inst.job is not None and not inst.stopped:
                record = self.table.ready.get(inst.job)
                limit = max(JOB_KILL_FLOOR, record.job.budget_ms / 50) if record else JOB_KILL_FLOOR
                if (record and record.started and now - record.started - inst.paused > limit and not inst.kill_reason
                        and self.sup.charged(inst, now - record.started - inst.paused) > limit):
                    self.counters["jobs_killed"] += 1
                    self.sup.kill(inst, f"job {inst.job} ran past its limit")

    # ---------------------------------------------------------------- reporting

    def status(self) -> dict:
        now = time.monotonic()
        services = []
        for service in self.services.values():
            inst = service.active
            services.append({
                "name": service.name, "kind": service.kind,
                "pid": inst.child.pid if inst else None,
                "peer": inst.peer if inst else None,
                "state": "failed" if service.failed else ("up" if inst and inst.connected else "down"),
                "plugin": (inst.plugin if inst and inst.plugin else service.plugin),
                "version": inst.plugin_version if inst else "",
                "uptime_s": round(now - service.started, 1) if inst else 0.0,
                "restarts": service.restarts, "incarnation": service.incarnations,
                "memory_budget": inst.child.memory_budget if inst else self.options.memory_budget,
                "memory_rss": processes.rss_bytes(inst.child.pid) if inst else 0,
                "shm_bytes": self.regions.bytes_of(inst.peer) if inst else 0,
                "last_failure": service.last_failure,
                "stream_seq": service.seq, "applied_seq": inst.applied if inst else 0,
                "replay_backlog": len(service.replay), "lost": (inst.lost if inst else 0) + service.replay_lost,
                "plugin_errors": inst.errors if inst else 0,
                "cpu": realtime.describe(inst.child.pid) if inst and inst.child else None,
                **({"job": inst.job if inst else None, "deck": len(inst.deck) if inst else 0}
                   if service.kind == "worker" else {}),
                **self.sup.service_status(service),  # incarnation, failures, safe mode, standby, policy
            })
        lanes = {}
        for lane in ipc.LANES:
            lanes[lane.name] = {
                "queued": len(self.queues.get(lane, ())),
                "outbound_buffered": sum(len(i.outbox.pending[lane]) for i in self.instances.values()),
                "handled": self.lane_handled[lane],
                "dropped": self.lane_drops[lane] + sum(i.outbox.drops[lane] for i in self.instances.values()),
            }
        totals = self.table.totals.summary()
        recent = [(g, s) for t, g, s in self.gaps if now - t < 10]
        recent_intervals = [i for t, i in self.intervals if now - t < 10]
        return {
            "kernel": {"pid": os.getpid(), "version": KERNEL_VERSION, "uptime_s": round(now - self.started, 1),
                       "run_dir": str(self.run_dir), "home": str(self.home),
                       "machine": platform.machine(), "cpu": realtime.describe(os.getpid()),
                       "rt_priority_asked": self.options.rt_priority},
            "services": services,
            "lanes": lanes,
            "tasks": {"count": len(self.table.tasks), "ready": len(self.table.ready), "running": sorted(self.running),
                      "slots": self.options.slots,
                      **totals, "dispatch_gap_max_ms": round(self.max_gap * 1000, 3),
                      "dispatch_gap_recent_max_ms": round(max((g for g, _ in recent), default=0) * 1000, 3),
                      "dispatch_stall_recent_max_ms": round(max((s for _, s in recent), default=0) * 1000, 3),
                      "dispatch_interval_recent_max_ms": round(max(recent_intervals, default=0) * 1000, 3),
                      "release_lag_us": self.table.release_lag.summary(),
                      "start_lag_us": self.table.start_lag.summary()},
            "memory": {"regions": len(self.regions.regions), "region_bytes": sum(r.size for r in self.regions.regions.values()),
                       "reclaimed": self.regions.reclaimed},
            "counters": dict(self.counters),
            "clients": len(self.clients),
            "spare_pid": self.spare.pid,  # the pre-imported host interpreter waiting to be taken
            "journal_problems": self.journal.problems,
        }

    def task_list(self) -> list[dict]:
        oldest = self.table.oldest_unfinished()
        return [{"name": r.task.name, "period_ms": r.task.period_ms, "deadline_ms": r.task.deadline_ms,
                 "budget_ms": r.task.budget_ms, "priority": r.task.priority, "action": r.task.action,
                 **r.stats.summary(), "oldest_unfinished_release": oldest.get(r.task.name)}
                for r in self.table.tasks.values()]


def _keys(msg) -> list[str]:
    """The keys a storage request names (a scan: its prefix)."""
    if isinstance(msg, (protocol.KvPut, protocol.KvTxn)):
        return [k for k, _ in msg.writes]
    return [k for k in (getattr(msg, "key", None), getattr(msg, "prefix", None)) if k]

