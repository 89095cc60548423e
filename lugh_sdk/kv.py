"""The storage service for tasks, services and attached clients, over the kernel's lanes.

    from lugh_sdk.client import KernelClient
    from lugh_sdk.kv import KvClient

    with KernelClient(home) as kernel, KvClient.attach(kernel, "gateway") as kv:
        kv.put("config/feeder-7/limit", b"420")          # control: HIGH lane, waits for the commit
        kv.record("grid/voltage/f7", 229.7)               # a sensor reading: LOW lane, does not wait
        with kv.transaction() as txn:                     # all or nothing
            txn.put("breaker/7", b"open")
            txn.delete("alarm/7")
        for key, value in kv.scan("grid/voltage/"):
            ...

Lanes: **sensor readings go on the LOW lane** (many and small; they must never delay
anything else), **control data on HIGH** (configuration, commands, set-points); every
call takes ``lane=`` to choose otherwise. A write's answer means it is durable (its
``commit`` sequence number is returned); an error means it was not applied. A request
that gets no answer within ``timeout`` raises: the write was then applied entirely or
not at all, never in part. Reads are retried while the storage service restarts; writes
never are (the kernel already delivers them once the service is back).

Inputs are checked here against the kernel's limits (key length, value size, writes per
transaction), so a bad one raises ValueError at once instead of being dropped at the
kernel's door.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

import msgspec

from kernel import protocol
from kernel.protocol import Lane, MAX_KEY, MAX_MESSAGE_BYTES, MAX_VALUE, RESERVED_KEY_PREFIX
from lugh_sdk.api.types import StorageError

READINGS = Lane.LOW
CONTROL = Lane.HIGH
MAX_WRITES = 1024  # per message (a transaction may take several)
# A read unanswered this long is sent again (it went to a storage instance that died);
# the wait doubles each time up to READ_ATTEMPT_MAX. Reads are idempotent.
READ_ATTEMPT, READ_ATTEMPT_MAX = 0.25, 2.0


def check_writes(writes) -> list[tuple[str, bytes | None]]:
    """Validate writes (a dict or (key, value) pairs; None deletes) against the limits."""
    items = list(writes.items() if isinstance(writes, dict) else writes)
    if len(items) > MAX_WRITES:
        raise ValueError(f"{len(items)} writes in one message; at most {MAX_WRITES} (use a transaction)")
    size = 0
    for key, value in items:
        check_key(key)
        if value is not None:
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise ValueError(f"value of {key!r} must be bytes or None, not {type(value).__name__}")
            if len(value) > MAX_VALUE:
                raise ValueError(f"value of {key!r} is {len(value)} bytes; at most {MAX_VALUE}")
            size += len(value)
        size += len(key.encode()) + 16
    if size > MAX_MESSAGE_BYTES - 4096:
        raise ValueError(f"the writes take {size} bytes; one message carries at most about {MAX_MESSAGE_BYTES - 4096}")
    return [(k, None if v is None else bytes(v)) for k, v in items]


def check_key(key) -> None:
    if not isinstance(key, str):
        raise ValueError(f"key must be str, not {type(key).__name__}")
    if not key or len(key) > MAX_KEY:
        raise ValueError(f"key must have 1 to {MAX_KEY} characters, not {len(key)}")
    if key.startswith(RESERVED_KEY_PREFIX):
        raise ValueError(f"keys under {RESERVED_KEY_PREFIX} are reserved")


class KvClient:
    """Storage requests over one lane link (``kernel.ipc.PeerLink``). Not thread-safe:
    one client per thread. Messages on the link that are not storage answers are kept in
    ``other``."""

    def __init__(self, link, *, timeout: float = 30.0):
        self.link = link
        self.timeout = timeout
        self._req = itertools.count(1)
        self._txn = itertools.count(1)
        self._answers: dict[int, protocol.KvResult] = {}
        self.other: list = []
        self._detach = None

    @classmethod
    def attach(cls, kernel_client, name: str, **kw) -> "KvClient":
        """Attach to the kernel's lanes as an external client; ``close`` detaches."""
        from lugh_sdk.client import attach, detach

        link = attach(kernel_client, name)
        kv = cls(link, **kw)
        kv._detach = lambda: detach(kernel_client, link)
        return kv

    def close(self) -> None:
        if self._detach is not None:
            self._detach()
        else:
            self.link.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---------------------------------------------------------------- messages

    def send(self, msg, lane: Lane) -> int:
        """Send a storage request (its ``req`` is set here); returns the req to wait on."""
        req = next(self._req)
        if not self.link.send(msgspec.structs.replace(msg, req=req), lane):
            raise StorageError("the kernel's lane is full: the request was not sent")
        return req

    def wait(self, req: int, timeout: float | None = None) -> protocol.KvResult:
        """The answer to ``req``, ok or not; StorageError when none comes in time."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while req not in self._answers:
            left = deadline - time.monotonic()
            item = self.link.recv(max(0.0, left)) if left > 0 else None
            if item is None:
                raise StorageError(f"no answer from the storage service within {timeout:g} s (a write is then "
                                   f"applied entirely or not at all)")
            msg = item[1]
            if isinstance(msg, protocol.KvResult):
                self._answers[msg.req] = msg
            else:
                self.other.append(msg)
        return self._answers.pop(req)

    def call(self, msg, lane: Lane, *, read: bool = False) -> protocol.KvResult:
        """Send and wait; raise StorageError if the answer is an error. A read is sent
        again while the service restarts."""
        deadline = time.monotonic() + self.timeout
        attempt = READ_ATTEMPT
        while True:
            req = self.send(msg, lane)
            left = deadline - time.monotonic()
            try:
                result = self.wait(req, min(attempt, left) if read else left)
            except StorageError:
                if read and time.monotonic() < deadline:
                    attempt = min(2 * attempt, READ_ATTEMPT_MAX)
                    continue
                raise
            if result.ok:
                return result
            if read and "restarting" in result.error and time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            raise StorageError(result.error)

    # ---------------------------------------------------------------- the API

    def get(self, key: str, *, lane: Lane = CONTROL) -> bytes | None:
        check_key(key)
        return self.call(protocol.KvGet(req=0, key=key), lane, read=True).value

    def write(self, writes, *, lane: Lane = CONTROL) -> int:
        """One transaction of writes ({key: value or None}); returns its commit number."""
        return self.call(protocol.KvPut(req=0, writes=check_writes(writes)), lane).commit

    def put(self, key: str, value: bytes, *, lane: Lane = CONTROL) -> int:
        return self.write([(key, value)], lane=lane)

    def delete(self, key: str, *, lane: Lane = CONTROL) -> int:
        return self.write([(key, None)], lane=lane)

    def record(self, key: str, value, *, lane: Lane = READINGS) -> int:
        """A sensor reading (bytes, or a number or text, stored as text): sent on the LOW
        lane without waiting; returns the req, for ``wait`` if the caller wants the commit."""
        if not isinstance(value, (bytes, bytearray, memoryview)):
            value = str(value).encode()
        return self.send(protocol.KvPut(req=0, writes=check_writes([(key, value)])), lane)

    def scan(self, prefix: str = "", *, page: int = 1000, lane: Lane = CONTROL) -> Iterator[tuple[str, bytes]]:
        """Every committed pair whose key starts with ``prefix``, in key order, a page per
        request (each page is consistent in itself)."""
        after = ""
        while True:
            result = self.call(protocol.KvScan(req=0, prefix=prefix, after=after, limit=page), lane, read=True)
            yield from result.items
            if not result.more:
                return
            after = result.info["after"]

    def stats(self, *, lane: Lane = CONTROL) -> dict:
        return self.call(protocol.KvInfo(req=0, what="stats"), lane, read=True).info

    def transaction(self, *, lane: Lane = CONTROL) -> "Transaction":
        return Transaction(self, next(self._txn), lane)


class Transaction:
    """An interactive transaction: begin, writes, then commit or abort. Writes are sent as
    they are made, unanswered; ``commit`` waits for the one answer, which reports whatever
    went wrong earlier (nothing of a failed transaction is applied). As a context manager
    it commits on success and aborts on an exception.
    The storage service aborts a transaction idle for its timeout (10 s by default), and
    one still open when the service restarts or is swapped: its commit then raises and
    nothing of it is applied."""

    def __init__(self, kv: KvClient, txn: int, lane: Lane):
        self.kv, self.txn, self.lane = kv, txn, lane
        self._op("begin")
        self.commit_seq: int | None = None

    def _op(self, op: str, writes=()) -> int:
        return self.kv.send(protocol.KvTxn(req=0, txn=self.txn, op=op, writes=writes), self.lane)

    def write(self, writes) -> None:
        self._op("write", check_writes(writes))

    def put(self, key: str, value: bytes) -> None:
        self.write([(key, value)])

    def delete(self, key: str) -> None:
        self.write([(key, None)])

    def commit(self) -> int:
        result = self.kv.wait(self._op("commit"))
        if not result.ok:
            raise StorageError(result.error)
        self.commit_seq = result.commit
        return result.commit

    def abort(self) -> None:
        self._op("abort")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
        else:
            self.abort()
