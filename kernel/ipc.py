"""The transport under the protocol: three priority lanes over pynng.

Topology (all addresses are ``ipc://`` paths in the runtime directory, mode 0600):

- the kernel listens on one Pull socket per lane (``k.h``, ``k.m``, ``k.l``); every
  peer dials them with Push sockets;
- for each peer the kernel listens on one Push socket per lane (``<peer>.h`` ...); the
  peer dials them with Pull sockets. The address belongs to the *peer id*, not to a
  process, so a restarted service finds its endpoint where it was (stable endpoints).

Separate sockets per lane are what keep a LOW flood from delaying HIGH traffic: both
ends always drain the HIGH socket before reading another MEDIUM or LOW message.

Which lane holds a message is asked of NNG's pollable descriptors (``recv_fd``, readable
exactly while a message waits), with one poll(2) of the three, before any receive: a
non-blocking receive on an *empty* NNG socket costs about 10 µs (it goes through NNG's
aio machinery and raises TryAgain), a poll about 2 µs. Trying every lane after every
message, as this module first did, was most of the cost of a round trip.

Batching: what a sender has queued for one receiver and lane leaves as one NNG message
(a :class:`~kernel.protocol.Batch`) when it flushes. The kernel flushes after each
message it handles; the first message to a peer since the last flush leaves at once,
the ones after it wait for the flush (what 16 storage writers send becomes two sends
to the storage service, not 16). A service keeps its answers and flushes them after
each message it handles (a group commit's answers leave together). Why: a sparse NNG
send costs its sender ~50 µs of CPU (a ``sendmsg`` and one of NNG's threads woken),
against ~10 µs when sends follow each other. The receiver unpacks a batch in place:
its items are handled in order, as if they had come one by one, and HIGH still comes
first.

Every socket has a maximum message size and timeouts; decoding is schema-checked by
:mod:`kernel.protocol` and failures are counted by the caller, never raised past it.
"""

from __future__ import annotations

import os
import select
import time
from collections import deque
from pathlib import Path

import pynng

from kernel import protocol
from kernel.protocol import Lane, MAX_MESSAGE_BYTES

LANE_SUFFIX = {Lane.HIGH: "h", Lane.MEDIUM: "m", Lane.LOW: "l"}
LANES = (Lane.HIGH, Lane.MEDIUM, Lane.LOW)
SEND_TIMEOUT_MS = 1000
NNG_SEND_BUFFER = 256
# The kernel's inbound sockets read messages up to this size, so that one somewhat over
# MAX_MESSAGE_BYTES reaches the kernel, which refuses and counts it (``bad_oversized``).
# NNG closes, unread, a pipe whose message announces more than its socket's recv_max_size
# (nothing is counted then, and the sender's socket redials on a new, unauthenticated pipe).
INBOUND_RECV_MAX = 4 * MAX_MESSAGE_BYTES


def address(run_dir: Path, name: str, lane: Lane) -> str:
    return f"ipc://{run_dir}/{name}.{LANE_SUFFIX[lane]}"


def _lock_down(addr: str) -> None:
    """Only the owner may connect: least privilege for every endpoint."""
    path = addr[len("ipc://"):]
    if os.path.exists(path):
        os.chmod(path, 0o600)


def _configure(sock: pynng.Socket, recv_max: int = MAX_MESSAGE_BYTES) -> pynng.Socket:
    sock.recv_max_size = recv_max
    sock.send_timeout = SEND_TIMEOUT_MS
    return sock


def listen(sock_type, addr: str, recv_max: int = MAX_MESSAGE_BYTES) -> pynng.Socket:
    sock = _configure(sock_type(), recv_max)
    sock.listen(addr)
    _lock_down(addr)
    return sock


def dial(sock_type, addr: str) -> pynng.Socket:
    sock = _configure(sock_type())
    sock.reconnect_time_min = 5
    sock.reconnect_time_max = 100
    sock.dial(addr, block=True)
    return sock


def try_recv_msg(sock: pynng.Socket) -> pynng.Message | None:
    try:
        return sock.recv_msg(block=False)
    except pynng.TryAgain:
        return None


class Readiness:
    """Which of a set of receive sockets hold a message: one poll(2) of their NNG
    pollable descriptors (read once: each read of ``recv_fd`` is a getsockopt)."""

    def __init__(self, socks: dict[Lane, pynng.Socket]):
        self._poll = select.poll()
        self._lane = {}
        for lane, sock in socks.items():
            fd = sock.recv_fd
            self._poll.register(fd, select.POLLIN)
            self._lane[fd] = lane

    def first(self, timeout_ms: float = 0) -> Lane | None:
        """The most urgent lane holding a message, waiting up to ``timeout_ms`` (-1:
        for ever) for one; None if none came."""
        events = self._poll.poll(timeout_ms)
        return min(self._lane[fd] for fd, _ in events) if events else None


class PeerLink:
    """A peer's side of the lanes (services, workers, the reincarnation server).

    ``recv`` always returns a waiting HIGH message before any MEDIUM or LOW one.
    Messages that fail to decode are dropped and counted in ``bad``.
    """

    def __init__(self, run_dir: Path, peer: str, token: str, **hello):
        self.peer = peer
        self._out = {lane: dial(pynng.Push0, address(run_dir, "k", lane)) for lane in LANES}
        for sock in self._out.values():
            # Without a buffer a non-blocking send is refused while the pipe still writes
            # the previous message: a burst (a storage batch's acks) would lose all but one.
            sock.send_buffer_size = NNG_SEND_BUFFER
        self._in = {lane: dial(pynng.Pull0, address(run_dir, peer, lane)) for lane in LANES}
        self._ready = Readiness(self._in)
        self._unpacked = {lane: deque() for lane in LANES}  # the rest of a batch, decoded
        self.bad = 0
        self.dropped = 0
        self.kept = {lane: deque() for lane in LANES}
        hello = protocol.Hello(peer=peer, token=token, pid=os.getpid(), **hello)
        for lane in LANES:
            self._out[lane].send(protocol.encode(hello))

    def send(self, msg, lane: Lane = Lane.MEDIUM, keep: bool = False) -> bool:
        """Send now; HIGH blocks up to the send timeout, other lanes give up at once
        when the kernel's socket is full (counted in ``dropped``). With ``keep`` the
        message is kept here in order and leaves with the next :meth:`flush`, batched
        with the others kept, however long the kernel's socket stays full. A service
        keeps its answers: nothing would send them again (a storage service that
        dropped the LOW acknowledgements of a burst of commits left their clients
        waiting for ever)."""
        data = protocol.encode(msg)
        if keep:
            self.kept[lane].append(data)
            return True
        try:
            self._out[lane].send(data, block=lane is Lane.HIGH)
            return True
        except (pynng.TryAgain, pynng.Timeout):
            if keep:
                self.kept[lane].append(data)
                return True
            self.dropped += 1
            return False

    def flush(self) -> bool:
        """Send what :meth:`send` kept, in order, as far as the sockets take it; True
        when nothing is left."""
        for lane, kept in self.kept.items():
            if not send_batches(self._out[lane], kept):
                return False
        return True

    def holding(self) -> bool:
        """More of a HIGH batch is here, not handled yet: answers kept now can wait for
        the rest and leave with theirs in one send."""
        return bool(self._unpacked[Lane.HIGH])

    def recv(self, timeout: float | None) -> tuple[Lane, object] | None:
        """The next message, HIGH first; None when ``timeout`` seconds pass."""
        deadline = None if timeout is None else time.monotonic() + timeout
        wait_ms = -1 if timeout is None else timeout * 1000.0
        unpacked = self._unpacked
        while True:
            waiting = Lane.HIGH if unpacked[Lane.HIGH] else Lane.MEDIUM if unpacked[Lane.MEDIUM] else \
                Lane.LOW if unpacked[Lane.LOW] else None
            lane = self._ready.first(0 if waiting is not None else wait_ms)
            if waiting is not None and (lane is None or waiting <= lane):
                return waiting, unpacked[waiting].popleft()
            if lane is not None:
                msg = try_recv_msg(self._in[lane])
                if msg is not None:
                    msgs, bad = protocol.unpack(msg.bytes)
                    self.bad += bad
                    if msgs:
                        unpacked[lane].extend(msgs[1:])  # the rest waits: HIGH is looked at first
                        return lane, msgs[0]
                    continue  # look at HIGH again before anything else
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                wait_ms = remaining * 1000.0

    def close(self) -> None:
        for sock in (*self._out.values(), *self._in.values()):
            sock.close()


def send_batches(sock: pynng.Socket, queue: deque) -> bool:
    """Send ``queue`` (encoded messages, oldest first) without blocking, in batches,
    removing what was sent; True when it is empty, False when the socket is full."""
    while queue:
        data, n = protocol.take_batch(queue)
        try:
            sock.send(data, block=False)
        except pynng.TryAgain:
            return False
        for _ in range(n):
            queue.popleft()
    return True


class Inbox:
    """The kernel's three inbound sockets. The caller pairs each message's pipe with
    the peer that said Hello on it."""

    def __init__(self, run_dir: Path):
        self.socks = {lane: listen(pynng.Pull0, address(run_dir, "k", lane), INBOUND_RECV_MAX) for lane in LANES}
        self._ready = {lane: Readiness({lane: sock}) for lane, sock in self.socks.items()}
        self._fds = {lane: sock.recv_fd for lane, sock in self.socks.items()}

    def fds(self):
        return dict(self._fds)

    def recv(self, lane: Lane) -> pynng.Message | None:
        """The next message on ``lane``, None at once when there is none."""
        if self._ready[lane].first() is None:
            return None
        return try_recv_msg(self.socks[lane])

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close()


class Outbox:
    """The kernel's three Push sockets toward one peer, with a kernel-side buffer: what
    was sent since the last :meth:`flush` (it leaves then, batched), and what the peer
    cannot take now (not yet connected, busy, or held during a swap). ``send`` adds the
    outbox to the owner's ``dirty`` set, so the owner knows which ones to flush.

    Overflow: HIGH is never dropped (its buffer is unbounded: HIGH traffic comes only
    from the kernel itself, a bounded number of decisions per job). MEDIUM and LOW hold
    at most ``cap`` messages each; past that the newest message is dropped and counted
    in ``drops`` (visible in `lugh status`).
    """

    def __init__(self, run_dir: Path, peer: str, cap: int = 10_000, dirty: set | None = None):
        self.peer = peer
        self.cap = cap
        self._dirty = dirty  # the owner's set of outboxes with something to flush
        self.socks = {}
        for lane in LANES:
            sock = listen(pynng.Push0, address(run_dir, peer, lane))
            sock.send_buffer_size = NNG_SEND_BUFFER
            self.socks[lane] = sock
        self.pending = {lane: deque() for lane in LANES}
        self.sent_first = False  # a message went at once since the last flush: the next ones queue
        self.held = False
        self.drops = {lane: 0 for lane in LANES}

    def send(self, data: bytes, lane: Lane) -> None:
        """The first message since the last :meth:`flush` leaves at once (a lone
        message waits for nothing); the ones after it are queued and leave with the
        next flush, batched (as Nagle's algorithm holds back what follows a segment in
        flight)."""
        queue = self.pending[lane]
        if self._dirty is not None:
            self._dirty.add(self)  # the flush also ends the interval of the send at once
        if not self.sent_first and not queue and not self.held:
            try:
                self.socks[lane].send(data, block=False)
                self.sent_first = True
                return
            except pynng.TryAgain:
                pass
        if lane is not Lane.HIGH and len(queue) >= self.cap:
            self.drops[lane] += 1
            return
        queue.append(data)

    def flush(self) -> bool:
        """Send what is queued, HIGH first; True when nothing is left."""
        self.sent_first = False
        if self.held:
            return False
        for lane, queue in self.pending.items():
            if queue and not send_batches(self.socks[lane], queue):
                return False
        return True

    def discard(self) -> None:
        for q in self.pending.values():
            q.clear()

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close()

