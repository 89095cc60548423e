"""IPC through a real kernel, real processes and real NNG sockets (no mocks): priority
lanes (tested by the order in which the kernel handled messages, never by time), bounded
queues and their drops, malformed input on every lane and on the control channel,
kernel <-> service round trips, storage through IPC and shared-memory regions.

A Pong carries ``order``, the kernel's count of handled messages when it handled the
ping: that is what says which message the kernel served first.
"""

from __future__ import annotations

import collections
import os
import random
import signal
import stat
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import msgspec
import pynng
import pytest

from kernel import core, ipc, paths, protocol
from kernel.memory import SHM_DIR
from kernel.protocol import Lane
from lugh_sdk.client import LughError, attach, detach

RECV_TIMEOUT = 30.0  # generous: a loaded CI machine is slow, never wrong
RAW_SEND_TIMEOUT_MS = 10_000


# ---------------------------------------------------------------------------- helpers


def run_dir(kernel) -> Path:
    return (kernel.home / "run").resolve()


@pytest.fixture
def link(kernel):
    """An external client attached to the kernel's lanes."""
    peer_link = attach(kernel.client, "test")
    yield peer_link
    detach(kernel.client, peer_link)


@contextmanager
def raw_push(kernel, lane: Lane, *, send_buffer: int = 0):
    """A bare Push0 socket on one of the kernel's inbound lanes: it says no Hello unless
    the test sends one."""
    sock = pynng.Push0(send_timeout=RAW_SEND_TIMEOUT_MS)
    if send_buffer:
        sock.send_buffer_size = send_buffer
    sock.dial(ipc.address(run_dir(kernel), "k", lane), block=True)
    try:
        yield sock
    finally:
        sock.close()


@contextmanager
def raw_pull(kernel, peer: str, lane: Lane):
    """A bare Pull0 socket on the kernel's outbound lane toward ``peer``."""
    sock = pynng.Pull0(recv_timeout=int(RECV_TIMEOUT * 1000))
    sock.dial(ipc.address(run_dir(kernel), peer, lane), block=True)
    try:
        yield sock
    finally:
        sock.close()


def hello(grant: dict) -> bytes:
    return protocol.encode(protocol.Hello(peer=grant["peer"], token=grant["token"], pid=os.getpid()))


def counter(status: dict, name: str) -> int:
    return status["counters"].get(name, 0)


def wait_counters(kernel, before: dict, deltas: dict[str, int]) -> dict:
    """Wait until each counter grew by at least its delta, then check it grew by exactly
    that much (the kernel handles raw sockets' messages asynchronously)."""
    st = kernel.wait_for(lambda s: all(counter(s, k) >= counter(before, k) + d for k, d in deltas.items()),
                         what=f"counters {deltas}")
    assert {k: counter(st, k) - counter(before, k) for k in deltas} == deltas
    return st


_req = iter(range(1_000_000, 2_000_000))


def assert_alive(kernel, link) -> None:
    """The kernel still answers the control channel, and a ping on each lane (which also
    proves that each of the link's lanes is authenticated)."""
    assert kernel.status()["kernel"]["pid"]
    for lane in ipc.LANES:
        req = next(_req)
        assert link.send(protocol.Ping(req=req, payload=b"alive"), lane)
        got, msg = link.recv(RECV_TIMEOUT)
        assert (got, type(msg), msg.req, msg.payload) == (lane, protocol.Pong, req, b"alive")


def check_undecodable(blobs: list[bytes], decode=protocol.decode) -> None:
    """Each blob is refused by the schema, as a MsgspecError (so expected counts are exact)."""
    for blob in blobs:
        with pytest.raises(msgspec.MsgspecError):
            decode(blob)


@contextmanager
def frozen(pid: int):
    """Stop a process (SIGSTOP) until the block ends: whatever is sent meanwhile is
    certainly waiting for it when it resumes."""
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + RECV_TIMEOUT
        while _state(pid) not in ("T", "t"):
            assert time.monotonic() < deadline, "the process did not stop"
            time.sleep(0.001)
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def collect_pongs(link, want: dict[Lane, int]) -> dict[Lane, list[protocol.Pong]]:
    got = {lane: [] for lane in ipc.LANES}
    while any(len(got[lane]) < n for lane, n in want.items()):
        item = link.recv(RECV_TIMEOUT)
        if item is None:
            break
        lane, msg = item
        assert isinstance(msg, protocol.Pong)
        got[lane].append(msg)
    return got


def recv_until(link, cls, req: int):
    """The next message of type ``cls`` answering ``req`` (nothing else is expected)."""
    item = link.recv(RECV_TIMEOUT)
    assert item is not None, f"no {cls.__name__} for req {req}"
    _, msg = item
    assert isinstance(msg, cls) and msg.req == req, msg
    return msg


# ---------------------------------------------------------------------------- 1. lanes


FLOOD = 10_000  # below LANE_CAP: every pong fits in the kernel's outbox toward the client
TOP_UP = 2_000
HIGH_BATCH = 50


def test_high_lane_overtakes_a_low_flood(kernel, link):
    """A LOW flood, then the kernel is stopped (SIGSTOP) while more LOW pings and then a
    HIGH batch are sent, then it resumes. A LOW send that is refused while the kernel is
    stopped proves the client's NNG buffer full: at least NNG_SEND_BUFFER LOW pings are
    then certainly queued ahead of every HIGH one, however fast or slow the machine, and
    the order of handling says which lane the kernel served first."""
    st0 = kernel.status()
    # Non-blocking: a LOW send is refused at once when NNG's buffer toward the kernel is full.
    sent_low = sum(link.send(protocol.Ping(req=i), Lane.LOW) for i in range(FLOOD))
    with frozen(st0["kernel"]["pid"]):
        refused = link.dropped
        sent_low += sum(link.send(protocol.Ping(req=FLOOD + i), Lane.LOW) for i in range(TOP_UP))
        lane_full = link.dropped > refused
        high_ok = sum(link.send(protocol.Ping(req=-1 - i), Lane.HIGH) for i in range(HIGH_BATCH))
    assert high_ok == HIGH_BATCH, "HIGH sends wait for room; none is refused"
    assert lane_full and link.dropped == FLOOD + TOP_UP - sent_low

    got = collect_pongs(link, {Lane.HIGH: HIGH_BATCH, Lane.LOW: sent_low})
    st = kernel.status()
    high, low = got[Lane.HIGH], got[Lane.LOW]
    assert sorted(p.req for p in high) == sorted(-1 - i for i in range(HIGH_BATCH))
    assert [p.req for p in low] == sorted(p.req for p in low) and len(low) == sent_low, "LOW is FIFO, none lost"
    low_orders = [p.order for p in low]
    assert low_orders == sorted(low_orders) and len(set(low_orders)) == len(low_orders)

    last_high = max(p.order for p in high)
    overtaken = sum(o > last_high for o in low_orders)
    assert all(p.order < low_orders[-1] for p in high), "every HIGH ping was handled before the LOW backlog drained"
    # The kernel drains HIGH after each LOW message it handles: only the few LOW messages
    # handled before NNG delivered the HIGH batch may come before it.
    assert overtaken >= ipc.NNG_SEND_BUFFER // 2, (overtaken, sent_low, sorted(p.order for p in high))
    print(f"LOW accepted {sent_low} of {FLOOD + TOP_UP}; {overtaken} handled after the last of "
          f"{HIGH_BATCH} HIGH (orders {min(p.order for p in high)}..{last_high}, last LOW {low_orders[-1]})")

    lanes = st["lanes"]
    assert lanes["HIGH"]["dropped"] == 0 and lanes["LOW"]["dropped"] == st0["lanes"]["LOW"]["dropped"]
    assert lanes["HIGH"]["handled"] - st0["lanes"]["HIGH"]["handled"] >= HIGH_BATCH
    assert lanes["LOW"]["handled"] - st0["lanes"]["LOW"]["handled"] >= sent_low
    assert lanes["LOW"]["queued"] == 0
    assert_alive(kernel, link)


# ---------------------------------------------------------------------------- 2. bounds


def _carried(data: bytes) -> list[bytes]:
    """What one NNG message from an outbox carried: a batch's items, or itself."""
    try:
        msg = protocol.decode(data)
    except msgspec.MsgspecError:
        return [data]
    return list(msg.items) if isinstance(msg, protocol.Batch) else [data]


def test_outbox_bounds_medium_and_low_and_never_drops_high(home):
    """Unit level, real sockets: a peer that is absent, then held, then reading."""
    run = paths.run_dir(home)
    cap, extra, nng = 5, 3, ipc.NNG_SEND_BUFFER
    outbox = ipc.Outbox(run, "p1", cap=cap)
    try:
        sent = {lane: [] for lane in ipc.LANES}

        def send(lane, n):
            for _ in range(n):
                data = b"%d" % len(sent[lane])
                sent[lane].append(data)
                outbox.send(data, lane)

        send(Lane.HIGH, 1)  # the first since the last flush leaves at once
        assert not any(outbox.pending.values())
        # The next ones wait for a flush; past ``cap`` MEDIUM and LOW drop the newest, HIGH never.
        for lane in ipc.LANES:
            send(lane, cap + extra)
        assert outbox.drops == {Lane.HIGH: 0, Lane.MEDIUM: extra, Lane.LOW: extra}
        assert {lane: len(q) for lane, q in outbox.pending.items()} == {
            Lane.HIGH: cap + extra, Lane.MEDIUM: cap, Lane.LOW: cap}
        want = {lane: sent[lane][:1 + cap + extra if lane is Lane.HIGH else cap] for lane in ipc.LANES}
        # With no peer, NNG's send buffer takes about ``nng`` messages: a flush puts each
        # lane's queue in one batch, then one message per flush fills the buffer up. (A
        # flush stops at the first lane it cannot empty, HIGH first: fill LOW first.)
        assert outbox.flush() and not any(outbox.pending.values())
        for lane in reversed(ipc.LANES):
            for taken in range(2 * nng):
                send(lane, 1)
                outbox.flush()
                if outbox.pending[lane]:
                    break
                want[lane].append(sent[lane][-1])
            assert nng // 2 < taken < 2 * nng, (lane, taken)
            send(lane, cap + extra)  # the socket is full: the outbox keeps ``cap`` (HIGH all)
            kept = cap + extra + 1 if lane is Lane.HIGH else cap
            assert list(outbox.pending[lane]) == sent[lane][-(cap + extra + 1):][:kept]
            want[lane] += outbox.pending[lane]
        assert outbox.drops == {Lane.HIGH: 0, Lane.MEDIUM: 2 * extra + 1, Lane.LOW: 2 * extra + 1}

        pulls = {lane: pynng.Pull0(recv_timeout=int(RECV_TIMEOUT * 1000)) for lane in ipc.LANES}
        for lane, sock in pulls.items():
            sock.dial(ipc.address(run, "p1", lane), block=True)
        try:
            received = {lane: [] for lane in ipc.LANES}
            deadline = time.monotonic() + RECV_TIMEOUT
            while received != want:
                assert time.monotonic() < deadline, {lane: len(r) for lane, r in received.items()}
                outbox.flush()
                for lane, sock in pulls.items():
                    while (msg := ipc.try_recv_msg(sock)) is not None:
                        received[lane] += _carried(msg.bytes)
                time.sleep(0.001)
            assert outbox.flush() and not any(outbox.pending.values())  # in order; the newest were the ones dropped

            outbox.held = True  # held: even HIGH waits in the kernel until released
            outbox.send(b"held", Lane.HIGH)
            assert not outbox.flush() and list(outbox.pending[Lane.HIGH]) == [b"held"]
            outbox.held = False
            assert outbox.flush()
            assert pulls[Lane.HIGH].recv() == b"held"
        finally:
            for sock in pulls.values():
                sock.close()
    finally:
        outbox.close()


@pytest.fixture
def bare_kernel(home):
    """A Kernel object in this process, with its real sockets and no services: the
    test drives its loop steps itself."""
    k = core.Kernel(home, paths.run_dir(home))
    try:
        yield k
    finally:
        k.shutdown()
        k.sel.close()
        os.close(k._wake_r)
        os.close(k._wake_w)


@pytest.mark.parametrize("lane", [Lane.MEDIUM, Lane.LOW], ids=["MEDIUM", "LOW"])
def test_inbound_queue_overflow_drops_newest_and_refuses_requests(bare_kernel, lane):
    """Inbound MEDIUM/LOW queues hold at most LANE_CAP messages; past it the newest is
    dropped and counted, and a KvPut/KvGet among them gets an error KvResult.

    A flood cannot fill them in a test: NNG hands the kernel's Pull socket one message
    at a time (its receive buffer is 1), so the queue grows by about one message per
    flooding peer each time the kernel handles one, and the backlog stays in the senders'
    buffers, where a non-blocking send is refused and counted (``PeerLink.dropped``). So
    the queue is filled here directly, and real messages arrive behind it."""
    k = bare_kernel
    grant = k.attach_client("t")
    client = ipc.PeerLink(Path(grant["run_dir"]), grant["peer"], grant["token"])
    try:
        deadline = time.monotonic() + RECV_TIMEOUT
        while not k.instances[grant["peer"]].connected:
            assert time.monotonic() < deadline, "the client's Hellos were not handled"
            k._pump()
            time.sleep(0.001)
        k.queues[lane].extend([(b"", 0)] * core.LANE_CAP)

        assert client.send(protocol.KvGet(req=1, key="a"), lane)
        assert client.send(protocol.KvPut(req=2, writes=[("a", b"1")]), lane)
        assert client.send(protocol.Ping(req=3), lane)
        assert client.send(protocol.Ping(req=4), Lane.HIGH)
        deadline = time.monotonic() + RECV_TIMEOUT
        while k.lane_drops[lane] < 3 or k.lane_handled[Lane.HIGH] < 1:
            assert time.monotonic() < deadline, k.lane_drops
            k._drain_high()
            k._fill(lane)
            k._flush()
            time.sleep(0.001)

        replies = {}
        for _ in range(3):
            got, msg = client.recv(RECV_TIMEOUT)
            replies[msg.req] = (got, msg)
        assert replies[4] == (Lane.HIGH, protocol.Pong(req=4, order=1)), "HIGH is served, the others full"
        for req in (1, 2):
            got, msg = replies[req]
            assert (got, type(msg), msg.ok) == (Lane.LOW, protocol.KvResult, False)
            assert "queue full" in msg.error
        assert client.recv(0.05) is None, "the dropped ping gets no answer"
        lanes = k.status()["lanes"]
        assert lanes[lane.name] == {"queued": core.LANE_CAP, "outbound_buffered": 0, "handled": 0, "dropped": 3}
        assert lanes["HIGH"]["dropped"] == 0
    finally:
        client.close()


def test_kernel_counts_outbound_drops_in_status(kernel):
    """Through the real kernel: a client that authenticated its LOW lane but never reads
    its replies. The kernel's outbox toward it fills (NNG's buffer, then LANE_CAP), then
    every further pong is dropped and counted; HIGH is untouched; detach frees it all."""
    grant = kernel.request(protocol.AttachReq(name="deaf"))
    extra = 300
    count = ipc.NNG_SEND_BUFFER + core.LANE_CAP + extra
    st0 = kernel.status()
    ping = protocol.encode(protocol.Ping(req=1))
    with raw_push(kernel, Lane.LOW, send_buffer=4096) as sock:
        sock.send(hello(grant))
        for _ in range(count):
            sock.send(ping)
        st = kernel.wait_for(lambda s: s["lanes"]["LOW"]["handled"] - st0["lanes"]["LOW"]["handled"] >= count,
                             timeout=120, what="the pings handled")
    low = st["lanes"]["LOW"]
    assert low["outbound_buffered"] == core.LANE_CAP
    assert low["dropped"] - st0["lanes"]["LOW"]["dropped"] == extra
    assert st["lanes"]["HIGH"]["dropped"] == 0
    kernel.request(protocol.DetachReq(peer=grant["peer"]))
    assert kernel.status()["lanes"]["LOW"]["outbound_buffered"] == 0


# ---------------------------------------------------------------------------- batches


def test_a_batch_is_cut_to_the_message_size_limit():
    small = [b"x" * 100] * (protocol.BATCH_MAX_ITEMS + 10)
    data, n = protocol.take_batch(collections.deque(small))
    assert n == protocol.BATCH_MAX_ITEMS and protocol.decode(data).items == small[:n]
    big = b"y" * (protocol.MAX_MESSAGE_BYTES // 3)
    queue = collections.deque([big, big, big, b"z"])
    data, n = protocol.take_batch(queue)
    assert n == 2 and len(data) <= protocol.MAX_MESSAGE_BYTES and protocol.decode(data).items == [big, big]
    assert list(queue) == [big, big, big, b"z"], "the caller removes what it sent"
    alone = b"w" * (protocol.MAX_MESSAGE_BYTES - 10)
    assert protocol.take_batch(collections.deque([alone, b"z"])) == (alone, 1), "too big to share: sent as it is"


def test_a_batch_is_handled_in_order_and_each_item_checked_alone(kernel):
    """A peer's batch: a Hello inside it binds the pipe for the items after it; a bad
    item and a batch inside the batch are counted and dropped alone."""
    grant = kernel.request(protocol.AttachReq(name="batch"))
    ping = lambda req: protocol.encode(protocol.Ping(req=req))
    nested = protocol.encode(protocol.Batch(items=[ping(90), ping(91)]))
    batch = protocol.encode(protocol.Batch(items=[hello(grant), ping(1), b"\xc1 not msgpack", ping(2), nested, ping(3)]))
    before = kernel.status()
    with raw_pull(kernel, grant["peer"], Lane.HIGH) as pull, raw_push(kernel, Lane.HIGH) as push:
        push.send(batch)
        got = []
        while len(got) < 3:
            got += [protocol.decode(data) for data in _carried(pull.recv())]
    assert got == [protocol.Pong(req=1, order=got[0].order), protocol.Pong(req=2, order=got[0].order + 1),
                   protocol.Pong(req=3, order=got[0].order + 2)]
    wait_counters(kernel, before, {"bad_messages": 2, "bad_schema": 2, "unauthenticated": 0})
    kernel.request(protocol.DetachReq(peer=grant["peer"]))


def test_a_peer_takes_high_before_the_rest_of_a_low_batch(home):
    """Unit level, real sockets: a kernel's outbox and inbox, and a peer's link."""
    run = paths.run_dir(home)
    inbox, outbox = ipc.Inbox(run), ipc.Outbox(run, "p1")
    link = ipc.PeerLink(run, "p1", "token")
    try:
        for req in (0, 1, 2, 3):  # 0 leaves at once, the others in one batch at the flush
            outbox.send(protocol.encode(protocol.Ping(req=req)), Lane.LOW)
        assert outbox.flush()
        assert link.recv(RECV_TIMEOUT) == (Lane.LOW, protocol.Ping(req=0))
        assert link.recv(RECV_TIMEOUT) == (Lane.LOW, protocol.Ping(req=1))  # 2 and 3 came with it
        outbox.send(protocol.encode(protocol.Ping(req=4)), Lane.HIGH)
        assert outbox.flush()
        assert link._ready.first(RECV_TIMEOUT * 1000) is Lane.HIGH  # it has arrived
        assert [link.recv(RECV_TIMEOUT) for _ in range(3)] == [
            (Lane.HIGH, protocol.Ping(req=4)), (Lane.LOW, protocol.Ping(req=2)), (Lane.LOW, protocol.Ping(req=3))]
        assert link.recv(0.01) is None
    finally:
        link.close()
        outbox.close()
        inbox.close()


# ---------------------------------------------------------------------------- 3. malformed


def _valid_samples() -> list[bytes]:
    return [protocol.encode(m) for m in (
        protocol.Hello(peer="c1test", token="0" * 32, pid=1),
        protocol.KvPut(req=1, writes=[("k", b"v"), ("gone", None)]),
        protocol.Ping(req=7, payload=b"abc"),
        protocol.ShmAlloc(req=1, size=4096),
    )]


def _wrong_types() -> list[bytes]:
    enc = msgspec.msgpack.encode
    return [enc(x) for x in (
        ["ping", "one", b""], ["ping"], ["ping", 1.5], ["ping", True], ["ping", 1, "not bytes"],
        ["hello", "Bad Peer!", "t", 1], ["hello", "c1test", "x" * 65, 1], ["hello", "c1test", "t", "pid"],
        ["shmalloc", 1, 0], ["shmalloc", 1, -5], ["kvput", 1, []], ["kvput", 1, [["k"]]],
        ["kvget", 1, ""], ["kvget", 1, "k" * (protocol.MAX_KEY + 1)],
        ["kvput", 1, [["k", b"v" * (protocol.MAX_VALUE + 1)]]], ["hb", "x"],
        {"t": "ping", "req": 1}, "ping", 42, None,
    )]


def _unknown_tags() -> list[bytes]:
    enc = msgspec.msgpack.encode
    return [enc(x) for x in (["nope", 1], ["PING", 1], [42, 1], [None], [], [b"ping", 1])]


DEEP = b"\x81\xa1a" * 100_000 + b"\xc0"  # {"a": {"a": ... None}}: past msgspec's recursion limit
# What msgspec raised as UnicodeDecodeError/RecursionError (not a MsgspecError) before
# kernel.protocol turned them into DecodeError; the first one killed the kernel.
ESCAPES = [
    b"\x92\xa4\xee\xee\xee\xee\x01",  # a tag that is not UTF-8
    b"\x93\xa5kvget\x01\xa2\xff\xfe",  # a key that is not UTF-8
    b"\x93\xa6report\x01" + DEEP,  # MonitorReport.report: dict[str, Any], nested too deep
]


def test_malformed_lane_messages_are_counted_and_survived(kernel, link):
    rng = random.Random(20240611)
    batches = {
        "random bytes": [rng.randbytes(rng.randint(0, 512)) for _ in range(300)],
        "truncated": [d[:i] for d in _valid_samples() for i in range(len(d))],
        "wrong types": _wrong_types(),
        "unknown tags": _unknown_tags(),
        "bad UTF-8, deep nesting": ESCAPES,
    }
    with raw_push(kernel, Lane.HIGH) as high, raw_push(kernel, Lane.MEDIUM) as medium, \
            raw_push(kernel, Lane.LOW) as low:
        for name, blobs in batches.items():
            check_undecodable(blobs)
            before = kernel.status()
            for i, blob in enumerate(blobs):
                (high, medium, low)[i % 3].send(blob)
            wait_counters(kernel, before, {"bad_messages": len(blobs), "bad_schema": len(blobs),
                                           "unauthenticated": 0, "handler_errors": 0})
            assert_alive(kernel, link)


def test_unauthenticated_and_unauthorized_messages_are_refused_and_counted(kernel, link):
    other = kernel.request(protocol.AttachReq(name="other"))
    other_link = ipc.PeerLink(Path(other["run_dir"]), other["peer"], other["token"])
    assert_alive(kernel, other_link)  # each of its lanes is now bound to its own pipe
    ping = protocol.encode(protocol.Ping(req=5))
    put = protocol.encode(protocol.KvPut(req=6, writes=[("stolen", b"x")]))
    wrong_token = protocol.encode(protocol.Hello(peer=other["peer"], token="f" * 32, pid=1))
    unknown_peer = protocol.encode(protocol.Hello(peer="c99nobody", token=other["token"], pid=1))
    attempts = [
        [ping, put],  # no Hello on this pipe
        [wrong_token, ping],
        [unknown_peer, ping],
        [hello(other), put],  # the right token, on a lane already bound to another pipe
    ]
    before = kernel.status()
    with ExitStack() as stack:  # sockets stay open until the kernel has read everything
        for lane in ipc.LANES:
            for messages in attempts:
                sock = stack.enter_context(raw_push(kernel, lane))
                for data in messages:
                    sock.send(data)
        wait_counters(kernel, before, {"unauthenticated": 2 * len(attempts) * 3, "bad_messages": 0})
    assert kernel.request(protocol.KvReq(get="stolen"))["value"] is None, "nothing was written"
    assert_alive(kernel, link)

    # An authenticated client may not do what only the kernel's own services may.
    before = kernel.status()
    assert link.send(protocol.Restart(service="storage", reason="client says so"), Lane.HIGH)
    assert link.send(protocol.GiveUp(service="scheduler", reason="client says so"), Lane.HIGH)
    assert link.send(protocol.Stop(), Lane.HIGH)  # kernel -> peer only
    assert link.send(protocol.JobDone(job_id="x", ok=True), Lane.HIGH)  # holds no job
    st = wait_counters(kernel, before, {"unauthorized": 2, "unexpected_messages": 2})
    assert {s["name"]: (s["restarts"], s["state"]) for s in st["services"]} == \
        {s["name"]: (s["restarts"], s["state"]) for s in before["services"]}
    assert_alive(kernel, link)
    assert_alive(kernel, other_link)
    detach(kernel.client, other_link)


def test_oversized_messages_are_refused(kernel, link):
    grant = kernel.request(protocol.AttachReq(name="big"))
    over = protocol.encode(protocol.Ping(req=1, payload=b"x" * protocol.MAX_MESSAGE_BYTES))
    assert protocol.MAX_MESSAGE_BYTES < len(over) <= ipc.INBOUND_RECV_MAX
    protocol.decode(over)  # valid but for its size
    huge = b"\x00" * (ipc.INBOUND_RECV_MAX + 1)
    with raw_pull(kernel, grant["peer"], Lane.LOW) as pull, raw_push(kernel, Lane.LOW) as sock:
        removed = []
        sock.add_post_pipe_remove_cb(lambda pipe: removed.append(pipe.id))
        sock.send(hello(grant))
        before = kernel.status()
        sock.send(over)
        sock.send(protocol.encode(protocol.Ping(req=2)))
        wait_counters(kernel, before, {"bad_oversized": 1, "bad_messages": 1, "unauthenticated": 0})
        pong = protocol.decode(pull.recv())
        assert isinstance(pong, protocol.Pong) and pong.req == 2, "the pipe survives a refused message"
        assert removed == []

        # Past the inbound sockets' limit NNG closes the pipe without reading the
        # message: the kernel cannot count it, and the sender's socket redials on a new
        # pipe that has not said Hello.
        before = kernel.status()
        sock.send(huge)
        sock.send(protocol.encode(protocol.Ping(req=3)))
        wait_counters(kernel, before, {"unauthenticated": 1, "bad_messages": 0})
        assert len(removed) == 1
    kernel.request(protocol.DetachReq(peer=grant["peer"]))
    assert_alive(kernel, link)


def test_control_channel_answers_malformed_requests_with_errors(kernel):
    rng = random.Random(7)
    enc = msgspec.msgpack.encode
    blobs = [rng.randbytes(rng.randint(0, 256)) for _ in range(50)] + [enc(x) for x in (
        {"op": "nope"}, {}, ["status"], "status", None,
        {"op": "ping-service", "service": "Bad!"}, {"op": "ping-service", "service": "scheduler", "count": 0},
        {"op": "ping-service", "service": "scheduler", "count": 10**6},
        {"op": "ping-service", "service": "scheduler", "lane": 7},
        {"op": "attach", "name": "UPPER"}, {"op": "log", "limit": -1}, {"op": "kv", "put": [["", b"x"]]},
        {"op": "kv", "get": 5}, {"op": "swap", "service": "scheduler"}, {"op": "task-add", "task": {}},
    )] + [
        b"\x81\xa2op\xa2\xff\xfe",  # an op that is not UTF-8: it used to kill a control thread
        b"\x82\xa2op\xa6status\xa1x" + DEEP,  # an unknown field nested too deep
    ]
    check_undecodable(blobs, protocol.decode_request)
    before = kernel.status()
    with pynng.Req0(recv_timeout=int(RECV_TIMEOUT * 1000), send_timeout=RAW_SEND_TIMEOUT_MS) as sock:
        sock.dial(paths.control_address(run_dir(kernel)), block=True)
        for blob in blobs:
            sock.send(blob)
            reply = protocol.decode_reply(sock.recv())
            assert isinstance(reply, protocol.ErrorReply) and reply.error.startswith("malformed request"), reply
        # a well-formed request that fails is an error too, but not a malformed one
        sock.send(protocol.encode(protocol.DetachReq(peer="nobody")))
        reply = protocol.decode_reply(sock.recv())
        assert isinstance(reply, protocol.ErrorReply) and "no such item" in reply.error
    st = kernel.status()
    assert counter(st, "bad_control_requests") - counter(before, "bad_control_requests") == len(blobs)
    assert counter(st, "control_errors") == counter(before, "control_errors")


# ---------------------------------------------------------------------------- 4. services


def test_kernel_service_round_trips_on_high_and_low(kernel):
    for lane in (Lane.HIGH, Lane.LOW):
        out = kernel.request(protocol.PingServiceReq(service="scheduler", count=200, lane=lane))
        assert out["service"] == "scheduler" and out["lane"] == lane.name and out["count"] == 200
        assert 0 < out["median_us"] <= out["p99_us"] and out["mean_us"] > 0
    for service in ("storage", "monitor", "rs"):
        assert kernel.request(protocol.PingServiceReq(service=service, count=20))["count"] == 20
    with pytest.raises(LughError, match="not up"):
        kernel.request(protocol.PingServiceReq(service="nosuch", count=1))


# ---------------------------------------------------------------------------- 5. storage


def test_storage_through_ipc(kernel, link):
    first = kernel.request(protocol.KvReq(put=[("k1", b"v1"), ("k2", b"v2")]))
    assert first["commit"] > 0
    assert kernel.request(protocol.KvReq(get="k1"))["value"] == b"v1"
    assert kernel.request(protocol.KvReq(get="k2"))["value"] == b"v2"
    assert kernel.request(protocol.KvReq(get="never"))["value"] is None
    second = kernel.request(protocol.KvReq(put=[("k2", None)]))  # None deletes
    assert second["commit"] > first["commit"]
    assert kernel.request(protocol.KvReq(get="k2"))["value"] is None
    with pytest.raises(LughError, match=r"keys under \.lugh/ are reserved"):
        kernel.request(protocol.KvReq(put=[("ok", b"1"), (".lugh/applied_seq", b"0")]))
    assert kernel.request(protocol.KvReq(get="ok"))["value"] is None, "a refused transaction writes nothing"

    # the same store, from an attached client on the lanes
    assert link.send(protocol.KvPut(req=11, writes=[("c", b"x"), ("d", b"y")]), Lane.MEDIUM)
    put = recv_until(link, protocol.KvResult, 11)
    assert put.ok and put.commit > 0 and put.origin == link.peer and put.error == ""

    # A client cannot pose as the control channel or another peer: the kernel sets origin.
    assert link.send(protocol.KvGet(req=12, key="c", origin="ctl:1"), Lane.LOW)
    got = recv_until(link, protocol.KvResult, 12)
    assert got.ok and got.value == b"x" and got.origin == link.peer

    assert link.send(protocol.KvPut(req=13, writes=[(".lugh/applied_seq", b"0")]), Lane.HIGH)
    refused = recv_until(link, protocol.KvResult, 13)
    assert not refused.ok and refused.error == "reserved key"
    assert link.send(protocol.KvGet(req=14, key=".lugh/applied_seq"), Lane.HIGH)
    assert recv_until(link, protocol.KvResult, 14).error == "reserved key"
    assert kernel.request(protocol.KvReq(get="d"))["value"] == b"y"
    assert put.commit > second["commit"]


# ---------------------------------------------------------------------------- 6. shm


def test_shared_memory_regions_are_granted_private_and_reclaimed(kernel):
    st0 = kernel.status()
    budget = kernel.service("storage")["memory_budget"]
    owner = attach(kernel.client, "shm")
    other = attach(kernel.client, "other")
    try:
        assert owner.send(protocol.ShmAlloc(req=1, size=4096), Lane.MEDIUM)
        grant = recv_until(owner, protocol.ShmGranted, 1)
        assert grant.error == "" and grant.size == 4096 and grant.name
        path = SHM_DIR / grant.name
        info = path.stat()
        assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.getuid() and info.st_size == 4096
        st = kernel.status()
        assert st["memory"]["regions"] == 1 and st["memory"]["region_bytes"] == 4096

        # Too big: more than half the budget is refused, and nothing is created.
        assert owner.send(protocol.ShmAlloc(req=2, size=budget // 2 + 1), Lane.MEDIUM)
        refused = recv_until(owner, protocol.ShmGranted, 2)
        assert refused.name == "" and "half its budget" in refused.error

        # A region is freed only by its owner.
        before = kernel.status()
        assert other.send(protocol.ShmFree(name=grant.name), Lane.MEDIUM)
        wait_counters(kernel, before, {"unexpected_messages": 1})
        assert path.exists()

        assert owner.send(protocol.ShmAlloc(req=3, size=8192), Lane.MEDIUM)
        second = recv_until(owner, protocol.ShmGranted, 3)
        assert owner.send(protocol.ShmFree(name=second.name), Lane.MEDIUM)
        kernel.wait_for(lambda s: s["memory"]["regions"] == 1, what="the freed region")
        assert not (SHM_DIR / second.name).exists()
    finally:
        detach(kernel.client, other)
        detach(kernel.client, owner)
    st = kernel.status()
    assert not path.exists(), "a detached client's regions are unlinked"
    assert st["memory"]["regions"] == 0 and st["memory"]["region_bytes"] == 0
    assert st["memory"]["reclaimed"] - st0["memory"]["reclaimed"] == 1
    assert not list(run_dir(kernel).glob(f"{owner.peer}.?")), "its endpoints are gone"
