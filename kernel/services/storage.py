"""Storage service: a transactional key-value store hosted as a storage plugin.

What it guarantees (docs/storage.md has the whole contract):

- **Durable before acknowledged, group commit.** Transactions that arrive together are
  committed in one ``storage_commit_group`` call, one sync for all of them, each with its
  own sequence number; each is acknowledged only after that call returns. The more
  writers wait, the larger the groups: durable throughput grows with load.
- **Exactly once across crashes.** The service stream position (the kernel's numbering
  of what it sent here) is written in the same atomic unit as the commits it covers,
  under a reserved key; after a crash the kernel replays exactly what was not committed.
  The numbering belongs to one kernel's lifetime (a rebooted kernel starts again at 1,
  with an empty replay log), so the position is stored with the kernel's identity and
  counts only for that same kernel.
  Every answer to a streamed request is either kept with the group commit that covers
  the request's position (the answers of the last ``RESEND_GROUPS`` groups are kept, and
  sent again at start, to the same kernel only) or its request is replayed: a crash
  between commit and answer leaves no client waiting in vain. (NNG sends from a queue in
  the process, so "sent" is not "delivered" when the process is killed; duplicates are
  harmless, a client ignores an answer it is not waiting for.)
- **Never serve a damaged data set.** The backend refuses a corrupt file at open; beside
  the data set the service keeps a commit marker (the highest commit it acknowledged),
  so a data set that went backwards (a truncated WAL, a file replaced by an old copy) is
  refused too, with a clear error in `lugh status`.
- Interactive transactions (``KvTxn``) are staged in the backend until commit; one idle
  for ``TXN_TIMEOUT`` (its client died, say) is aborted. Only the commit is answered,
  with whatever went wrong before it. They live in this process: a restart or a live
  swap aborts those still open (their commit is refused, nothing of them is applied).

The backend may implement plugin API 1.0 only (``storage_commit``): the service then
stages transactions itself, commits a group as one 1.0 commit (one sequence number for
the group) and refuses scans, history, rollback and swaps with a clear error.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from kernel import protocol
from kernel.protocol import Lane, RESERVED_KEY_PREFIX
from kernel.services.loop import BusyBeat, not_busy, report_error
from lugh_sdk.api.storage_base import StagedTransactions, Writes
from lugh_sdk.api.types import StorageError

POSITION_KEY = RESERVED_KEY_PREFIX + "applied_seq"
ACKS_KEY = RESERVED_KEY_PREFIX + "last_acks"
MARKER_NAME = ".lugh-commit-marker"

BATCH_MAX = 256  # transactions in one group commit
RESEND_GROUPS = 4  # the answers of this many last group commits are kept for a restart
BATCH_BYTES = 8 << 20
SCAN_REPLY_BYTES = 512 * 1024  # a scan page stays well under the 1 MiB message limit
VALUE_SHOWN = 1024  # versions show at most this much of each value
MAX_OPEN_TXNS = 1024
MAX_TXNS_PER_CLIENT = 64
TXN_MAX_WRITES = 16_384
TXN_MAX_BYTES = 16 << 20


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


TXN_TIMEOUT = _env_float("LUGH_STORAGE_TXN_TIMEOUT", 10.0)  # an idle open transaction is aborted
HISTORY_KEEP = int(_env_float("LUGH_STORAGE_HISTORY", 100_000))  # commits whose before-images are kept


def kernel_identity() -> str:
    """The kernel this process serves: its pid and start time (pids are reused)."""
    ppid = os.getppid()
    try:
        with open(f"/proc/{ppid}/stat") as f:
            start = f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        start = "?"
    return f"{ppid}:{start}"


_answers = msgspec.msgpack.Encoder()
_answers_decoder = msgspec.msgpack.Decoder(tuple[str, list[tuple[int, protocol.KvResult]]])


class _Legacy(StagedTransactions):
    """Transactions for a backend of plugin API 1.0: staged here, a group applied as
    one ``storage_commit`` (one sequence number for the whole group)."""

    def __init__(self, hook):
        super().__init__()
        self.hook = hook

    def apply_group(self, groups: list[tuple[str, Writes]], bookkeeping: dict[str, bytes]) -> list[int]:
        writes = [w for _, staged in groups for w in staged.items()] + list(bookkeeping.items())
        seq = self.hook.storage_commit(writes=writes)
        return [seq] * len(groups)


class Backend:
    """The plugin's hooks, and which groups of plugin API 1.1 it implements."""

    def __init__(self, hook):
        self.hook = hook
        has = lambda *names: all(getattr(hook, n).get_hookimpls() for n in names)
        self.transactions = has("storage_begin", "storage_put", "storage_delete", "storage_abort",
                                "storage_commit_group")
        self.scan = has("storage_scan")
        self.versions = has("storage_history", "storage_versions", "storage_as_of")
        self.compact = has("storage_compact")
        self.handover = has("storage_export", "storage_import")
        # The same keyword calls reach the plugin (1.1) or the staging above (1.0).
        self.tx = hook if self.transactions else _Legacy(hook)
        # The position without the counts (1.3), or all of the stats.
        self.position = hook.storage_position if has("storage_position") else hook.storage_stats

    def need(self, capability: str, what: str) -> None:
        if not getattr(self, capability):
            raise StorageError(f"the storage backend does not implement {what} (plugin API 1.1)")


class CommitMarker:
    """The highest commit this data set has acknowledged, in a file beside it. Written
    after each commit without fsync: it is a lower bound, so it never accuses a sound
    data set, and a process crash keeps it (page cache)."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def check(self, last_seq: int) -> None:
        try:
            marked = int(self.path.read_text().strip() or 0)
        except FileNotFoundError:
            return
        except (OSError, ValueError):
            marked = 0
        if last_seq < marked:
            raise StorageError(
                f"the data set in {self.path.parent} ends at commit {last_seq}, but commit {marked} was "
                f"acknowledged from it: it is truncated or an older copy; refusing to serve it "
                f"(if you restored a backup on purpose, delete {self.path})")

    def write(self, seq: int) -> None:
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            os.pwrite(self._fd, b"%020d\n" % seq, 0)
        except OSError:
            pass  # best effort (a full disk): the check is only a lower bound

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass
class Pending:
    """A transaction waiting for the next group commit."""
    txn: int  # the backend's transaction number
    req: int
    origin: str
    lane: Lane
    seq: int  # the stream seq of the request
    label: str
    info: dict = field(default_factory=dict)


@dataclass
class OpenTxn:
    txn: int
    last_used: float
    writes: int = 0
    bytes: int = 0


def prepare_standby(hook, args) -> dict:
    """A hot standby checks the data set while it waits (``storage_check``, plugin API
    1.2), so that the open at its promotion need not: the check reads the whole data set
    (sqlite-storage, 200 000 keys, 26 MB: 50 ms warm, 290 ms cold), the rest of an open
    is a few milliseconds. A backend without the hook checks at the open, as before.
    Returns the :class:`Server`'s extra arguments."""
    if not hook.storage_check.get_hookimpls():
        return {}
    hook.storage_check(path=str(args.data_dir))
    return {"checked_ahead": True}


class Server:
    def __init__(self, hook, stream, args, checked_ahead: bool = False):
        began = time.monotonic()
        self.hook = hook
        self.backend = Backend(hook)
        self.stream = stream
        stream.durable_acks = True
        self.data_dir: Path = args.data_dir
        self.data_dir.mkdir(parents=True, exist_ok=True)
        hook.storage_open(path=str(self.data_dir))
        stats = self.backend.position() or {}
        self.durable = stats.get("durable", True)
        self.last_seq = int(stats.get("last_seq", 0))
        self.horizon = int(stats.get("horizon", 0))
        self.marker = CommitMarker(self.data_dir / MARKER_NAME)
        if self.durable:
            self.marker.check(self.last_seq)
        self.kernel = kernel_identity()
        stream.applied = stream.acked = self._position()
        self.recent: deque[list] = deque(maxlen=RESEND_GROUPS)  # answers kept, per group
        self.startup = self._unanswered()
        if self.startup:
            self.recent.append([(r, lane) for r, lane in self.startup])
        self.batch: list[Pending] = []
        self.batch_bytes = 0
        self.txns: dict[tuple[str, int], OpenTxn] = {}
        self.ended: OrderedDict[tuple[str, int], str] = OrderedDict()  # why recent transactions ended
        self.ids = itertools.count(1)
        self.pending_export: protocol.ExportData | None = None
        self.unpersisted: list = []  # answers to streamed requests, kept with the next group
        self.counters = {"groups": 0, "transactions": 0, "failed_groups": 0, "txn_timeouts": 0, "resent_acks": 0}
        self.busy = not_busy
        self.next_check = 0.0
        # `lugh kv stats`: what this incarnation's open took, and whether its data set
        # had been checked ahead (a hot standby) rather than by the open itself
        self.opened = {"open_ms": round((time.monotonic() - began) * 1000, 2), "checked_ahead": checked_ahead}

    def bind(self, link) -> None:
        self.busy = BusyBeat(link, self.stream, period=0.1)

    # ---------------------------------------------------------------- dispatch

    def handle(self, msg, lane: Lane = Lane.LOW) -> list:
        try:
            replies = self._dispatch(msg, lane)
        except Exception as exc:  # a request that fails is answered, never fatal
            self.stream.errors += 1
            if not isinstance(exc, StorageError):
                report_error(type(msg).__name__, exc)
            if isinstance(msg, protocol.KV_REQUESTS):
                replies = [(self._result(msg, ok=False, error=str(exc)), lane)]
            else:
                replies = [(protocol.Done(req=getattr(msg, "req", 0), ok=False, error=str(exc)), lane)]
        if isinstance(msg, protocol.KV_STREAMED):
            # An answer given now (no commit number: a refusal, a compaction...) is kept
            # with the next group, which moves the position past its request.
            self.unpersisted += [(r, lane) for r, lane in replies if r.seq == msg.seq and not r.commit]
        if isinstance(msg, (*protocol.KV_STREAMED, protocol.ExportData)):
            replies = self._then_export(replies)
        return replies

    def _dispatch(self, msg, lane: Lane) -> list:
        if isinstance(msg, protocol.KvPut):
            return self._put(msg, lane)
        if isinstance(msg, protocol.KvTxn):
            return self._txn(msg, lane)
        if isinstance(msg, protocol.KvAdmin):
            return self._admin(msg, lane)
        if isinstance(msg, protocol.ExportData):
            self.pending_export = msg
            return []
        if isinstance(msg, protocol.KvGet):
            reply = self._result(msg, value=self.hook.storage_get(key=msg.key))
        elif isinstance(msg, protocol.KvScan):
            reply = self._scan(msg)
        elif isinstance(msg, protocol.KvInfo):
            reply = self._info(msg)
        elif isinstance(msg, protocol.ImportData):
            reply = self._import(msg)
        elif isinstance(msg, protocol.HealthCheck):
            reply = self._health(msg)
        else:
            return []
        return [(reply, lane)]

    def _result(self, msg, **kw) -> protocol.KvResult:
        return protocol.KvResult(req=msg.req, origin=msg.origin, seq=getattr(msg, "seq", 0), **kw)

    # ---------------------------------------------------------------- writes

    def _put(self, msg: protocol.KvPut, lane: Lane):
        txn = next(self.ids)
        self.backend.tx.storage_begin(txn=txn)
        try:
            size = self._stage(txn, msg.writes)
        except Exception:
            self.backend.tx.storage_abort(txn=txn)
            raise
        return self._enqueue(Pending(txn, msg.req, msg.origin, lane, msg.seq, msg.origin), size)

    def _stage(self, txn: int, writes) -> int:
        size = 0
        for key, value in writes:
            if value is None:
                self.backend.tx.storage_delete(txn=txn, key=key)
            else:
                self.backend.tx.storage_put(txn=txn, key=key, value=value)
                size += len(value)
            size += len(key)
        return size

    def _enqueue(self, pending: Pending, size: int) -> list:
        self.batch.append(pending)
        self.batch_bytes += size
        return []

    def _txn(self, msg: protocol.KvTxn, lane: Lane):
        """Only a commit is answered; what goes wrong before it ends the transaction and
        is said in the commit's answer."""
        key = (msg.origin, msg.txn)
        open_txn = self.txns.get(key)
        if msg.op == "begin":
            mine = sum(1 for origin, _ in self.txns if origin == msg.origin)
            if open_txn is not None:
                self._end(key, "aborted: begun twice")
            elif len(self.txns) >= MAX_OPEN_TXNS or mine >= MAX_TXNS_PER_CLIENT:
                self._ended(key, f"refused at begin: too many open transactions ({mine} of this client, "
                                 f"{len(self.txns)} in all; at most {MAX_TXNS_PER_CLIENT} and {MAX_OPEN_TXNS})")
            else:
                txn = next(self.ids)
                self.backend.tx.storage_begin(txn=txn)
                self.txns[key] = OpenTxn(txn, time.monotonic())
                self.ended.pop(key, None)
            return []
        if msg.op == "abort":
            if open_txn is not None:
                self._end(key, "aborted by its client")
            return []
        if open_txn is None:
            if msg.op == "write":
                return []
            why = self.ended.get(key, "never begun, or lost when the storage service restarted or was swapped")
            raise StorageError(f"transaction {msg.txn} is not open ({why}); nothing of it was applied")
        open_txn.last_used = time.monotonic()
        if msg.op == "write":
            try:
                size = self._stage(open_txn.txn, msg.writes)
                open_txn.writes += len(msg.writes)
                open_txn.bytes += size
                if open_txn.writes > TXN_MAX_WRITES or open_txn.bytes > TXN_MAX_BYTES:
                    raise StorageError(f"too large: more than {TXN_MAX_WRITES} writes or {TXN_MAX_BYTES >> 20} MiB")
            except Exception as exc:
                self._end(key, f"aborted: {exc}")
            return []
        del self.txns[key]  # commit
        return self._enqueue(Pending(open_txn.txn, msg.req, msg.origin, lane, msg.seq, msg.origin), open_txn.bytes)

    def _end(self, key, why: str) -> None:
        self.backend.tx.storage_abort(txn=self.txns.pop(key).txn)
        self._ended(key, why)

    def _ended(self, key, why: str) -> None:
        self.ended[key] = why
        while len(self.ended) > 4096:
            self.ended.popitem(last=False)

    @property
    def batch_full(self) -> bool:
        return len(self.batch) >= BATCH_MAX or self.batch_bytes >= BATCH_BYTES

    def flush(self, position: int | None = None):
        """Group commit: every waiting transaction, the stream position (``position``,
        default: all applied) and their acknowledgements, in one atomic, durable unit."""
        if not self.batch:
            return []
        batch, self.batch, self.batch_bytes = self.batch, [], 0
        position = self.stream.applied if position is None else position
        expected = [self.last_seq + i + 1 for i in range(len(batch))] if self.backend.transactions else [0] * len(batch)
        acks = [(protocol.KvResult(req=p.req, origin=p.origin, seq=p.seq, commit=s, info=p.info), p.lane)
                for p, s in zip(batch, expected)]
        answers = [(r, lane) for r, lane in self.unpersisted + acks if r.seq <= position]
        try:
            with self.busy():
                seqs = self.backend.tx.storage_commit_group(
                    txns=[p.txn for p in batch], labels=[p.label for p in batch],
                    bookkeeping=self._bookkeeping(position, [*itertools.chain(*self.recent), *answers]))
        except Exception as exc:
            # Nothing was applied and nothing is acknowledged: each client is told why
            # (e.g. disk full) and decides; a failed commit is never retried behind its back.
            for p in batch:
                self.backend.tx.storage_abort(txn=p.txn)
            self.stream.errors += 1
            self.counters["failed_groups"] += 1
            report_error("commit", exc)
            error = f"not committed: {exc}"
            refused = [(protocol.KvResult(req=p.req, origin=p.origin, seq=p.seq, ok=False, error=error), p.lane)
                       for p in batch]
            self.unpersisted += refused
            return refused
        self.stream.acked = position
        self.recent.append(answers)
        self.unpersisted = [(r, lane) for r, lane in self.unpersisted if r.seq > position]
        self.counters["groups"] += 1
        self.counters["transactions"] += len(batch)
        self._committed(max(seqs))
        return [(protocol.KvResult(req=p.req, origin=p.origin, seq=p.seq, commit=s, info=p.info), p.lane)
                for p, s in zip(batch, seqs)]

    def _bookkeeping(self, position: int, answers: list) -> dict[str, bytes]:
        """The stream position and the recent answers it covers, for this kernel."""
        answers = [(int(lane), r) for r, lane in answers]
        return {POSITION_KEY: f"{position} {self.kernel}".encode(), ACKS_KEY: _answers.encode([self.kernel, answers])}

    def _position(self) -> int:
        """The stream position stored with the data set, if this same kernel numbered it
        (else 0: a new kernel's stream starts from the beginning)."""
        raw = (self.hook.storage_get(key=POSITION_KEY) or b"").decode(errors="replace").split()
        return int(raw[0]) if len(raw) == 2 and raw[1] == self.kernel and raw[0].isdigit() else 0

    def _committed(self, last_seq: int) -> None:
        self.last_seq = max(self.last_seq, last_seq)
        if self.durable:
            self.marker.write(self.last_seq)

    def _unanswered(self) -> list:
        """The acknowledgements of the last group commit, if it was made for this same
        kernel: the previous incarnation may have died before sending them."""
        raw = self.hook.storage_get(key=ACKS_KEY)
        try:
            kernel, answers = _answers_decoder.decode(raw) if raw else ("", [])
        except (msgspec.MsgspecError, ValueError):
            return []
        if kernel != self.kernel:
            return []
        return [(msgspec.structs.replace(r, info={**r.info, "resent": True}), Lane(lane)) for lane, r in answers]

    def _then_export(self, replies: list) -> list:
        """Answer a pending ExportData once the stream is applied through its mark."""
        msg = self.pending_export
        if msg is None or self.stream.applied < msg.through:
            return replies
        self.pending_export = None
        replies = replies + self.flush()
        try:
            self.backend.need("handover", "storage_export/storage_import, needed to hand the data set over")
            with self.busy():
                out = self.hook.storage_export(path=msg.path)
            done = protocol.Handover(req=msg.req, applied_seq=self.stream.applied, commit=out["last_seq"],
                                     keys=out["keys"])
        except Exception as exc:
            self.stream.errors += 1
            done = protocol.Handover(req=msg.req, ok=False, error=f"export failed: {exc}")
        return replies + [(done, Lane.HIGH)]

    def _admin(self, msg: protocol.KvAdmin, lane: Lane) -> list:
        if msg.op == "compact":
            self.backend.need("compact", "storage_compact")
            with self.busy():
                out = self.hook.storage_compact(keep=msg.keep)
            self.horizon = out["horizon"]
            return [(self._result(msg, info=out), lane)]
        self.backend.need("versions", "history and rollback (storage_history/versions/as_of)")
        # What came before the rollback commits before it, with the position just
        # before it: a crash in between replays the rollback alone.
        replies = self.flush(position=msg.seq - 1)
        with self.busy():
            writes = self.hook.storage_as_of(seq=msg.to_seq)
        if not writes:
            return replies + [(self._result(msg, info={"restored": 0, "to": msg.to_seq}), lane)]
        txn = next(self.ids)
        self.backend.tx.storage_begin(txn=txn)
        with self.busy():
            self._stage(txn, writes)
        label = msg.label or f"rollback to {msg.to_seq}"
        self._enqueue(Pending(txn, msg.req, msg.origin, lane, msg.seq, label,
                              {"restored": len(writes), "to": msg.to_seq}), 0)
        return replies + self.flush()

    # ---------------------------------------------------------------- reads

    def _scan(self, msg: protocol.KvScan):
        self.backend.need("scan", "storage_scan")
        raw = self.hook.storage_scan(prefix=msg.prefix, after=msg.after, limit=msg.limit)
        items, size, cursor, cut = [], 0, msg.after, False
        for key, value in raw:
            if items and size + len(key) + len(value) > SCAN_REPLY_BYTES:
                cut = True
                break
            cursor = key  # the next page starts after it (also after a key not shown)
            if not key.startswith(RESERVED_KEY_PREFIX):
                items.append((key, value))
                size += len(key) + len(value) + 8
        return self._result(msg, items=items, more=cut or len(raw) == msg.limit, info={"after": cursor})

    def _info(self, msg: protocol.KvInfo):
        if msg.what == "stats":
            stats = dict(self.hook.storage_stats() or {})
            if "keys" in stats:  # the service's own keys are not the client's
                stats["keys"] -= sum(1 for k in (POSITION_KEY, ACKS_KEY) if self.hook.storage_get(key=k) is not None)
            stats.update(self.counters, **self.opened, open_transactions=len(self.txns), api="1.1" if self.backend.transactions else "1.0",
                         txn_timeout_s=TXN_TIMEOUT, history_keep=HISTORY_KEEP)
            return self._result(msg, info=stats)
        self.backend.need("versions", "history (storage_history/storage_versions)")
        if msg.what == "history":
            commits = self.hook.storage_history(limit=msg.limit, before=msg.before)
            return self._result(msg, info={"commits": msgspec.to_builtins(commits)})
        if msg.key is None:
            raise StorageError("versions: give a key")
        versions = []
        for v in self.hook.storage_versions(key=msg.key, limit=msg.limit):
            row = msgspec.to_builtins(v)
            for side in ("before", "after"):
                value = getattr(v, side)
                row[side] = value[:VALUE_SHOWN] if value is not None else None
                row[side + "_bytes"] = None if value is None else len(value)
            versions.append(row)
        return self._result(msg, info={"versions": versions})

    # ---------------------------------------------------------------- swap and health

    def _import(self, msg: protocol.ImportData) -> protocol.Handover:
        try:
            self.backend.need("handover", "storage_import, needed to take a data set over")
            with self.busy():
                self.hook.storage_import(path=msg.path)
                self.backend.tx.storage_commit_group(txns=[], labels=[],
                                                     bookkeeping=self._bookkeeping(msg.applied_seq, []))
            self.unpersisted = []
            self.recent.clear()
            stats = self.hook.storage_stats()
        except Exception as exc:
            self.stream.errors += 1
            return protocol.Handover(req=msg.req, ok=False, error=f"import failed: {exc}")
        self.stream.applied = self.stream.acked = msg.applied_seq
        self.horizon = stats.get("horizon", 0)
        self._committed(stats["last_seq"])
        return protocol.Handover(req=msg.req, applied_seq=msg.applied_seq, commit=stats["last_seq"],
                                 keys=stats["keys"])

    def _health(self, msg) -> protocol.Done:
        position = self._position()
        ok = position == self.stream.acked and self.backend.position().get("last_seq", 0) >= self.last_seq
        return protocol.Done(req=msg.req, ok=ok, applied_seq=self.stream.acked,
                             error="" if ok else f"stream position {position}, expected {self.stream.acked}")

    # ---------------------------------------------------------------- timers

    def tick(self, now: float):
        out, self.startup = self.startup, []
        self.counters["resent_acks"] += len(out)
        if now < self.next_check:
            return out
        self.next_check = now + min(1.0, TXN_TIMEOUT / 4)
        for key, txn in list(self.txns.items()):
            if now - txn.last_used > TXN_TIMEOUT:
                self.counters["txn_timeouts"] += 1
                self._end(key, f"aborted after {TXN_TIMEOUT:g} s without a request from its client")
        if (self.backend.compact and not self.batch and self.last_seq - self.horizon > HISTORY_KEEP * 1.1):
            with self.busy():
                self.horizon = self.hook.storage_compact(keep=HISTORY_KEEP)["horizon"]
        return out

    def next_timer(self) -> float:
        return self.next_check if self.txns or self.startup else time.monotonic() + 1.0

    def close(self):
        self.marker.close()
        self.hook.storage_close()
