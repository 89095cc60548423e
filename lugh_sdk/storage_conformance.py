"""Conformance checks for storage backend plugins (plugin API 1.1), runnable from a
plugin's own test suite without a kernel:

    from lugh_sdk.storage_conformance import CHECKS, opener

    @pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
    def test_conformance(check, tmp_path):
        check(opener(MyStorage), tmp_path)

Each check takes ``open_store(path) -> hook`` (a pluggy hook relay with the plugin
registered and its data set at ``path`` opened) and a scratch directory, and raises
AssertionError with what differs. They pin the semantics the storage service relies on:
atomic transactions, one sequence number per transaction, group commit, bookkeeping never
versioned, prefix scans, history and before-images, rollback through ``storage_as_of``,
compaction, and the snapshot handover between backends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pluggy

import lugh_sdk.api.storage
from lugh_sdk.api import PROJECT
from lugh_sdk.api.storage_base import SnapshotError
from lugh_sdk.api.types import RollbackUnavailable, StorageError

Opener = Callable[[Path], object]


def opener(plugin_class) -> Opener:
    """``open_store`` for a plugin class: a fresh instance per call, through pluggy."""
    def open_store(path: Path):
        pm = pluggy.PluginManager(PROJECT)
        pm.add_hookspecs(lugh_sdk.api.storage)
        pm.register(plugin_class())
        pm.check_pending()
        assert pm.hook.storage_open(path=str(path)) is True
        return pm.hook
    return open_store


_next_txn = iter(range(1, 1 << 62))


def commit(hook, *transactions: dict, labels=None, bookkeeping=None) -> list[int]:
    """Commit ``transactions`` (each {key: value or None}) as one group."""
    txns = []
    for writes in transactions:
        txn = next(_next_txn)
        hook.storage_begin(txn=txn)
        for key, value in writes.items():
            if value is None:
                hook.storage_delete(txn=txn, key=key)
            else:
                hook.storage_put(txn=txn, key=key, value=value)
        txns.append(txn)
    return hook.storage_commit_group(txns=txns, labels=labels or [""] * len(txns), bookkeeping=bookkeeping or {})


def state(hook, prefix: str = "") -> dict:
    return {k: v for k, v in hook.storage_scan(prefix=prefix, after="", limit=1 << 30) if not k.startswith(".lugh/")}


def rollback(hook, seq: int) -> list[int]:
    return commit(hook, dict(hook.storage_as_of(seq=seq)), labels=[f"rollback to {seq}"])


def check_transactions_and_sequence_numbers(open_store: Opener, tmp: Path) -> None:
    s = open_store(tmp)
    first = s.storage_stats()["last_seq"]
    assert commit(s, {"a": b"1", "b": b"2"}) == [first + 1]
    assert commit(s, {"a": b"3"}, {"b": None}, {}) == [first + 2, first + 3, first + 4], "one seq per transaction"
    assert commit(s) == [], "bookkeeping alone takes no sequence number"
    assert (s.storage_get(key="a"), s.storage_get(key="b")) == (b"3", None)
    assert s.storage_stats()["last_seq"] == first + 4
    s.storage_begin(txn=424242)
    s.storage_put(txn=424242, key="c", value=b"staged")
    assert s.storage_get(key="c") is None, "nothing is visible before commit"
    s.storage_abort(txn=424242)
    s.storage_abort(txn=424242)  # aborting twice is a no-op
    try:
        s.storage_commit_group(txns=[424242], labels=[""], bookkeeping={})
        raise AssertionError("an aborted transaction committed")
    except StorageError:
        pass
    assert s.storage_get(key="c") is None
    assert s.storage_commit(writes=[("d", b"4"), ("a", None)]) == first + 5, "API 1.0 storage_commit"
    assert (s.storage_get(key="d"), s.storage_get(key="a")) == (b"4", None)
    s.storage_close()


def check_bad_writes_are_refused(open_store: Opener, tmp: Path) -> None:
    s = open_store(tmp)
    for bad_key, bad_value in (("k", "text"), ("k", 7), (3, b"x")):
        s.storage_begin(txn=99)
        try:
            s.storage_put(txn=99, key=bad_key, value=bad_value)
            raise AssertionError(f"put({bad_key!r}, {bad_value!r}) was accepted")
        except TypeError:
            pass
        finally:
            s.storage_abort(txn=99)
    try:
        s.storage_put(txn=12345, key="k", value=b"v")
        raise AssertionError("a put into a transaction never begun was accepted")
    except StorageError:
        pass
    assert state(s) == {}
    s.storage_close()


def check_bookkeeping_is_atomic_and_unversioned(open_store: Opener, tmp: Path) -> None:
    s = open_store(tmp)
    base = commit(s, {"x": b"0"})[0]
    commit(s, {"x": b"1"}, bookkeeping={".lugh/pos": b"7"})
    commit(s, bookkeeping={".lugh/pos": b"8"})
    assert s.storage_get(key=".lugh/pos") == b"8"
    assert dict(s.storage_as_of(seq=base)) == {"x": b"0"}, "bookkeeping is never rolled back"
    assert all(".lugh/pos" not in c.keys for c in s.storage_history(limit=10, before=0))
    s.storage_close()


def check_prefix_scan(open_store: Opener, tmp: Path) -> None:
    s = open_store(tmp)
    keys = ["a", "a/1", "a/2", "a/10", "a0", "ab", "b", "é/x", "\U0010ffff", "\U0010ffff/z"]
    commit(s, {k: k.encode() for k in keys})
    scan = lambda prefix, after="", limit=100: [k for k, _ in s.storage_scan(prefix=prefix, after=after, limit=limit)]
    assert scan("") == sorted(keys)
    assert scan("a/") == ["a/1", "a/10", "a/2"]
    assert scan("a") == ["a", "a/1", "a/10", "a/2", "a0", "ab"]
    assert scan("a/", after="a/1") == ["a/10", "a/2"]
    assert scan("a", limit=2) == ["a", "a/1"]
    assert scan("\U0010ffff") == ["\U0010ffff", "\U0010ffff/z"]
    assert scan("é") == ["é/x"] and scan("zz") == []
    assert dict(s.storage_scan(prefix="b", after="", limit=5)) == {"b": b"b"}
    s.storage_close()


def check_history_and_versions(open_store: Opener, tmp: Path) -> None:
    s = open_store(tmp)
    s1, = commit(s, {"k": b"1", "other": b"o"}, labels=["alice"])
    s2, = commit(s, {"k": b"2"}, labels=["bob"])
    s3, = commit(s, {"k": None}, labels=["carol"])
    history = s.storage_history(limit=10, before=0)
    assert [(c.seq, c.label, c.keys, c.changed) for c in history[:3]] == [
        (s3, "carol", ["k"], 1), (s2, "bob", ["k"], 1), (s1, "alice", ["k", "other"], 2)]
    assert [c.seq for c in s.storage_history(limit=1, before=s3)] == [s2]
    versions = s.storage_versions(key="k", limit=10)
    assert [(v.seq, v.before, v.after, v.label) for v in versions] == [
        (s3, b"2", None, "carol"), (s2, b"1", b"2", "bob"), (s1, None, b"1", "alice")]
    assert [v.seq for v in s.storage_versions(key="k", limit=2)] == [s3, s2]
    assert s.storage_versions(key="never", limit=5) == []
    s.storage_close()


def check_rollback_restores_the_state_as_of_a_commit(open_store: Opener, tmp: Path) -> None:
    s = open_store(tmp)
    s1, = commit(s, {"a": b"1", "b": b"1"})
    as_of_s1 = state(s)
    commit(s, {"a": b"2", "c": b"new"}, {"b": None})
    s3, = commit(s, {"a": b"3", "d": b"d"})
    as_of_s3 = state(s)
    assert dict(s.storage_as_of(seq=s1)) == {"a": b"1", "b": b"1", "c": None, "d": None}
    back, = rollback(s, s1)
    assert back == s3 + 1 and state(s) == as_of_s1, "rollback is a commit of its own"
    rollback(s, s3)
    assert state(s) == as_of_s3, "a rollback can itself be rolled back"
    assert s.storage_as_of(seq=s.storage_stats()["last_seq"]) == []
    for seq in (s.storage_stats()["last_seq"] + 1,):
        try:
            s.storage_as_of(seq=seq)
            raise AssertionError("as_of a future commit was accepted")
        except RollbackUnavailable:
            pass
    s.storage_close()


def check_compaction(open_store: Opener, tmp: Path) -> None:
    s = open_store(tmp)
    seqs = [commit(s, {"k": str(i).encode(), f"k{i}": b"x"})[0] for i in range(10)]
    before = state(s)
    out = s.storage_compact(keep=3)
    assert out["horizon"] == seqs[-1] - 3 and out["removed"] == 7, out
    assert state(s) == before, "compaction changes no data"
    assert [c.seq for c in s.storage_history(limit=100, before=0)] == seqs[:-4:-1]
    assert s.storage_stats()["horizon"] == seqs[-1] - 3
    try:
        s.storage_as_of(seq=seqs[5])
        raise AssertionError("as_of below the horizon was accepted")
    except RollbackUnavailable as exc:
        assert str(seqs[-1] - 3) in str(exc)
    rollback(s, seqs[-1] - 3)
    assert s.storage_get(key="k") == b"6"
    assert s.storage_compact(keep=100)["horizon"] == seqs[-1] - 3, "the horizon never moves back"
    s.storage_close()


def check_close_and_reopen_keep_everything(open_store: Opener, tmp: Path) -> None:
    s = open_store(tmp)
    commit(s, {"k": b"\x00\xff", "j": b""}, bookkeeping={".lugh/pos": b"3"})
    last = s.storage_stats()["last_seq"]
    history = s.storage_history(limit=10, before=0)
    s.storage_close()
    again = open_store(tmp)
    assert (again.storage_get(key="k"), again.storage_get(key="j"), again.storage_get(key=".lugh/pos")) == \
        (b"\x00\xff", b"", b"3")
    assert again.storage_stats()["last_seq"] == last
    assert again.storage_history(limit=10, before=0) == history
    assert commit(again, {"k": b"2"}) == [last + 1]
    again.storage_close()


def check_export_import_round_trip(open_store: Opener, tmp: Path, other: Opener | None = None) -> None:
    """Export from this backend, import into ``other`` (default: this one again)."""
    src = open_store(tmp / "src")
    for i in range(2500):  # more than one snapshot chunk
        commit(src, {f"key{i:05d}": i.to_bytes(4, "big"), "counter": str(i).encode()}, labels=[f"w{i % 3}"])
    commit(src, {"key00007": None}, bookkeeping={".lugh/pos": b"42"})
    src.storage_compact(keep=2000)
    snap = tmp / "handover.snap"
    exported = src.storage_export(path=str(snap))
    stats = src.storage_stats()
    assert exported["last_seq"] == stats["last_seq"] and exported["keys"] == stats["keys"], exported
    dst = (other or open_store)(tmp / "dst")
    commit(dst, {"stale": b"gone after import"})
    assert dst.storage_import(path=str(snap)) == {"last_seq": stats["last_seq"], "keys": stats["keys"]}
    assert state(dst) == state(src) and dst.storage_get(key=".lugh/pos") == b"42"
    assert dst.storage_history(limit=5000, before=0) == src.storage_history(limit=5000, before=0)
    assert dst.storage_versions(key="counter", limit=50) == src.storage_versions(key="counter", limit=50)
    assert dst.storage_stats()["horizon"] == stats["horizon"]
    assert dst.storage_as_of(seq=stats["horizon"] + 10) == src.storage_as_of(seq=stats["horizon"] + 10)
    assert commit(dst, {"next": b"1"}) == [stats["last_seq"] + 1]

    data = snap.read_bytes()
    for broken in (data[: len(data) // 2], data[:-5] + b"\x00" * 5, b"NOTASNAP" + data[8:]):
        snap.write_bytes(broken)
        before = state(dst)
        try:
            dst.storage_import(path=str(snap))
            raise AssertionError("a damaged snapshot was imported")
        except SnapshotError:
            pass
        assert state(dst) == before, "a refused import changes nothing"
    src.storage_close()
    dst.storage_close()


def check_storage_check_passes_a_sound_data_set(open_store: Opener, tmp: Path) -> None:
    """``storage_check`` (API 1.2) passes a sound data set and one that does not exist
    yet, from a process that has another data set open, and leaves the data set as it was."""
    hook = open_store(tmp / "a")
    commit(hook, {"k": b"v"})
    hook.storage_close()
    other = open_store(tmp / "b")
    other.storage_check(path=str(tmp / "a"))
    other.storage_check(path=str(tmp / "nothing-yet"))
    other.storage_close()
    again = open_store(tmp / "a")
    assert again.storage_get(key="k") == b"v", "the data set changed across storage_check"
    again.storage_close()


def check_storage_position_agrees_with_stats(open_store: Opener, tmp: Path) -> None:
    """``storage_position`` (API 1.3) gives ``last_seq``, ``horizon`` and ``durable`` as
    ``storage_stats`` does, after commits, a compaction and a reopen. A backend without
    it has nothing to agree (the service asks it for ``storage_stats``)."""
    def agree(hook) -> None:
        stats, position = hook.storage_stats(), hook.storage_position()
        assert position == {k: stats[k] for k in ("last_seq", "horizon", "durable")}, (position, stats)

    hook = open_store(tmp)
    if not hook.storage_position.get_hookimpls():
        hook.storage_close()
        return
    agree(hook)
    for i in range(4):
        commit(hook, {f"k{i}": b"v"})
    agree(hook)
    hook.storage_compact(keep=1)
    agree(hook)
    hook.storage_close()
    again = open_store(tmp)
    agree(again)
    again.storage_close()


CHECKS = [
    check_transactions_and_sequence_numbers,
    check_bad_writes_are_refused,
    check_bookkeeping_is_atomic_and_unversioned,
    check_prefix_scan,
    check_history_and_versions,
    check_rollback_restores_the_state_as_of_a_commit,
    check_compaction,
    check_close_and_reopen_keep_everything,
    check_export_import_round_trip,
    check_storage_check_passes_a_sound_data_set,
    check_storage_position_agrees_with_stats,
]
