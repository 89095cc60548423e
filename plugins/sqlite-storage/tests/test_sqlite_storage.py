"""The SQLite storage plugin driven through a real pluggy PluginManager: the SDK's
conformance checks, then what is particular to SQLite (WAL and FULL sync, corrupt and
truncated files, upgrading a data set written by 1.0)."""

import sqlite3

import pytest

from lugh_sdk.api.types import StorageError
from lugh_sdk.storage_conformance import CHECKS, commit, opener, state
from lugh_sqlite_storage.plugin import DB_NAME, SqliteStorage

open_store = opener(SqliteStorage)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__[len("check_"):])
def test_conformance(check, tmp_path):
    check(open_store, tmp_path)


def test_the_database_is_wal_and_fsyncs_every_commit(tmp_path):
    plugin = SqliteStorage()
    plugin.storage_open(str(tmp_path))
    plugin.storage_commit([("a", b"1")])
    assert plugin.storage_stats()["bytes"] > 0 and plugin.storage_stats()["durable"] is True
    assert plugin._db.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    plugin.storage_close()
    peek = sqlite3.connect(tmp_path / DB_NAME)
    assert peek.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    peek.close()


def fill(path, n=40):
    hook = open_store(path)
    for i in range(n):
        commit(hook, {f"key{i}": bytes([i]) * 3000})
    hook.storage_close()


@pytest.mark.parametrize("damage", ["garble-page", "garble-start", "truncate-half", "truncate-page"])
def test_a_corrupt_or_truncated_file_is_refused(tmp_path, damage):
    fill(tmp_path)
    db = tmp_path / DB_NAME
    size = db.stat().st_size
    with open(db, "r+b") as f:
        if damage.startswith("garble"):
            f.seek(4096 * 2 if damage == "garble-page" else 0)
            f.write(b"\xde\xad\xbe\xef" * 4096)
        else:
            f.truncate(size // 2 if damage == "truncate-half" else 4096 * 3)
    with pytest.raises(StorageError, match="corrupt.*refusing to serve it"):
        open_store(tmp_path)


def test_a_data_set_from_version_1_0_is_upgraded_in_place(tmp_path):
    old = sqlite3.connect(tmp_path / DB_NAME, isolation_level=None)
    old.executescript("""PRAGMA journal_mode=WAL;
        CREATE TABLE kv (key TEXT PRIMARY KEY, value BLOB NOT NULL);
        CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
        INSERT INTO meta VALUES ('last_seq', 17);
        INSERT INTO kv VALUES ('a', x'01'), ('.lugh/applied_seq', CAST('9' AS BLOB));""")
    old.close()
    hook = open_store(tmp_path)
    assert state(hook) == {"a": b"\x01"} and hook.storage_get(key=".lugh/applied_seq") == b"9"
    assert (hook.storage_stats()["last_seq"], hook.storage_stats()["horizon"]) == (17, 17)
    assert commit(hook, {"a": b"\x02"}) == [18]
    assert dict(hook.storage_as_of(seq=17)) == {"a": b"\x01"}
    hook.storage_close()


def test_a_newer_schema_is_refused(tmp_path):
    fill(tmp_path, 1)
    db = sqlite3.connect(tmp_path / DB_NAME, isolation_level=None)
    db.execute("UPDATE meta SET value = 99 WHERE name = 'schema'")
    db.close()
    with pytest.raises(StorageError, match="schema 99"):
        open_store(tmp_path)


def test_use_before_open_is_a_clear_error():
    with pytest.raises(StorageError, match="not open"):
        SqliteStorage().storage_get("a")


def test_storage_check_vouches_for_the_data_set_a_later_open_serves(tmp_path, monkeypatch):
    checks = []
    real = SqliteStorage._quick_check
    monkeypatch.setattr(SqliteStorage, "_quick_check", staticmethod(lambda db: checks.append(1) or real(db)))
    SqliteStorage().storage_check(str(tmp_path))  # nothing there yet: it passes
    assert checks == []
    active = open_store(tmp_path)  # the active incarnation, writing while the standby checks
    commit(active, {"a": b"1"})
    assert checks == [1]
    standby = SqliteStorage()
    standby.storage_check(str(tmp_path))
    commit(active, {"b": b"2"})
    active.storage_close()
    assert checks == [1, 1]
    standby.storage_open(str(tmp_path))  # checked already: not again
    assert checks == [1, 1] and standby.storage_get("b") == b"2"
    standby.storage_close()
    other = SqliteStorage()
    other.storage_open(str(tmp_path / "."))  # no check of its own before: it checks
    assert checks == [1, 1, 1]
    other.storage_close()


def test_storage_check_refuses_a_corrupt_data_set(tmp_path):
    fill(tmp_path)
    with open(tmp_path / DB_NAME, "r+b") as f:
        f.seek(4096 * 2)
        f.write(b"\xde\xad\xbe\xef" * 4096)
    with pytest.raises(StorageError, match="corrupt.*refusing to serve it"):
        SqliteStorage().storage_check(str(tmp_path))
