"""The generic part of every peer process: a loop over messages.

It sends a heartbeat every period from the loop itself (not from a thread), so a peer
stuck in a plugin hook stops heartbeating and the kernel sees the hang. It keeps the
service stream position (``applied_seq``): a message with a seq already applied is a
replay duplicate and is skipped; a jump counts the skipped messages as lost.

The kind-specific *server* implements ``handle(msg) -> reply | None`` and may
implement ``flush() -> [(reply, lane)]``, called when no message is waiting or when it
says ``batch_full`` (the storage service commits a whole batch there: group commit),
and ``tick(now) -> [(msg, lane)]`` with ``next_timer()`` for work due at a time.
"""

from __future__ import annotations

import os
import signal
import sys
import time
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
        """False for a duplicate (already applied)."""
        if seq <= self.applied:
            return False
        if seq > self.applied + 1 and self.applied:
            self.lost += seq - self.applied - 1
        self.applied = seq
        return True


def serve(link: PeerLink, server, stream: Stream, heartbeat_period: float) -> None:
    stop = False

    def on_term(signum, frame):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    next_beat = time.monotonic()
    idle = True
    tick = getattr(server, "tick", None)  # servers with timers: tick(now) and next_timer()
    while not stop:
        now = time.monotonic()
        if now >= next_beat:
            link.send(protocol.Heartbeat(applied_seq=stream.position(), lost=stream.lost, errors=stream.errors),
                      Lane.HIGH)
            next_beat = now + heartbeat_period
        if tick is not None:
            for reply, lane in tick(now):
                link.send(reply, lane)
            wake = min(next_beat, server.next_timer())
        else:
            wake = next_beat
        item = link.recv(0 if not idle else max(0.0, wake - now))
        if item is None:
            if not idle:
                for reply, lane in getattr(server, "flush", _nothing)():
                    link.send(reply, lane)
            idle = True
            continue
        idle = False
        lane, msg = item
        if isinstance(msg, protocol.Stop):
            break
        seq = getattr(msg, "seq", 0)
        if seq and not stream.accept(seq):
            continue
        if isinstance(msg, protocol.Ping):
            reply = protocol.Pong(req=msg.req, payload=msg.payload)
        else:
            reply = server.handle(msg)
        if reply is not None:
            link.send(reply, lane)
        if getattr(server, "batch_full", False):
            for reply, lane in server.flush():
                link.send(reply, lane)
    for reply, lane in getattr(server, "flush", _nothing)():
        link.send(reply, lane)


def _nothing():
    return ()


def report_error(what: str, exc: BaseException) -> None:
    print(f"{what}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)


def connect_from_env(peer: str, **hello) -> PeerLink:
    from pathlib import Path

    return PeerLink(Path(os.environ["LUGH_RUN_DIR"]), peer, os.environ.get("LUGH_TOKEN", ""), **hello)
