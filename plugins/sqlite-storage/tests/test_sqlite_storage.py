"""The SQLite storage plugin driven through a real pluggy PluginManager."""

import sqlite3

import pluggy
import pytest

import lugh_sdk.api.storage
from lugh_sqlite_storage.plugin import DB_NAME, SqliteStorage


def open_store(path):
    pm = pluggy.PluginManager("lugh")
    pm.add_hookspecs(lugh_sdk.api.storage)
    pm.register(SqliteStorage())
    assert pm.hook.storage_open(path=str(path)) is True
    return pm.hook


@pytest.fixture
def store(tmp_path):
    hook = open_store(tmp_path / "data")
    yield hook
    hook.storage_close()


def test_commit_get_and_sequence_numbers(store):
    assert store.storage_get(key="a") is None
    assert store.storage_commit(writes=[("a", b"1"), ("b", bytearray(b"2"))]) == 1
    assert store.storage_commit(writes=[("a", b"3")]) == 2
    assert store.storage_commit(writes=[]) == 3
    assert (store.storage_get(key="a"), store.storage_get(key="b")) == (b"3", b"2")


def test_none_deletes(store):
    store.storage_commit(writes=[("a", b"1"), ("b", b"2")])
    store.storage_commit(writes=[("a", None), ("never-there", None)])
    assert store.storage_get(key="a") is None
    assert store.storage_stats()["keys"] == 1


@pytest.mark.parametrize("bad", [("c", "not bytes"), ("c", 7), (3, b"x")])
def test_a_bad_write_fails_the_whole_commit(store, bad):
    store.storage_commit(writes=[("a", b"old")])
    with pytest.raises(TypeError):
        store.storage_commit(writes=[("a", b"new"), ("b", b"2"), bad])
    assert (store.storage_get(key="a"), store.storage_get(key="b")) == (b"old", None)
    # The failed commit consumed no sequence number and left no transaction open.
    assert store.storage_commit(writes=[("b", b"2")]) == 2


def test_data_and_sequence_survive_close_and_reopen(tmp_path):
    first = open_store(tmp_path)
    first.storage_commit(writes=[("k", b"\x00\xff")])
    first.storage_commit(writes=[("k2", b"v")])
    first.storage_close()
    second = open_store(tmp_path)
    assert second.storage_get(key="k") == b"\x00\xff"
    assert second.storage_stats() | {"db_bytes": 0} == {"keys": 2, "commits": 0, "last_seq": 2, "db_bytes": 0}
    assert second.storage_commit(writes=[]) == 3
    second.storage_close()


def test_the_database_is_wal_and_fsyncs_every_commit(tmp_path):
    plugin = SqliteStorage()
    plugin.storage_open(str(tmp_path))
    plugin.storage_commit([("a", b"1")])
    assert plugin.storage_stats()["db_bytes"] > 0
    assert plugin._db.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    plugin.storage_close()
    peek = sqlite3.connect(tmp_path / DB_NAME)
    assert peek.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    peek.close()


@pytest.mark.parametrize("offset", [0, 4096 * 2])
def test_a_corrupt_file_is_refused(tmp_path, offset):
    hook = open_store(tmp_path)
    for i in range(40):
        hook.storage_commit(writes=[(f"key{i}", bytes([i]) * 3000)])
    hook.storage_close()
    with open(tmp_path / DB_NAME, "r+b") as f:
        f.seek(offset)
        f.write(b"\xde\xad\xbe\xef" * 4096)
    with pytest.raises(RuntimeError, match="corrupt"):
        open_store(tmp_path)


def test_use_before_open_is_a_clear_error():
    with pytest.raises(RuntimeError, match="not open"):
        SqliteStorage().storage_get("a")
