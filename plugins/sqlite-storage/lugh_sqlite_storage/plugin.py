"""Key-value storage on SQLite, chosen for its crash safety: with WAL and
synchronous=FULL a commit is on disk (WAL fsynced) before ``storage_commit`` returns, and
a crash at any point leaves either all of a commit or none of it."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from lugh_sdk.api import hookimpl

DB_NAME = "kv.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('last_seq', 0);
"""


class SqliteStorage:
    """One database file, ``kv.sqlite3``, in the service's data directory."""

    def __init__(self) -> None:
        self._db: sqlite3.Connection | None = None
        self._file: Path | None = None
        self._commits = 0

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("storage is not open")
        return self._db

    @hookimpl
    def storage_open(self, path: str) -> bool:
        Path(path).mkdir(parents=True, exist_ok=True)
        file = Path(path) / DB_NAME
        # isolation_level=None: the module must not open transactions behind our back,
        # since commit() needs BEGIN IMMEDIATE to take the write lock up front.
        db = sqlite3.connect(file, isolation_level=None)
        try:
            problems = [row[0] for row in db.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError("; ".join(problems[:5]))
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
        except sqlite3.OperationalError:
            # Locked, unreadable, disk full...: a real problem, but not a corrupt file.
            db.close()
            raise
        except sqlite3.DatabaseError as exc:
            db.close()
            raise RuntimeError(f"storage {file} is corrupt ({exc}); restore it from a backup") from exc
        self.storage_close()
        self._db, self._file, self._commits = db, file, 0
        return True

    @hookimpl
    def storage_get(self, key: str) -> bytes | None:
        row = self._conn().execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return bytes(row[0]) if row else None

    @hookimpl
    def storage_commit(self, writes: list[tuple[str, bytes | None]]) -> int:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            for key, value in writes:
                # sqlite would store an int or a str in a BLOB column without a word:
                # refuse it here, inside the transaction, so the whole batch is dropped.
                if not isinstance(key, str):
                    raise TypeError(f"key must be str, not {type(key).__name__}")
                if value is None:
                    db.execute("DELETE FROM kv WHERE key = ?", (key,))
                elif isinstance(value, (bytes, bytearray, memoryview)):
                    db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (key, bytes(value)))
                else:
                    raise TypeError(f"value of {key!r} must be bytes or None, not {type(value).__name__}")
            db.execute("UPDATE meta SET value = value + 1 WHERE name = 'last_seq'")
            seq = self._last_seq()
            db.execute("COMMIT")
        except BaseException:
            # A failed COMMIT may already have rolled back; a second ROLLBACK would hide
            # the real error.
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self._commits += 1
        return seq

    def _last_seq(self) -> int:
        return self._conn().execute("SELECT value FROM meta WHERE name = 'last_seq'").fetchone()[0]

    @hookimpl
    def storage_stats(self) -> dict:
        """``commits`` counts this process's commits since open; ``last_seq`` is durable."""
        db = self._conn()
        files = [self._file, self._file.with_name(DB_NAME + "-wal")]
        return {
            "keys": db.execute("SELECT count(*) FROM kv").fetchone()[0],
            "commits": self._commits,
            "last_seq": self._last_seq(),
            "db_bytes": sum(os.path.getsize(f) for f in files if f.exists()),
        }

    @hookimpl
    def storage_close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
