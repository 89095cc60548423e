"""The generic part of every peer process: a loop over messages.

It sends a heartbeat every period from the loop itself (not from a thread), so a peer
stuck in a plugin hook stops heartbeating and the kernel sees the hang. It keeps the
service stream position (``applied_seq``): a message with a seq already applied is a
replay duplicate and is skipped; a jump counts the skipped messages as lost.

The kind-specific *server* implements ``handle(msg) -> reply | None`` (or
``handle(msg, lane)``; a reply goes back on the message's lane, or the server returns a
list of ``(reply, lane)``) and may implement ``flush() -> [(reply, lane)]``, called when
no message is waiting or when it says ``batch_full`` (the storage service commits a whole
batch there: group commit), ``tick(now) -> [(msg, lane)]`` with ``next_timer()`` for work
due at a time, and ``bind(link)`` to get the link before the loop starts.
"""

from __future__ import annotations

import inspect
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

from kernel import protocol
from kernel.ipc import PeerLink
from kernel.protocol import Lane


@dataclass
class Stream:
    applied: int = 0
    lost: int = 0
    errors: int = 0
    # A service whose applied messages are not yet durable (storage) reports ``acked``
    # instead, so the kernel keeps those messages for replay until they are.
    durable_acks: bool = False
    acked: int = 0

    def position(self) -> int:
        return self.acked if self.durable_acks else self.applied

    def accept(self, seq: int) -> bool:
        """False for a duplicate (already applied). A jump counts the skipped messages
        as lost (:class:`Reorder` first waits for them: they may be on another lane)."""
        if seq <= self.applied:
            return False
        if seq > self.applied + 1 and self.applied:
            self.lost += seq - self.applied - 1
        self.applied = seq
        return True


GAP_WAIT = 1.0  # seconds a stream message waits for an earlier one before that one counts as lost
KEPT_RETRY = 0.002  # seconds between tries to send answers a full socket could not take


def stream_seq(msg) -> int:
    """The service-stream number of a message (0: not a stream message). A KvResult's
    ``seq`` names the storage-stream request it answers, not a place in the receiver's
    stream."""
    return 0 if isinstance(msg, protocol.KvResult) else getattr(msg, "seq", 0)


class Reorder:
    """Applies a service stream in the kernel's order although it arrives on three
    lanes. The kernel numbers the stream in the order it handles messages (HIGH first:
    that is where priority is given), then sends each on its own lane; this peer reads
    HIGH before MEDIUM and LOW, so a HIGH message can arrive before a LOW one numbered
    earlier. Taken as it came, the earlier one would then look like a duplicate and be
    skipped (lost, its client never answered). So a message ahead of the stream waits
    here until the ones before it have come (they are on their way: the kernel sent
    them first), at most ``GAP_WAIT`` seconds; a gap still open then is counted lost."""

    def __init__(self, stream: Stream):
        self.stream = stream
        self.parked: dict[int, tuple] = {}
        self.since = 0.0

    def hold(self, item) -> bool:
        seq = stream_seq(item[1])
        if not seq or not self.stream.applied or seq <= self.stream.applied + 1:
            return False  # in order, a duplicate, or the first of a stream with no known start
        if not self.parked:
            self.since = time.monotonic()
        self.parked[seq] = item
        return True

    def ready(self):
        """The next parked message that can be applied now (or dropped as a duplicate)."""
        if self.parked:
            first = min(self.parked)
            if first <= self.stream.applied + 1:
                self.since = time.monotonic()
                return self.parked.pop(first)
        return None

    def expire(self, now: float):
        if self.parked and now - self.since > GAP_WAIT:
            self.since = now
            return self.parked.pop(min(self.parked))  # accept() counts the gap as lost
        return None


def _stop_on_sigterm() -> dict:
    """SIGTERM sets the returned flag: the loop ends after the message at hand."""
    flag = {"stop": False}
    signal.signal(signal.SIGTERM, lambda signum, frame: flag.__setitem__("stop", True))
    return flag


def serve(link: PeerLink, server, stream: Stream, heartbeat_period: float) -> None:
    term = _stop_on_sigterm()
    next_beat = time.monotonic()
    idle = True
    tick = getattr(server, "tick", None)  # servers with timers: tick(now) and next_timer()
    if hasattr(server, "bind"):
        server.bind(link)
    handle = server.handle
    if "lane" in inspect.signature(handle).parameters:
        handle = lambda msg, lane, _h=server.handle: _h(msg, lane=lane)
    else:
        handle = lambda msg, lane, _h=server.handle: _h(msg)
    reorder = Reorder(stream)
    # Answers are kept when the kernel's socket is full (PeerLink.send): nothing would
    # send them again.
    answer = lambda reply, lane: link.send(reply, lane, keep=True)
    while not term["stop"]:
        now = time.monotonic()
        if now >= next_beat:
            link.send(protocol.Heartbeat(applied_seq=stream.position(), lost=stream.lost, errors=stream.errors),
                      Lane.HIGH)
            next_beat = now + heartbeat_period
        if tick is not None:
            for reply, lane in tick(now):
                answer(reply, lane)
            wake = min(next_beat, server.next_timer())
        else:
            wake = next_beat
        wait = 0 if not idle else max(0.0, min(wake - now, GAP_WAIT / 10 if reorder.parked else wake - now))
        if not link.holding() and not link.flush():  # answers the kernel's socket could not take yet: soon again
            wait = min(wait, KEPT_RETRY)
        item = reorder.ready() or link.recv(wait)
        if item is None:
            item = reorder.expire(now)
        if item is None:
            if not idle:
                for reply, lane in getattr(server, "flush", _nothing)():
                    answer(reply, lane)
            idle = True
            continue
        idle = False
        lane, msg = item
        if isinstance(msg, protocol.Stop):
            break
        if reorder.hold(item):
            continue  # ahead of the stream: the messages before it come first
        seq = stream_seq(msg)
        if seq and not stream.accept(seq):
            continue
        if isinstance(msg, protocol.Ping):
            reply = protocol.Pong(req=msg.req, payload=msg.payload)
        elif isinstance(msg, protocol.Promote):  # already serving: nothing to take over
            reply = protocol.Done(req=msg.req, ok=True, applied_seq=stream.position())
        elif isinstance(msg, protocol.InjectFault):  # `lugh chaos`: see kernel/services/host.py
            getattr(server, "inject_fault", lambda fault: None)(msg.fault)
            reply = None
        else:
            reply = handle(msg, lane)
        if isinstance(reply, list):
            for one, one_lane in reply:
                answer(one, one_lane)
        elif reply is not None:
            answer(reply, lane)
        if getattr(server, "batch_full", False):
            for reply, lane in server.flush():
                answer(reply, lane)
    for reply, lane in getattr(server, "flush", _nothing)():
        answer(reply, lane)
    link.flush()


def _nothing():
    return ()


def await_promotion(link: PeerLink, heartbeat_period: float):
    """A hot standby's life before it takes over: started, its plugin verified and
    imported, connected, heartbeating (so a hung standby is seen), and nothing else.
    Returns the ``Promote`` request, or None when told to stop."""
    term = _stop_on_sigterm()
    next_beat = time.monotonic()
    while not term["stop"]:
        now = time.monotonic()
        if now >= next_beat:
            link.send(protocol.Heartbeat(), Lane.HIGH)
            next_beat = now + heartbeat_period
        item = link.recv(max(0.0, next_beat - now))
        if item is None:
            continue
        lane, msg = item
        if isinstance(msg, protocol.Stop):
            return None
        if isinstance(msg, protocol.Promote):
            return msg
        if isinstance(msg, protocol.Ping):
            link.send(protocol.Pong(req=msg.req, payload=msg.payload), lane)
    return None


def promoted(link: PeerLink, request, stream: Stream, error: str = "") -> None:
    """Answer a ``Promote``: the service is built (or could not be), with the stream
    position it recovered."""
    link.send(protocol.Done(req=request.req, ok=not error, error=error, applied_seq=stream.position()), Lane.HIGH)


class BusyBeat:
    """Heartbeats from a helper thread while the loop is legitimately busy in one long
    operation (a large commit, an export, a rollback), so that the kernel does not take
    it for a hang. Only inside ``with beat():``, and only for ``limit`` seconds: a plugin
    stuck for good still stops heartbeating and is seen."""

    def __init__(self, link: PeerLink, stream: Stream, period: float, limit: float = 60.0):
        self.link, self.stream, self.period, self.limit = link, stream, period, limit
        self._since: float | None = None
        self._wake = threading.Event()
        threading.Thread(target=self._run, name="busy-heartbeat", daemon=True).start()

    @contextmanager
    def __call__(self):
        self._since = time.monotonic()
        self._wake.set()
        try:
            yield
        finally:
            self._since = None

    def _run(self) -> None:
        while True:
            if self._since is None:
                self._wake.wait()
                self._wake.clear()
            time.sleep(self.period)
            since = self._since
            if since is not None and self.period <= time.monotonic() - since < self.limit:
                s = self.stream
                self.link.send(protocol.Heartbeat(applied_seq=s.position(), lost=s.lost, errors=s.errors), Lane.HIGH)


@contextmanager
def not_busy():
    yield


def report_error(what: str, exc: BaseException) -> None:
    print(f"{what}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)


def connect_from_env(peer: str, **hello) -> PeerLink:
    from pathlib import Path

    return PeerLink(Path(os.environ["LUGH_RUN_DIR"]), peer, os.environ.get("LUGH_TOKEN", ""), **hello)
