"""Storage: durable commits per second at 1, 4 and 16 concurrent writers through the
storage service, beside bare sqlite3 (WAL, synchronous=FULL, one connection) and bare
pynng round trips, all in one run; and recovery time after a crash with 100 000 keys.

1. ``service``: ``--seconds`` per row, N writer threads in this process, each an
   attached client (its own lane link) writing one-key transactions of 100 bytes on the
   HIGH lane and waiting for each acknowledgement (acknowledged = durable: the storage
   service's group commit returned). Also the mean transactions per group commit (one
   fsync each), from the service's own counters: group commit is what lets throughput
   grow with writers.
2. ``sqlite``: the same transactions straight into sqlite3 (``kv.sqlite3`` schema of
   sqlite-storage, WAL, synchronous=FULL), N threads sharing one connection, one
   ``BEGIN IMMEDIATE ... COMMIT`` (one fsync) per transaction: what a store without group
   commit does.
3. ``pynng``: N threads, each a Req0 socket doing round trips of the same payload size
   with a Rep0 echo server in a child process over ``ipc://``: the transport's ceiling,
   no durability at all.
4. ``recovery``: the service filled with ``--keys`` keys (1000 per transaction), then
   ``--crashes`` times: SIGKILL the storage process and time until a read through an
   attached client is answered again (the reincarnation server's restart, a new process,
   SQLite's check of the file, the replay); then SIGKILL the whole kernel and time a
   reboot (``lugh up``) to the first answered read. Beside: the backend's own
   ``storage_open`` (integrity check included) of the same data set, in this process.

    python bench/storage.py [--seconds 3] [--keys 100000] [--crashes 3] [--json]
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

from bench._common import (arguments, child, emit, goal, progress, protocol, pynng, ratio, read_line,  # noqa: E402
                           run, table, temporary_kernel)
from bench.roundtrip import echo_server  # noqa: E402
from lugh_sdk import runtime  # noqa: E402
from lugh_sdk.kv import KvClient  # noqa: E402
from lugh_sqlite_storage.plugin import SqliteStorage  # noqa: E402

WRITERS = (1, 4, 16)
GOAL_SCALING = 2.0  # group commit: 16 writers get at least twice the durable commits of one
VALUE = bytes(range(100))


def threads(count: int, seconds: float, body) -> float:
    """Run ``body(i, deadline) -> operations`` in ``count`` threads; operations per second."""
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
    return sum(done) / (time.monotonic() - start)


def service_rate(bench, writers: int, seconds: float) -> dict:
    with ExitStack() as stack:
        clients = [KvClient(stack.enter_context(bench.attached(f"w{i}"))) for i in range(writers)]
        for kv in clients:
            kv.put("warm", VALUE)
        before = bench.request(protocol.KvStatsReq())

        def write(i, deadline):
            n = 0
            while time.monotonic() < deadline:
                clients[i].put(f"bench/{writers}/{i}/{n}", VALUE)
                n += 1
            return n

        rate = threads(writers, seconds, write)
        after = bench.request(protocol.KvStatsReq())
    groups = after["groups"] - before["groups"]
    return {"commits_per_s": round(rate), "txn_per_group": round((after["transactions"] - before["transactions"])
                                                                 / max(1, groups), 2)}


def sqlite_rate(directory: Path, writers: int, seconds: float) -> float:
    db = sqlite3.connect(directory / f"bare-{writers}.sqlite3", isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE kv (key TEXT PRIMARY KEY, value BLOB NOT NULL)")
    lock = threading.Lock()

    def write(i, deadline):
        n = 0
        while time.monotonic() < deadline:
            with lock:
                db.execute("BEGIN IMMEDIATE")
                db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (f"bench/{i}/{n}", VALUE))
                db.execute("COMMIT")
            n += 1
        return n

    rate = threads(writers, seconds, write)
    db.close()
    return round(rate)


def pynng_rate(address: str, writers: int, seconds: float) -> float:
    payload = bytes(len(protocol.encode(protocol.KvPut(req=1, writes=[("bench/16/15/99999", VALUE)]))))

    def trips(i, deadline):
        n = 0
        with pynng.Req0(recv_timeout=5000, send_timeout=5000) as sock:
            sock.dial(address, block=True)
            while time.monotonic() < deadline:
                sock.send(payload)
                sock.recv()
                n += 1
        return n

    return round(threads(writers, seconds, trips))


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
    runtime.up(bench.home, workload="none", workers=0)
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
                    progress(f"{writers} writers: storage service, bare sqlite3, bare pynng ({args.seconds:g} s each)")
                    service = service_rate(bench, writers, args.seconds)
                    bare = sqlite_rate(scratch, writers, args.seconds)
                    trips = pynng_rate(address, writers, args.seconds)
                    rates[writers] = {"service": service, "sqlite_wal_full": bare, "pynng_round_trips": trips}
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
    scaling = ratio(rates[WRITERS[-1]]["service"]["commits_per_s"], rates[WRITERS[0]]["service"]["commits_per_s"])
    result = {"benchmark": "storage", "seconds_per_row": args.seconds, "value_bytes": len(VALUE),
              "durable_commits": rates, "service_16_over_1": scaling, "recovery": recovery,
              "goal": goal(f"durable commits/s through the service, {WRITERS[-1]} writers / 1 >= {GOAL_SCALING:g}",
                           scaling, met=scaling is not None and scaling >= GOAL_SCALING)}
    text = table(["writers", "service commits/s", "txn/group", "sqlite WAL+FULL commits/s", "pynng round trips/s",
                  "x sqlite", "x pynng"], rows)
    text += (f"\n\nservice throughput at {WRITERS[-1]} writers / 1 writer: {scaling} (group commit)"
             f"\n\nrecovery with {args.keys} keys:"
             f"\n  storage SIGKILL -> read answered again: median {recovery['storage_crash_to_serving_median_ms']} ms "
             f"({', '.join(str(t) for t in recovery['storage_crash_to_serving_ms'])})"
             f"\n  kernel SIGKILL -> lugh up -> read answered: {recovery['kernel_crash_to_serving_ms']} ms"
             f"\n  bare storage_open (quick_check included): {recovery['bare_storage_open_ms']} ms")
    emit(result, args.json, text)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
