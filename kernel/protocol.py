"""Every IPC message of LughOS, in one place.

Messages are msgspec Structs in one tagged union per channel, encoded as msgpack: the
decoder checks the schema (types, ranges, required fields), so a malformed message is a
``msgspec.DecodeError``/``ValidationError`` at the door and never reaches a handler.
Nothing is ever pickled.

Channels:
- *lanes*: kernel <-> peer (services, workers, the reincarnation server), three sockets
  per direction, HIGH, MEDIUM and LOW (:mod:`kernel.ipc`). Message type :data:`Msg`.
- *control*: CLI <-> kernel, request/reply over one socket. :data:`Request`/:data:`Reply`.

Stream numbering: every message the kernel sends to a *service* carries ``seq``,
numbered per service (not per process). A service reports the highest seq it has
applied; what the kernel sent beyond that is kept and replayed to the next incarnation
of the service (restart or live swap), and a gap seen by a service is counted as lost.
"""

from __future__ import annotations

import enum
import itertools
import signal
from typing import Annotated, Any, Literal, Union

import msgspec

from lugh_sdk.api.types import Job, Name, SchedulerState, Task

MAX_MESSAGE_BYTES = 1 << 20  # every socket's recv_max_size (see ipc.INBOUND_RECV_MAX); bulk data goes through shm
MAX_KEY = 1024
MAX_VALUE = 256 * 1024
RESERVED_KEY_PREFIX = ".lugh/"  # the storage service's own bookkeeping; refused from clients


class Lane(enum.IntEnum):
    HIGH = 0
    MEDIUM = 1
    LOW = 2


PeerId = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9~_-]{0,31}$")]
Key = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_KEY)]
Value = Annotated[bytes, msgspec.Meta(max_length=MAX_VALUE)]


class _M(msgspec.Struct, tag_field="t", array_like=True, kw_only=True):
    """Base of lane messages: compact (array-like) and tagged."""


# --- peer -> kernel ------------------------------------------------------------------

class Hello(_M, tag="hello"):
    """First message on each lane: binds the NNG pipe to the peer (token from the kernel)."""
    peer: PeerId
    token: Annotated[str, msgspec.Meta(max_length=64)]
    pid: int
    plugin: str = ""
    plugin_version: str = ""
    applied_seq: int = 0  # a storage service recovers it from its own data set


class Heartbeat(_M, tag="hb"):
    applied_seq: int = 0
    lost: int = 0  # gaps this process saw in its service stream
    errors: int = 0  # exceptions raised by the plugin


class Picked(_M, tag="picked"):
    req: int
    job_id: str | None
    applied_seq: int
    more: Annotated[list[str], msgspec.Meta(max_length=64)] = []  # a batch: the jobs to start after job_id, in order
    preempts: str | None = None  # the running job job_id displaces (PickNext.running or one of .others)


class Exported(_M, tag="exported"):
    req: int
    state: SchedulerState
    applied_seq: int


class Done(_M, tag="done"):
    """Reply to a request that carries no data (import, health, quiesce)."""
    req: int
    ok: bool
    error: str = ""
    applied_seq: int = 0


class Pong(_M, tag="pong"):
    req: int
    payload: bytes = b""
    order: int = 0  # from the kernel: its count of messages handled when it handled the ping


class JobDone(_M, tag="jobdone"):
    job_id: str
    ok: bool
    error: str = ""
    finished: float = 0.0  # the worker's time.monotonic() at the end (0: unknown, the kernel's receipt)


class KvPut(_M, tag="kvput"):
    """A client's transaction: all writes commit together (value None deletes)."""
    req: int
    writes: Annotated[list[tuple[Key, Value | None]], msgspec.Meta(min_length=1, max_length=1024)]
    origin: str = ""  # set by the kernel when it forwards; a client's value is overwritten
    seq: int = 0


class KvGet(_M, tag="kvget"):
    req: int
    key: Key
    origin: str = ""


class KvScan(_M, tag="kvscan"):
    """Committed pairs whose key starts with ``prefix``, in key order, after ``after``;
    the result says ``more`` when a page was cut (by ``limit`` or the message size)."""
    req: int
    prefix: Annotated[str, msgspec.Meta(max_length=MAX_KEY)] = ""
    after: Annotated[str, msgspec.Meta(max_length=MAX_KEY)] = ""
    limit: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 1000
    origin: str = ""


class KvTxn(_M, tag="kvtxn"):
    """An interactive transaction, numbered ``txn`` by its client: ``begin``, any number
    of ``write`` (value None deletes), then ``commit`` or ``abort``. Only the commit is
    answered, with whatever went wrong before it (nothing of a failed transaction is
    applied). A transaction idle for the storage service's timeout is aborted."""
    req: int
    txn: Annotated[int, msgspec.Meta(ge=1, le=2**62)]
    op: Literal["begin", "write", "commit", "abort"]
    writes: Annotated[list[tuple[Key, Value | None]], msgspec.Meta(max_length=1024)] = []
    origin: str = ""
    seq: int = 0


class KvInfo(_M, tag="kvinfo"):
    """Read the storage's history (``key`` None: commits; a key: its versions) or stats."""
    req: int
    what: Literal["history", "versions", "stats"]
    key: Key | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 20
    before: Annotated[int, msgspec.Meta(ge=0)] = 0
    origin: str = ""


class KvAdmin(_M, tag="kvadmin"):
    """Control channel only: roll the data back to commit ``to_seq`` (a new commit that
    restores that state), or compact the history to the last ``keep`` commits."""
    req: int
    op: Literal["rollback", "compact"]
    to_seq: Annotated[int, msgspec.Meta(ge=0)] = 0
    keep: Annotated[int, msgspec.Meta(ge=0)] = 0
    label: Annotated[str, msgspec.Meta(max_length=128)] = ""
    origin: str = ""
    seq: int = 0


class KvResult(_M, tag="kvres"):
    """Storage -> kernel -> client. ``origin`` names the client peer."""
    req: int
    origin: str = ""
    ok: bool = True
    commit: int = 0  # the storage's commit sequence number (not a stream seq)
    value: bytes | None = None
    error: str = ""
    seq: int = 0  # the stream seq of the request it answers (0: a read, not streamed)
    items: list[tuple[str, bytes]] = []  # KvScan
    more: bool = False  # KvScan: another page follows
    info: dict[str, Any] = {}  # KvInfo, KvAdmin


KV_REQUESTS = (KvPut, KvGet, KvScan, KvTxn, KvInfo, KvAdmin)
KV_STREAMED = (KvPut, KvTxn, KvAdmin)  # ordered with the writes, replayed after a restart


class Handover(_M, tag="handover"):
    """Storage -> kernel during a live swap: the data set was exported to (or imported
    from) ``path``; ``commit`` and ``keys`` describe it, so the two sides can be compared."""
    req: int
    ok: bool = True
    error: str = ""
    applied_seq: int = 0
    commit: int = 0
    keys: int = 0


class ShmAlloc(_M, tag="shmalloc"):
    req: int
    size: Annotated[int, msgspec.Meta(gt=0)]


class ShmFree(_M, tag="shmfree"):
    name: str


class ShmGranted(_M, tag="shmgrant"):
    req: int
    name: str = ""
    size: int = 0
    error: str = ""


class Restart(_M, tag="restart"):
    """Reincarnation server -> kernel: (re)start this service now."""
    service: PeerId
    reason: str = ""
    peer: str = ""  # the failed incarnation this restart answers (a stale one is ignored)


class GiveUp(_M, tag="giveup"):
    """Reincarnation server -> kernel: intensity limit passed, enter safe mode."""
    service: PeerId
    reason: str = ""


class PolicyState(_M, tag="rsstate"):
    """Reincarnation server -> kernel, after every change: its whole policy state, kept
    by the kernel and handed to the next incarnation (the RS survives its own death)."""
    applied_seq: int
    records: dict[str, Any] = {}


class PolicyImport(_M, tag="rsimport"):
    """Kernel -> a new reincarnation server: the settings, the last policy state it
    saved (through ``applied_seq``; later events are replayed) and the services up now."""
    applied_seq: int
    settings: dict[str, Any] = {}
    records: dict[str, Any] = {}
    up: list[str] = []


class Promote(_M, tag="promote"):
    """Kernel -> a hot standby: take over (build the service, open its data); answered
    with Done, whose ``applied_seq`` is the position recovered."""
    req: int


class InjectFault(_M, tag="fault"):
    """Kernel -> a service host (`lugh chaos`): make the plugin's next hook call raise."""
    fault: Literal["raise"] = "raise"


class MonitorReport(_M, tag="report"):
    req: int
    report: dict[str, Any]


# --- kernel -> peer ------------------------------------------------------------------

class TaskAdded(_M, tag="taskadd"):
    seq: int
    task: Task


class TaskRemoved(_M, tag="taskrm"):
    seq: int
    name: Name


class JobReleased(_M, tag="released"):
    seq: int
    job: Job


class JobCompleted(_M, tag="completed"):
    seq: int
    job: Job


class JobStarted(_M, tag="started"):
    """The kernel started ``job_id`` at ``at`` without asking: a slot was free and it
    was the only ready job, which any scheduler must start then (the kernel overrules
    an answer that leaves a startable job waiting). The scheduler service takes it off
    the plugin's queue with a pick, as if the plugin had been asked."""
    seq: int
    job_id: str
    at: float
    # The jobs the kernel holds as decided (running, or in a worker's deck): picks of
    # these before ``job_id`` are dropped; any other pick before it goes back.
    decided: Annotated[list[str], msgspec.Meta(max_length=1024)] = []


class PickNext(_M, tag="pick"):
    through: int  # the stream seq of the last event sent before this question
    req: int
    now: float
    running: Job | None = None
    # Several dispatch slots: the other running jobs, asked about in turn after
    # ``running`` (least urgent first by the kernel's order); Picked.preempts says which.
    others: Annotated[list[Job], msgspec.Meta(max_length=64)] = []
    # Several dispatch slots: the jobs on a worker (running or preempted). A job whose
    # task has another one among them does not start now (a task's jobs run in order).
    on_workers: Annotated[list[Job], msgspec.Meta(max_length=1024)] = []
    # With ``running`` None: decide up to ``limit`` jobs, in the order they start (the
    # kernel's dispatch queue, see kernel/core.py); answered in Picked.job_id and .more.
    limit: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1


class ExportState(_M, tag="export"):
    req: int


class ImportState(_M, tag="import"):
    req: int
    state: SchedulerState
    applied_seq: int


class ExportData(_M, tag="exportdata"):
    """Live swap of storage: once every stream message through ``through`` is applied,
    commit, write the data set to ``path`` and answer with a Handover."""
    req: int
    path: str
    through: int = 0


class ImportData(_M, tag="importdata"):
    """Live swap of storage: take over the data set at ``path``; the stream position is
    ``applied_seq``. Answered with a Handover."""
    req: int
    path: str
    applied_seq: int


class HealthCheck(_M, tag="health"):
    req: int


class Ping(_M, tag="ping"):
    req: int
    payload: bytes = b""


class RunJob(_M, tag="run"):
    job: Job
    action: str


# The kernel preempts a worker's job with this signal and continues it with SIGCONT. Not
# SIGSTOP: a worker stops itself on it only while a job runs (kernel/services/worker.py),
# so a preemption that arrives after the job ended, its JobDone on the way, does not
# stop the JobDone inside the worker until the kernel resumes a job already finished.
PREEMPT_SIGNAL = signal.SIGTSTP


class Event(_M, tag="event"):
    """To monitors and the reincarnation server."""
    kind: str
    at: float
    data: dict[str, Any] = {}
    seq: int = 0


class ReportRequest(_M, tag="reportreq"):
    req: int


class Stop(_M, tag="stop"):
    """Finish what you are doing and exit 0."""


class Batch(_M, tag="batch"):
    """Several lane messages for one receiver on one lane, in order, as one NNG message
    (:mod:`kernel.ipc` packs and unpacks them; handlers never see a Batch). A sparse NNG
    send costs its sender ~50 µs of CPU, mostly NNG's threads waking; a batch pays it
    once. Each item is an encoded message of its own, checked on its own; an item that
    is itself a Batch is malformed."""
    items: Annotated[list[bytes], msgspec.Meta(min_length=2)]


Msg = Union[
    Hello, Heartbeat, Picked, Exported, Done, Pong, JobDone, KvPut, KvGet, KvResult,
    KvScan, KvTxn, KvInfo, KvAdmin, Handover,
    ShmAlloc, ShmFree, ShmGranted, Restart, GiveUp, MonitorReport,
    PolicyState, PolicyImport, Promote, InjectFault,
    TaskAdded, TaskRemoved, JobReleased, JobCompleted, JobStarted, PickNext, ExportState,
    ImportState, ExportData, ImportData, HealthCheck, Ping, RunJob, Event, ReportRequest, Stop, Batch,
]

_encoder = msgspec.msgpack.Encoder()
_msg_decoder = msgspec.msgpack.Decoder(Msg)
encode = _encoder.encode


def _decode(decoder: msgspec.msgpack.Decoder, data: bytes):
    try:
        return decoder.decode(data)
    except (UnicodeDecodeError, RecursionError) as exc:
        # msgspec lets these through (invalid UTF-8 in a str, nesting too deep in an Any
        # field); they are malformed messages like any other, never a crash.
        raise msgspec.DecodeError(f"malformed message: {exc}") from None


def decode(data: bytes) -> Msg:
    """Decode a lane message; raises msgspec.DecodeError/ValidationError when bad."""
    return _decode(_msg_decoder, data)


# What packing adds to a batch: its tag and array headers, and each item's bin header.
BATCH_OVERHEAD = 32
BATCH_ITEM_OVERHEAD = 5
BATCH_MAX_ITEMS = 256


def take_batch(queue) -> tuple[bytes, int]:
    """The front of ``queue`` (encoded messages, oldest first, left in place) as one
    NNG message: a :class:`Batch` of as many as fit in ``MAX_MESSAGE_BYTES`` (at most
    ``BATCH_MAX_ITEMS``), or the first message alone. Returns it and how many it holds."""
    first = queue[0]
    if len(queue) == 1:
        return first, 1
    size, n = BATCH_OVERHEAD + BATCH_ITEM_OVERHEAD + len(first), 1
    for data in itertools.islice(queue, 1, BATCH_MAX_ITEMS):
        size += BATCH_ITEM_OVERHEAD + len(data)
        if size > MAX_MESSAGE_BYTES:
            break
        n += 1
    if n == 1:
        return first, 1
    return encode(Batch(items=list(itertools.islice(queue, n)))), n


def unpack(data: bytes) -> tuple[list[Msg], int]:
    """The messages one NNG message carried (a Batch's items, in order), and how many
    were bad (malformed, or a Batch inside a Batch): those are left out, alone."""
    try:
        msg = decode(data)
    except msgspec.MsgspecError:
        return [], 1
    if not isinstance(msg, Batch):
        return [msg], 0
    msgs, bad = [], 0
    for item in msg.items:
        try:
            one = decode(item)
        except msgspec.MsgspecError:
            bad += 1
            continue
        if isinstance(one, Batch):
            bad += 1
        else:
            msgs.append(one)
    return msgs, bad


# --- control channel (CLI <-> kernel) ------------------------------------------------

class _R(msgspec.Struct, tag_field="op", kw_only=True):
    """Base of control requests."""


class StatusReq(_R, tag="status"):
    pass


class TaskAddReq(_R, tag="task-add"):
    task: Task


class TaskRemoveReq(_R, tag="task-rm"):
    name: Name


class TaskListReq(_R, tag="task-list"):
    pass


class SwapReq(_R, tag="swap"):
    service: PeerId
    plugin: Annotated[str, msgspec.Meta(max_length=128)]
    health_window_ms: Annotated[int, msgspec.Meta(ge=0, le=60_000)] = 300


class LogReq(_R, tag="log"):
    limit: Annotated[int, msgspec.Meta(ge=0)] = 0


class PingServiceReq(_R, tag="ping-service"):
    service: PeerId
    count: Annotated[int, msgspec.Meta(gt=0, le=100_000)] = 1000
    lane: Lane = Lane.HIGH


class KvReq(_R, tag="kv"):
    put: list[tuple[Key, Value | None]] = []  # one transaction; value None deletes
    get: Key | None = None


class KvScanReq(_R, tag="kv-scan"):
    prefix: Annotated[str, msgspec.Meta(max_length=MAX_KEY)] = ""
    after: Annotated[str, msgspec.Meta(max_length=MAX_KEY)] = ""
    limit: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 100


class KvHistoryReq(_R, tag="kv-history"):
    key: Key | None = None  # None: the last commits; a key: its versions
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 20
    before: Annotated[int, msgspec.Meta(ge=0)] = 0


class KvStatsReq(_R, tag="kv-stats"):
    pass


class KvRollbackReq(_R, tag="kv-rollback"):
    to_seq: Annotated[int, msgspec.Meta(ge=0)]


class KvCompactReq(_R, tag="kv-compact"):
    keep: Annotated[int, msgspec.Meta(ge=0)]


class ShutdownReq(_R, tag="down"):
    pass


class AttachReq(_R, tag="attach"):
    """Attach an external client (a gateway, a test, a benchmark) to the lanes: the reply
    gives the peer id and token for :class:`kernel.ipc.PeerLink`."""
    name: Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9]{0,15}$")]


class DetachReq(_R, tag="detach"):
    peer: PeerId


class FaultReq(_R, tag="fault"):
    """`lugh chaos`: make a plugin service raise in its next hook (the real error path)."""
    service: PeerId
    fault: Literal["raise"] = "raise"


class ServiceRestartReq(_R, tag="restart"):
    """`lugh restart SERVICE`: restart it now; also the way out of a safe mode."""
    service: PeerId


# --- plugins on the target (kernel/install.py) ---------------------------------------

PluginName = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9-]{1,63}$")]
PluginVersion = Annotated[str, msgspec.Meta(pattern=r"^(\d+(\.\d+){0,3})?$")]


class InstallReq(_R, tag="install"):
    """Verify and install a plugin from a registry the target trusts (a trust name,
    or the registry's directory or URL); with ``swap``, swap its service live to it."""
    name: PluginName
    version: PluginVersion = ""
    registry: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)] = "local"
    swap: bool = False
    health_window_ms: Annotated[int, msgspec.Meta(ge=0, le=60_000)] = 300


class UninstallReq(_R, tag="uninstall"):
    name: PluginName
    version: PluginVersion = ""


class PluginListReq(_R, tag="plugin-list"):
    pass


class RollbackReq(_R, tag="rollback"):
    """Undo the last install or swap on the target (from the journal)."""
    health_window_ms: Annotated[int, msgspec.Meta(ge=0, le=60_000)] = 300


class ProgressReq(_R, tag="progress"):
    """What the install in progress is doing (phase, bytes), and the swap's step."""


Request = Union[StatusReq, TaskAddReq, TaskRemoveReq, TaskListReq, SwapReq, LogReq,
                PingServiceReq, KvReq, ShutdownReq, AttachReq, DetachReq, FaultReq, ServiceRestartReq,
                KvScanReq, KvHistoryReq, KvStatsReq, KvRollbackReq, KvCompactReq,
                InstallReq, UninstallReq, PluginListReq, RollbackReq, ProgressReq]


class ReplyBase(msgspec.Struct, tag_field="kind", kw_only=True):
    pass


class OkReply(ReplyBase, tag="ok"):
    data: dict[str, Any] = {}


class ErrorReply(ReplyBase, tag="error"):
    error: str


Reply = Union[OkReply, ErrorReply]

_request_decoder = msgspec.msgpack.Decoder(Request)
_reply_decoder = msgspec.msgpack.Decoder(Reply)


def decode_request(data: bytes) -> Request:
    return _decode(_request_decoder, data)


def decode_reply(data: bytes) -> Reply:
    return _decode(_reply_decoder, data)
