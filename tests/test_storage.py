"""The storage service: group commit, exactly-once positions and resent acknowledgements,
interactive transactions and their timeout, bad input, a backend of plugin API 1.0, the
commit marker (in-process, driving kernel.services.storage.Server directly); then on a
real kernel: `lugh kv`, the SDK client and its lanes, a corrupt data set at boot, and the
live swap of the storage backend with its rollbacks.

Crash consistency under kill -9 is in tests/test_storage_crash.py. No test here asserts
on elapsed time.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import threading
import time
from pathlib import Path

import msgspec
import pluggy
import pytest
from typer.testing import CliRunner

from conftest import install_fixture_plugin, running_kernel
from kernel import protocol
from kernel.protocol import Lane
from kernel.services import loop, storage
from lugh_sdk import runtime
from lugh_sdk.api import PROJECT, hookimpl
from lugh_sdk.api.types import StorageError
from lugh_sdk.client import KernelClient, LughError
from lugh_sdk.kv import KvClient

ROOT = Path(__file__).resolve().parent.parent
for _plugin in ("sqlite-storage", "memory-storage"):
    sys.path.insert(0, str(ROOT / "plugins" / _plugin))

from lugh_memory_storage.plugin import MemoryStorage  # noqa: E402
from lugh_sqlite_storage.plugin import DB_NAME, SqliteStorage  # noqa: E402

SWAP_TIMEOUT = 120.0


# =========================================================================== in-process

class Drive:
    """A storage Server driven as the peer loop drives it, with the kernel's numbering."""

    def __init__(self, plugin, path: Path):
        pm = pluggy.PluginManager(PROJECT)
        import lugh_sdk.api.storage

        pm.add_hookspecs(lugh_sdk.api.storage)
        pm.register(plugin)
        self.stream = loop.Stream()
        self.server = storage.Server(pm.hook, self.stream, argparse.Namespace(data_dir=path))
        self.seq = self.stream.applied

    def send(self, msg, lane: Lane = Lane.LOW) -> list:
        if isinstance(msg, protocol.KV_STREAMED):
            self.seq += 1
            msg = msgspec.structs.replace(msg, seq=self.seq)
            assert self.stream.accept(self.seq)
        return self.server.handle(msg, lane)

    def put(self, req: int, writes, origin="c1", lane=Lane.LOW) -> list:
        return self.send(protocol.KvPut(req=req, writes=writes, origin=origin), lane)

    def txn(self, req: int, txn: int, op: str, writes=(), origin="c1") -> list:
        return self.send(protocol.KvTxn(req=req, txn=txn, op=op, writes=list(writes), origin=origin))

    def get(self, key: str):
        (reply, _), = self.server.handle(protocol.KvGet(req=0, key=key, origin="c1"), Lane.HIGH)
        return reply.value

    def close(self):
        self.server.close()


def results(replies) -> dict:
    """req -> KvResult, checking each went back on a lane."""
    out = {}
    for reply, lane in replies:
        assert isinstance(lane, Lane)
        out[reply.req] = reply
    return out


@pytest.fixture(params=[SqliteStorage, MemoryStorage], ids=["sqlite", "memory"])
def backend(request):
    return request.param


def test_group_commit_acknowledges_only_after_the_commit_one_sequence_number_each(tmp_path, backend):
    d = Drive(backend(), tmp_path)
    assert d.put(1, [("a", b"1")], lane=Lane.HIGH) == [] and d.put(2, [("b", b"2")]) == []
    assert d.get("a") is None, "nothing is visible before the group commits"
    acks = d.server.flush()
    assert [(r.req, r.ok, r.commit, r.seq, lane) for r, lane in acks] == [
        (1, True, 1, 1, Lane.HIGH), (2, True, 2, 2, Lane.LOW)], "each on its request's lane"
    assert (d.get("a"), d.get("b"), d.stream.acked) == (b"1", b"2", 2)
    assert d.server.counters["groups"] == 1 and d.server.flush() == []


def test_the_position_and_the_last_acknowledgements_survive_a_restart(tmp_path):
    d = Drive(SqliteStorage(), tmp_path)
    d.put(1, [("a", b"1")])
    d.put(2, [("b", b"2")], origin="c2")
    d.server.flush()
    d.close()  # (a crash here would be the same: everything above is committed)
    again = Drive(SqliteStorage(), tmp_path)
    assert again.stream.applied == again.stream.acked == 2, "the kernel replays from here"
    resent = again.server.tick(time.monotonic())
    assert [(r.req, r.origin, r.commit, r.info) for r, _ in resent] == [
        (1, "c1", 1, {"resent": True}), (2, "c2", 2, {"resent": True})]
    assert again.server.tick(time.monotonic()) == [], "once"
    again.close()
    rebooted = Drive(SqliteStorage(), tmp_path)
    rebooted.server.kernel = "a rebooted kernel"
    assert rebooted.server._position() == 0, "a new kernel numbers its stream from the start"
    rebooted.close()
    other = Drive(SqliteStorage(), tmp_path)
    other.server.kernel = "another kernel"
    other.server.startup = other.server._unanswered()
    assert other.server.startup == [], "never to another kernel: its request ids mean other things"


class CountedStats(SqliteStorage):
    """sqlite-storage, counting the calls of ``storage_stats`` (which counts every key)."""
    stats_calls = 0

    @hookimpl
    def storage_stats(self) -> dict:
        self.stats_calls += 1
        return super().storage_stats()


def test_the_open_asks_for_the_position_not_for_the_counts(tmp_path):
    """Plugin API 1.3: an open (each restart, each takeover) reads the position alone,
    in a time that does not grow with the data set; only `lugh kv stats` counts."""
    d = Drive(CountedStats(), tmp_path)
    d.put(1, [(f"k{i}", b"v") for i in range(100)])
    d.server.flush()
    d.close()
    plugin = CountedStats()
    again = Drive(plugin, tmp_path)
    assert (again.stream.applied, again.server.last_seq, plugin.stats_calls) == (1, 1, 0)
    (reply, _), = again.server.handle(protocol.KvInfo(req=2, what="stats", origin="c1"), Lane.HIGH)
    assert reply.info["keys"] == 100 and plugin.stats_calls == 1
    again.close()
    memory = Drive(MemoryStorage(), tmp_path / "memory")  # no storage_position: its stats serve
    assert memory.server.durable is False
    memory.close()


def test_interactive_transactions(tmp_path, backend):
    d = Drive(backend(), tmp_path)
    assert d.txn(1, 7, "begin") == [], "only the commit is answered"
    assert d.txn(2, 7, "write", [("x", b"1"), ("y", b"2")]) == []
    assert d.txn(3, 7, "write", [("y", None)]) == []
    assert d.txn(4, 7, "commit") == [], "acknowledged with the group"
    assert d.get("x") is None
    (ack, _), = d.server.flush()
    assert ack.req == 4 and ack.ok and ack.commit == 1
    assert (d.get("x"), d.get("y")) == (b"1", None)
    # the same number from another client is another transaction
    d.txn(5, 7, "begin", origin="c2")
    d.txn(6, 7, "write", [("z", b"z")], origin="c2")
    assert d.txn(7, 7, "abort", origin="c2") == []
    refused = results(d.txn(8, 7, "commit", origin="c2"))[8]
    assert not refused.ok and "not open (aborted by its client); nothing of it was applied" in refused.error
    assert "never begun" in results(d.txn(9, 99, "commit"))[9].error
    d.txn(10, 8, "begin")
    d.txn(11, 8, "begin")
    assert "begun twice" in results(d.txn(12, 8, "commit"))[12].error
    assert d.get("z") is None and d.server.flush() == []


def test_every_answer_to_a_streamed_request_is_kept_until_its_position_is(tmp_path):
    """An answer given at once (a refused commit) is kept with the next group, which
    moves the position past its request: resent after a crash, never lost."""
    d = Drive(SqliteStorage(), tmp_path)
    d.txn(1, 5, "commit")  # refused at once: never begun
    d.put(2, [("a", b"1")])
    d.server.flush()
    d.close()  # killed: suppose the refusal was still in NNG's queue
    again = Drive(SqliteStorage(), tmp_path)
    resent = {r.req: r for r, _ in again.server.tick(time.monotonic())}
    assert not resent[1].ok and "never begun" in resent[1].error and resent[2].commit == 1


def test_a_transaction_left_open_by_a_dead_client_is_aborted_after_the_timeout(tmp_path, monkeypatch):
    d = Drive(SqliteStorage(), tmp_path)
    d.txn(1, 1, "begin")
    d.txn(2, 1, "write", [("half", b"done")])
    now = time.monotonic()
    d.server.tick(now + storage.TXN_TIMEOUT / 2)
    assert ("c1", 1) in d.server.txns
    d.server.next_check = 0
    d.server.tick(now + storage.TXN_TIMEOUT + 1)
    assert d.server.txns == {} and d.server.counters["txn_timeouts"] == 1
    late = results(d.txn(3, 1, "commit"))[3]
    assert not late.ok and f"aborted after {storage.TXN_TIMEOUT:g} s without a request" in late.error
    assert d.get("half") is None


def test_limits_on_transactions(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "TXN_MAX_WRITES", 3)
    monkeypatch.setattr(storage, "MAX_TXNS_PER_CLIENT", 2)
    d = Drive(SqliteStorage(), tmp_path)
    d.txn(1, 1, "begin")
    d.txn(2, 1, "write", [("a", b"1"), ("b", b"2")])
    d.txn(3, 1, "write", [("c", b"3"), ("d", b"4")])
    assert "aborted: too large: more than 3 writes" in results(d.txn(4, 1, "commit"))[4].error
    d.txn(5, 2, "begin")
    d.txn(6, 3, "begin")
    d.txn(7, 4, "begin")
    assert "refused at begin: too many open transactions" in results(d.txn(8, 4, "commit"))[8].error


def test_bad_input_reaching_the_service_is_refused_and_nothing_applied(tmp_path):
    """The kernel's schema check stops wrong types at the door; a backend still refuses
    them (the service answers, never crashes)."""
    d = Drive(SqliteStorage(), tmp_path)
    bad = results(d.put(1, [("a", b"1"), ("b", "text")]))[1]
    assert not bad.ok and "must be bytes" in bad.error
    assert d.server.flush() == [] and d.get("a") is None
    assert d.put(2, [("a", b"1")]) == [] and results(d.server.flush())[2].commit == 1


def test_a_failed_group_is_answered_with_the_reason_and_nothing_is_acknowledged(tmp_path):
    d = Drive(SqliteStorage(), tmp_path)
    d.put(1, [("a", b"1")])
    d.server.flush()

    def full(*a, **kw):
        raise sqlite3.OperationalError("database or disk is full")
    d.server.backend.tx.storage_commit_group = full  # a hook relay stands in
    d.put(2, [("b", b"2")])
    d.put(3, [("c", b"3")])
    failed = results(d.server.flush())
    assert [(r.ok, r.error) for r in failed.values()] == [(False, "not committed: database or disk is full")] * 2
    assert d.stream.acked == 1, "the position stays before the failed requests"
    assert d.server.backend.hook.storage_get(key="a") == b"1"


class Minimal10:
    """A backend of plugin API 1.0: the five minimal hooks only."""

    def __init__(self):
        self.data, self.seq = {}, 0

    @hookimpl
    def storage_open(self, path):
        return True

    @hookimpl
    def storage_get(self, key):
        return self.data.get(key)

    @hookimpl
    def storage_commit(self, writes):
        self.seq += 1
        for key, value in writes:
            self.data.pop(key, None) if value is None else self.data.__setitem__(key, value)
        return self.seq

    @hookimpl
    def storage_stats(self):
        return {"keys": len(self.data), "last_seq": self.seq, "durable": False}

    @hookimpl
    def storage_close(self):
        pass


def test_a_backend_of_api_1_0_still_works_with_one_sequence_number_per_group(tmp_path):
    d = Drive(Minimal10(), tmp_path)
    d.put(1, [("a", b"1")])
    d.txn(2, 5, "begin")
    d.txn(3, 5, "write", [("b", b"2")])
    d.txn(4, 5, "commit")
    acks = results(d.server.flush())
    assert acks[1].commit == acks[4].commit == 1 and d.get("b") == b"2"
    assert d.server._position() == 4
    scan = results([(d.server.handle(protocol.KvScan(req=9, origin="c1"), Lane.LOW)[0][0], Lane.LOW)])[9]
    assert not scan.ok and "does not implement storage_scan (plugin API 1.1)" in scan.error
    export = d.server.handle(protocol.ExportData(req=10, path=str(tmp_path / "x.snap")), Lane.HIGH)
    assert not export[0][0].ok and "export failed" in export[0][0].error


def test_export_waits_until_everything_sent_before_the_quiesce_is_applied(tmp_path):
    d = Drive(SqliteStorage(), tmp_path / "old")
    d.put(1, [("a", b"1")])
    snap = tmp_path / "h.snap"
    # the kernel sent seq 2 before quiescing, but it is still on its way (LOW)
    assert d.server.handle(protocol.ExportData(req=50, path=str(snap), through=2), Lane.HIGH) == []
    replies = results(d.put(2, [("b", b"2")]))
    handover = replies[50]
    assert (handover.ok, handover.applied_seq, handover.commit, handover.keys) == (True, 2, 2, 4)
    assert replies[1].ok and replies[2].ok, "committed before the export"
    new = Drive(MemoryStorage(), tmp_path / "new")
    (done, _), = new.server.handle(protocol.ImportData(req=51, path=str(snap), applied_seq=2), Lane.HIGH)
    assert (done.ok, done.commit, done.keys, new.stream.acked) == (True, 2, 4, 2)
    assert new.get("b") == b"2"
    (health, _), = new.server.handle(protocol.HealthCheck(req=52), Lane.HIGH)
    assert health.ok


def test_rollback_commits_what_came_before_it_first(tmp_path):
    d = Drive(SqliteStorage(), tmp_path)
    d.put(1, [("k", b"v1")])
    d.server.flush()
    d.put(2, [("k", b"v2")])  # still in the batch when the rollback arrives
    replies = results(d.send(protocol.KvAdmin(req=3, op="rollback", to_seq=1, origin="ctl:3")))
    assert replies[2].commit == 2 and replies[3].commit == 3 and replies[3].info == {"restored": 1, "to": 1}
    assert d.get("k") == b"v1" and d.stream.acked == d.seq
    history = d.server.handle(protocol.KvInfo(req=4, what="history", origin="c1"), Lane.LOW)[0][0].info
    assert [(c["seq"], c["label"]) for c in history["commits"]] == [(3, "rollback to 1"), (2, "c1"), (1, "c1")]


def test_a_data_set_that_went_backwards_is_refused(tmp_path):
    d = Drive(SqliteStorage(), tmp_path)
    for i in range(5):
        d.put(i + 1, [(f"k{i}", b"x")])
        d.server.flush()
    d.close()
    (tmp_path / DB_NAME).unlink()  # e.g. replaced by nothing, or by an older copy
    for suffix in ("-wal", "-shm"):
        (tmp_path / (DB_NAME + suffix)).unlink(missing_ok=True)
    with pytest.raises(StorageError, match="ends at commit 0, but commit 5 was acknowledged.*refusing to serve"):
        Drive(SqliteStorage(), tmp_path)


# =========================================================================== on a kernel

def cli(kernel, *args, input=None):
    from lugh_sdk.cli import app

    result = CliRunner().invoke(app, [*args, "--home", str(kernel.home)], input=input)
    if isinstance(result.exception, LughError):  # what lugh_sdk.cli.main prints, exit 1
        return 1, result.output + f"error: {result.exception}\n"
    return result.exit_code, result.output


def test_lugh_kv_commands(kernel):
    assert cli(kernel, "kv", "put", "grid/f1/limit", "420") == (0, "Committed grid/f1/limit (commit 1).\n")
    assert cli(kernel, "kv", "put", "grid/f2/limit", "--hex", "00ff")[0] == 0
    assert cli(kernel, "kv", "get", "grid/f1/limit") == (0, "420\n")
    assert cli(kernel, "kv", "get", "grid/f2/limit") == (0, "hex:00ff\n")
    code, out = cli(kernel, "kv", "get", "nothing")
    assert code == 1 and "no value" in out
    code, out = cli(kernel, "kv", "scan", "grid/", "--json")
    assert code == 0 and json.loads(out)["items"] == [{"key": "grid/f1/limit", "value": "420"},
                                                      {"key": "grid/f2/limit", "value_hex": "00ff"}]
    assert cli(kernel, "kv", "del", "grid/f1/limit", "grid/f2/limit")[0] == 0
    assert json.loads(cli(kernel, "kv", "scan", "--json")[1])["items"] == []
    code, out = cli(kernel, "kv", "history", "--json")
    assert [c["seq"] for c in json.loads(out)["commits"]] == [3, 2, 1]
    code, out = cli(kernel, "kv", "history", "grid/f1/limit", "--json")
    assert [(v["seq"], v["before"], v["after"]) for v in json.loads(out)["versions"]] == [(3, b"420".decode(), None),
                                                                                        (1, None, "420")]
    assert cli(kernel, "kv", "rollback", "2", input="n\n")[0] == 1, "asks first"
    code, out = cli(kernel, "kv", "rollback", "2", "--yes")
    assert code == 0 and "Restored the state as of commit 2: 2 keys rewritten in commit 4" in out
    assert cli(kernel, "kv", "get", "grid/f1/limit") == (0, "420\n")
    ops = [r for r in kernel.request(protocol.LogReq())["records"] if r["op"].startswith("kvrollback.")]
    assert [r["op"] for r in ops] == ["kvrollback.begin", "kvrollback.commit"] and ops[1]["data"]["commit"] == 4
    code, out = cli(kernel, "kv", "rollback", "99", "--yes")
    assert code == 1 and "commit 99 does not exist yet" in out
    code, out = cli(kernel, "kv", "compact", "--keep", "1")
    assert code == 0 and "rollback can go back to commit 3" in out
    code, out = cli(kernel, "kv", "rollback", "1", "--yes")
    assert code == 1 and "compacted away" in out
    stats = json.loads(cli(kernel, "kv", "stats", "--json")[1])
    assert (stats["keys"], stats["last_seq"], stats["horizon"], stats["api"]) == (2, 4, 3, "1.1")
    code, out = cli(kernel, "kv", "put", ".lugh/applied_seq", "0")
    assert code == 1 and "reserved" in out
    code, out = cli(kernel, "kv", "put", "x" * 2000, "v")
    assert code == 1 and "malformed request" in out


def test_the_sdk_client_lanes_transactions_scans_and_bad_input(kernel):
    with KvClient.attach(kernel.client, "sdk") as kv:
        before = kernel.status()["lanes"]
        assert kv.put("config/limit", b"1") > 0
        reqs = [kv.record(f"grid/voltage/s{i:02d}", 229.5 + i) for i in range(20)]
        assert all(kv.wait(req).ok for req in reqs)
        lanes = kernel.status()["lanes"]
        assert lanes["LOW"]["handled"] - before["LOW"]["handled"] >= 20, "readings travel on LOW"
        assert lanes["HIGH"]["handled"] - before["HIGH"]["handled"] >= 1, "control on HIGH"
        assert kv.get("grid/voltage/s03") == b"232.5"

        with kv.transaction() as txn:
            txn.put("breaker/7", b"open")
            txn.delete("config/limit")
            assert kv.get("breaker/7") is None, "not visible before commit"
        assert txn.commit_seq and kv.get("breaker/7") == b"open" and kv.get("config/limit") is None
        with pytest.raises(RuntimeError):
            with kv.transaction() as txn:
                txn.put("breaker/8", b"open")
                raise RuntimeError("the caller changed its mind")
        assert kv.get("breaker/8") is None

        big = b"x" * 200_000
        kv.write({f"bulk/{i:03d}": big for i in range(4)})
        with pytest.raises(ValueError, match="one message carries at most"):
            kv.write({f"bulk/{i:03d}": big for i in range(4, 12)})
        with kv.transaction() as txn:  # a transaction larger than a message
            txn.write({f"bulk/{i:03d}": big for i in range(4, 8)})
            txn.write({f"bulk/{i:03d}": big for i in range(8, 12)} | {"bulk/zz": b"last"})
        pages = list(kv.scan("bulk/", page=1000))
        assert [k for k, _ in pages] == [f"bulk/{i:03d}" for i in range(12)] + ["bulk/zz"], "pages cut by size"
        assert len(list(kv.scan("grid/voltage/", page=7))) == 20

        for bad, match in [({"k" * 1025: b"v"}, "1 to 1024 characters"), ({"k": b"v" * (256 * 1024 + 1)}, "at most"),
                           ({"k": "text"}, "must be bytes"), ({".lugh/applied_seq": b"0"}, "reserved"),
                           ({f"k{i}": b"" for i in range(1025)}, "at most 1024")]:
            with pytest.raises(ValueError, match=match):
                kv.write(bad)
        # A raw message past the schema is dropped and counted at the kernel's door.
        assert kv.link.send(protocol.KvGet(req=99, key="k" * 2000), Lane.LOW)
        kernel.wait_for(lambda st: st["counters"].get("bad_schema", 0) >= 1, what="the bad message to be counted")
        refused = kv.send(protocol.KvAdmin(req=0, op="compact"), Lane.HIGH)
        assert "control channel" in kv.wait(refused).error, "clients cannot roll back or compact"
        assert kv.stats()["keys"] == 20 + 1 + 13


def test_an_open_transaction_of_a_client_that_died_is_aborted_after_the_timeout(home):
    with running_kernel(home, extra_env={"LUGH_STORAGE_TXN_TIMEOUT": "0.5"}) as running:
        with KvClient.attach(running.client, "dies") as kv:
            txn = kv.transaction()
            txn.put("half/done", b"1")
            running.wait_for(lambda st: _kv_stats(running)["open_transactions"] == 1, what="the transaction to open")
        # the client is gone, its transaction still open
        running.wait_for(lambda st: _kv_stats(running)["txn_timeouts"] >= 1, what="the open transaction to time out")
        assert _kv_stats(running)["open_transactions"] == 0
        assert running.request(protocol.KvReq(get="half/done"))["value"] is None


def _kv_stats(kernel) -> dict:
    return kernel.request(protocol.KvStatsReq())


def write_and_stop(home: Path, keys) -> None:
    with running_kernel(home) as running:
        for i in keys:
            running.request(protocol.KvReq(put=[(f"k{i}", bytes(3000))]))


@pytest.mark.parametrize("damage", ["garble", "old-copy"])
def test_a_corrupt_or_truncated_data_set_is_reported_at_boot_and_never_served(home, damage):
    write_and_stop(home, range(10))
    data = home / "data" / "storage"
    saved = {p.name: p.read_bytes() for p in data.iterdir() if p.name.startswith(DB_NAME)}
    write_and_stop(home, range(10, 30))
    db = data / DB_NAME
    if damage == "garble":
        conn = sqlite3.connect(db)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
        with open(db, "r+b") as f:
            f.seek(4096 * 3)
            f.write(b"\xde\xad\xbe\xef" * 2048)
        expect = "is corrupt"
    else:  # an older copy of the files (or a truncated WAL): SQLite cannot tell
        for name, content in saved.items():
            (data / name).write_bytes(content)
        expect = "ends at commit 10, but commit 30 was acknowledged"
    # Given up after one retry (the default policy retries 5 times; the verdict is the same).
    with running_kernel(home, extra_env={"LUGH_RS_POLICY": '{"intensity": 1}'}) as again:  # settled: storage failed
        st = again.service("storage")
        assert st["state"] == "failed" and expect in st["last_failure"] and "refusing to serve" in st["last_failure"]
        with pytest.raises(LughError, match="safe mode"):
            again.request(protocol.KvReq(put=[("k1", b"")]))
        assert again.service("scheduler")["state"] == "up", "the rest of the kernel runs on"


# --------------------------------------------------------------------------- live swap

class Writers:
    """Attached clients writing numbered transactions until stopped; records what was
    acknowledged. Each transaction writes w<i>/<n>/a and w<i>/<n>/b."""

    def __init__(self, home: Path, count: int = 3):
        self.acked: dict[str, int] = {}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(home, f"w{i}"), daemon=True) for i in range(count)]

    def _run(self, home, name):
        with KernelClient(home) as client, KvClient.attach(client, name, timeout=60) as kv:
            n = 0
            while not self._stop.is_set():
                n += 1
                try:
                    kv.write({f"{name}/{n:06d}/a": b"%d" % n, f"{name}/{n:06d}/b": b"%d" % n})
                    self.acked[name] = n
                except (StorageError, ValueError) as exc:
                    self.errors.append(f"{name}/{n}: {exc}")

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(90)

    def check(self, kernel) -> int:
        """Every acknowledged transaction is present, whole."""
        assert not self.errors, self.errors[:5]
        with KvClient.attach(kernel.client, "check") as kv:
            for name, last in self.acked.items():
                keys = dict(kv.scan(f"{name}/"))
                for n in range(1, last + 1):
                    assert keys.get(f"{name}/{n:06d}/a") == keys.get(f"{name}/{n:06d}/b") == b"%d" % n, (name, n)
        return sum(self.acked.values())


def wait_for_writes(writers, more: int = 20):
    start = sum(writers.acked.values())
    deadline = time.monotonic() + 60
    while sum(writers.acked.values()) < start + more:
        assert time.monotonic() < deadline and not writers.errors, writers.errors[:3]
        time.sleep(0.02)


def swap(kernel, plugin, **kw):
    return kernel.request(protocol.SwapReq(service="storage", plugin=plugin, **kw), timeout=SWAP_TIMEOUT)


def test_live_swap_of_the_storage_backend_there_and_back_under_load(kernel):
    home = kernel.home
    kernel.request(protocol.KvReq(put=[("before/swap", b"1")]))
    kernel.request(protocol.KvReq(put=[("before/swap", b"2")]))
    with Writers(home) as writers:
        wait_for_writes(writers)
        to_memory = swap(kernel, "memory")
        assert to_memory["committed"], to_memory
        wait_for_writes(writers)
        back = swap(kernel, "sqlite-storage")
        assert back["committed"], back
        wait_for_writes(writers)
    total = writers.check(kernel)
    assert total > 60
    st = kernel.service("storage")
    assert (st["plugin"], st["state"], st["lost"]) == ("sqlite-storage", "up", 0)
    # history and sequence numbers crossed both handovers
    versions = kernel.request(protocol.KvHistoryReq(key="before/swap"))["versions"]
    assert [(v["before"], v["after"]) for v in versions] == [(b"1", b"2"), (None, b"1")]
    assert _kv_stats(kernel)["last_seq"] == 2 + total + 0
    records = [r for r in kernel.request(protocol.LogReq())["records"] if r["data"].get("id") == back["id"]]
    assert [r["op"] for r in records] == ["swap.begin", "swap.quiesce", "swap.import", "swap.redirect", "swap.commit"]
    begin = records[0]["data"]
    assert begin["storage_seq"] > 2 and begin["data_dir"] == f"storage-{back['id']}"
    config = json.loads((home / "state" / "services.json").read_text())
    assert config["plugins"]["storage"] == "sqlite-storage" and config["data_dirs"]["storage"] == begin["data_dir"]
    assert sorted(p.name for p in (home / "data").iterdir() if p.name.startswith("storage")) == [begin["data_dir"]]

    # and after a reboot, the swapped-in backend serves the same data
    kernel.client.close()
    runtime.down(home)
    with running_kernel(home) as again:
        assert again.service("storage")["plugin"] == "sqlite-storage"
        assert _kv_stats(again)["last_seq"] == 2 + total
        assert again.request(protocol.KvReq(get="before/swap"))["value"] == b"2"


@pytest.mark.parametrize("mode, step", [("refuse-import", "import"), ("crash-after 2", "window")])
def test_a_failed_storage_swap_rolls_back_without_losing_an_acknowledged_write(kernel, mode, step):
    home = kernel.home
    install_fixture_plugin(home, "faulty-storage")
    (home / "data" / "faulty-storage.mode").write_text(mode)
    old = kernel.service("storage")
    with Writers(home) as writers:
        wait_for_writes(writers)
        result = swap(kernel, "faulty-storage", health_window_ms=3000)
        wait_for_writes(writers)
    assert (result["committed"], result["step"]) == (False, step), result
    writers.check(kernel)
    st = kernel.service("storage")
    assert (st["pid"], st["plugin"], st["state"]) == (old["pid"], "sqlite-storage", "up")
    assert _kv_stats(kernel)["last_seq"] == sum(writers.acked.values()), "each write applied once"
    assert sorted(p.name for p in (home / "data").iterdir() if p.name.startswith("storage")) == ["storage"]
    rollback = [r for r in kernel.request(protocol.LogReq())["records"] if r["data"].get("id") == result["id"]][-1]
    assert rollback["op"] == "swap.rollback" and rollback["data"]["step"] == step
