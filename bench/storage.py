"""Storage: durable commits per second at 1, 4 and 16 concurrent writers through the
storage service, beside bare sqlite3 (WAL, synchronous=FULL, one connection) and bare
pynng round trips, all in one run; and recovery time after a crash with 100 000 keys.

Each row (1, 4, 16 writers) measures its three figures side by side: ``--seconds``
each, alternated in three slices, so that all three see the same disk (the fsync time
of a shared machine varies from one second to the next).

1. ``service``: N writer threads in this process, each an
   attached client (its own lane link) writing one-key transactions of 100 bytes on the
   HIGH lane and waiting for each acknowledgement (acknowledged = durable: the storage
   service's group commit returned). Also the mean transactions per group commit (one
   fsync each), from the service's own counters: group commit is what lets throughput
   grow with writers. Beside, the CPU time the kernel, the storage service and this
   process (the writers) spent per transaction (``/proc/<pid>/stat``), which says where
   a transaction's cost is.
2. ``sqlite``: the same transactions straight into sqlite3 (``kv.sqlite3`` schema of
   sqlite-storage, WAL, synchronous=FULL), N threads sharing one connection, one
   ``BEGIN IMMEDIATE ... COMMIT`` (one fsync) per transaction: what a store without group
   commit does. In the 16-writer row also one thread alone on one connection (no lock
   hand-off); the goal's baseline is the better of those two, measured beside the
   service's 16 writers.
3. ``pynng``: N threads, each a Req0 socket doing round trips of the same payload size
   with a Rep0 echo server in a child process over ``ipc://``: the transport's ceiling,
   no durability at all.
4. ``recovery``: the service filled with ``--keys`` keys (1000 per transaction), then
   ``--crashes`` times: SIGKILL the storage process and time until a read through an
   attached client is answered again (the reincarnation server's restart, a new process,
   SQLite's check of the file, the replay); then SIGKILL the whole kernel and time a
   reboot (``lugh up``) to the first answered read. Beside: the backend's own
   ``storage_open`` (integrity check included) of the same data set, in this process.

The goal (issue 7): durable commits/s through the service with 16 writers divided by
bare sqlite3 with one connection >= 2.

    python bench/storage.py [--seconds 3] [--keys 100000] [--crashes 3] [--json] [--quick]
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "plugins" / "sqlite-storage"))

from bench._common import (RT_ARGS, arguments, child, emit, goal, progress, protocol, pynng, ratio, read_line,  # noqa: E402
                           run, table, temporary_kernel)
from bench.roundtrip import echo_server  # noqa: E402
from lugh_sdk import runtime  # noqa: E402
from lugh_sdk.kv import KvClient  # noqa: E402
from lugh_sqlite_storage.plugin import SqliteStorage  # noqa: E402

WRITERS = (1, 4, 16)
GOAL_RATIO = 2.0  # 16 writers through the service / bare sqlite3 with one connection
VALUE = bytes(range(100))


SLICES = 3  # each row alternates its three measurements in slices (see row())


def threads(count: int, seconds: float, body) -> tuple[int, float]:
    """Run ``body(i, deadline) -> operations`` in ``count`` threads; (operations, seconds)."""
    done = [0] * count
    start = time.monotonic()
    deadline = start + seconds

    def one(i):
        done[i] = body(i, deadline)

    workers = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(done), time.monotonic() - start


def cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Service:
    """``writers`` attached clients, each writing one-key transactions and waiting for
    each acknowledgement; the service's group counters and the processes' CPU time are
    summed over the slices measured."""

    def __init__(self, bench, stack: ExitStack, writers: int):
        self.bench, self.writers = bench, writers
        status = bench.status()
        self.pids = {"kernel": status["kernel"]["pid"], "writers": os.getpid(),
                     "storage": next(s["pid"] for s in status["services"] if s["name"] == "storage")}
        self.clients = [KvClient(stack.enter_context(bench.attached(f"w{i}"))) for i in range(writers)]
        for kv in self.clients:
            kv.put("warm", VALUE)
        self.ops = self.seconds = self.groups = self.transactions = 0
        self.cpu: dict[str, float | None] = dict.fromkeys(self.pids, 0.0)
        self.n = 0

    def slice(self, seconds: float) -> None:
        before = self.bench.request(protocol.KvStatsReq())
        cpu_before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

        def write(i, deadline):
            n, kv = 0, self.clients[i]
            while time.monotonic() < deadline:
                kv.put(f"bench/{self.writers}/{i}/{self.n}/{n}", VALUE)
                n += 1
            return n

        ops, elapsed = threads(self.writers, seconds, write)
        cpu_after = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        after = self.bench.request(protocol.KvStatsReq())
        self.n += 1
        self.ops += ops
        self.seconds += elapsed
        self.groups += after["groups"] - before["groups"]
        self.transactions += after["transactions"] - before["transactions"]
        for name in self.pids:  # None: the process restarted (its CPU time is not comparable)
            b, a = cpu_before[name], cpu_after[name]
            self.cpu[name] = None if None in (b, a, self.cpu[name]) else self.cpu[name] + a - b

    def result(self) -> dict:
        return {"commits_per_s": round(self.ops / self.seconds),
                "txn_per_group": round(self.transactions / max(1, self.groups), 2),
                "cpu_us_per_txn": {name: None if cpu is None else round(cpu / max(1, self.ops) * 1e6)
                                   for name, cpu in self.cpu.items()}}


class BareSqlite:
    """The same transactions straight into sqlite3: N threads sharing one connection, one
    ``BEGIN IMMEDIATE ... COMMIT`` (one fsync) each."""

    def __init__(self, file: Path, writers: int):
        self.writers = writers
        self.db = sqlite3.connect(file, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE kv (key TEXT PRIMARY KEY, value BLOB NOT NULL)")
        self.lock = threading.Lock()
        self.ops = self.seconds = self.n = 0

    def slice(self, seconds: float) -> None:
        def write(i, deadline):
            n = 0
            while time.monotonic() < deadline:
                with self.lock:
                    self.db.execute("BEGIN IMMEDIATE")
                    self.db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (f"bench/{i}/{self.n}/{n}", VALUE))
                    self.db.execute("COMMIT")
                n += 1
            return n

        ops, elapsed = threads(self.writers, seconds, write)
        self.n += 1
        self.ops += ops
        self.seconds += elapsed

    def result(self) -> int:
        return round(self.ops / self.seconds)

    def close(self) -> None:
        self.db.close()


class BarePynng:
    """N threads, each a Req0 socket doing round trips of a storage request's size with
    the echo server."""

    def __init__(self, address: str, writers: int):
        self.address, self.writers = address, writers
        self.payload = bytes(len(protocol.encode(protocol.KvPut(req=1, writes=[("bench/16/15/99999", VALUE)]))))
        self.ops = self.seconds = 0

    def slice(self, seconds: float) -> None:
        def trips(i, deadline):
            n = 0
            with pynng.Req0(recv_timeout=5000, send_timeout=5000) as sock:
                sock.dial(self.address, block=True)
                while time.monotonic() < deadline:
                    sock.send(self.payload)
                    sock.recv()
                    n += 1
            return n

        ops, elapsed = threads(self.writers, seconds, trips)
        self.ops += ops
        self.seconds += elapsed

    def result(self) -> int:
        return round(self.ops / self.seconds)


def row(bench, scratch: Path, address: str, writers: int, seconds: float, baseline: bool = False) -> dict:
    """The measurements of one row, alternated in ``SLICES`` slices of ``seconds /
    SLICES`` each: the disk's fsync time on a shared machine changes from one second to
    the next, and a ratio is only fair if both sides saw the same disk. ``baseline``:
    also bare sqlite3 with one connection and one writer (the goal's baseline)."""
    with ExitStack() as stack:
        service = Service(bench, stack, writers)
        bare = BareSqlite(scratch / f"bare-{writers}.sqlite3", writers)
        stack.callback(bare.close)
        single = BareSqlite(scratch / f"bare-{writers}-one-writer.sqlite3", 1) if baseline else None
        if single is not None:
            stack.callback(single.close)
        trips = BarePynng(address, writers)
        for _ in range(SLICES):
            for meter in (service, bare, single, trips):
                if meter is not None:
                    meter.slice(seconds / SLICES)
        out = {"service": service.result(), "sqlite_wal_full": bare.result(), "pynng_round_trips": trips.result()}
        if single is not None:
            out["sqlite_wal_full_one_writer"] = single.result()
        return out


def fill(bench, keys: int) -> None:
    for start in range(0, keys, 1000):
        bench.request(protocol.KvReq(put=[(f"fill/{i:07d}", VALUE) for i in range(start, min(keys, start + 1000))]),
                      timeout=120)


def serving_again(kv: KvClient, started: float) -> float:
    while kv.get("fill/0000000") is None:  # retried by the client while storage restarts
        raise RuntimeError("the data set lost its first key")
    return time.monotonic() - started


def storage_crashes(bench, crashes: int) -> list[float]:
    times = []
    with bench.attached("rec") as link:
        kv = KvClient(link, timeout=120)
        for _ in range(crashes):
            pid = next(s["pid"] for s in bench.status()["services"] if s["name"] == "storage")
            started = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            times.append(serving_again(kv, started))
    return times


def kernel_crash(bench) -> float:
    pid = bench.status()["kernel"]["pid"]
    bench.client.close()
    started = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    runtime.down(bench.home)  # reaps it (this process started it) and clears its sockets
    runtime.up(bench.home, workload="none", workers=0, kernel_args=RT_ARGS)
    with bench.attached("reboot") as link:
        return serving_again(KvClient(link, timeout=120), started)


def bare_open(directory: Path, keys: int) -> float:
    """The backend's own open (quick_check included) of a data set of ``keys`` keys."""
    plugin = SqliteStorage()
    plugin.storage_open(str(directory))
    for start in range(0, keys, 10_000):
        plugin.storage_commit([(f"fill/{i:07d}", VALUE) for i in range(start, min(keys, start + 10_000))])
    plugin.storage_close()
    started = time.monotonic()
    plugin.storage_open(str(directory))
    elapsed = time.monotonic() - started
    plugin.storage_close()
    return elapsed


def main() -> int:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per throughput row (default 3)")
    parser.add_argument("--keys", type=int, default=100_000, help="keys in the recovery data set (default 100000)")
    parser.add_argument("--crashes", type=int, default=3, help="storage crashes timed (default 3)")
    args = parser.parse_args()
    if args.quick:  # the same rows, shorter, a smaller data set, fewer crashes
        args.seconds, args.keys, args.crashes = min(args.seconds, 1.5), min(args.keys, 20_000), min(args.crashes, 2)
    if args.child is not None:
        echo_server(*args.child)
        return 0
    scratch = Path(tempfile.mkdtemp(prefix="lugh-bench-sqlite-"))
    rows, rates = [], {}
    try:
        with temporary_kernel("none", workers=0) as bench:
            address = f"ipc://{bench.home}/bare-echo"
            with child(__file__, "reqrep", address) as echo:
                read_line(echo, "echo server")
                for writers in WRITERS:
                    progress(f"{writers} writers: storage service, bare sqlite3, bare pynng ({args.seconds:g} s each, "
                             f"alternated in {SLICES} slices)")
                    rates[writers] = row(bench, scratch, address, writers, args.seconds,
                                         baseline=writers == WRITERS[-1])
                    service, bare, trips = (rates[writers][k] for k in ("service", "sqlite_wal_full",
                                                                         "pynng_round_trips"))
                    rows.append([writers, service["commits_per_s"], service["txn_per_group"], bare, trips,
                                 ratio(service["commits_per_s"], bare), ratio(service["commits_per_s"], trips)])
            progress(f"filling the storage service with {args.keys} keys")
            fill(bench, args.keys)
            progress(f"{args.crashes} storage crashes (SIGKILL) with {args.keys} keys")
            storage = storage_crashes(bench, args.crashes)
            progress("a kernel crash (SIGKILL) and reboot")
            kernel = kernel_crash(bench)
        progress(f"bare storage_open of {args.keys} keys")
        opened = bare_open(scratch / "open", args.keys)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    ms = lambda s: round(s * 1000, 1)
    recovery = {"keys": args.keys, "storage_crash_to_serving_ms": [ms(t) for t in storage],
                "storage_crash_to_serving_median_ms": ms(statistics.median(storage)),
                "kernel_crash_to_serving_ms": ms(kernel), "bare_storage_open_ms": ms(opened)}
    top = rates[WRITERS[-1]]["service"]["commits_per_s"]
    scaling = ratio(top, rates[WRITERS[0]]["service"]["commits_per_s"])
    # The stronger of bare sqlite3's two one-connection figures measured beside the
    # service's 16 writers: 16 threads taking turns on it, or one thread alone.
    baseline = max(rates[WRITERS[-1]]["sqlite_wal_full"], rates[WRITERS[-1]]["sqlite_wal_full_one_writer"])
    versus = ratio(top, baseline)
    result = {"benchmark": "storage", "seconds_per_row": args.seconds, "value_bytes": len(VALUE),
              "durable_commits": rates, "service_16_over_1": scaling, "sqlite_baseline_commits_per_s": baseline,
              "ratio_service16_to_sqlite": versus,
              "ratio_service16_to_pynng16": ratio(top, rates[WRITERS[-1]]["pynng_round_trips"]),
              "recovery": recovery,
              "goal": goal(f"durable commits/s, service with {WRITERS[-1]} writers / bare sqlite3 WAL+FULL with one "
                           f"connection >= {GOAL_RATIO:g}", versus, met=versus is not None and versus >= GOAL_RATIO)}
    text = table(["writers", "service commits/s", "txn/group", "sqlite WAL+FULL commits/s", "pynng round trips/s",
                  "x sqlite", "x pynng"], rows)
    text += "\n\nCPU per transaction (µs): " + "; ".join(
        f"{w} writers: " + ", ".join(f"{k} {v}" for k, v in rates[w]["service"]["cpu_us_per_txn"].items())
        for w in WRITERS)
    text += (f"\n\nservice at {WRITERS[-1]} writers / bare sqlite3 with one connection ({baseline}/s): {versus}; "
             f"service at {WRITERS[-1]} writers / 1 writer: {scaling} (group commit)"
             f"\n\nrecovery with {args.keys} keys:"
             f"\n  storage SIGKILL -> read answered again: median {recovery['storage_crash_to_serving_median_ms']} ms "
             f"({', '.join(str(t) for t in recovery['storage_crash_to_serving_ms'])})"
             f"\n  kernel SIGKILL -> lugh up -> read answered: {recovery['kernel_crash_to_serving_ms']} ms"
             f"\n  bare storage_open (quick_check included): {recovery['bare_storage_open_ms']} ms")
    emit(result, args.json, text)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
