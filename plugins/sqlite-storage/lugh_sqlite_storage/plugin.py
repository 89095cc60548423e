"""Key-value storage on SQLite, chosen for its crash safety: with WAL and
synchronous=FULL a commit is on disk (WAL fsynced) before ``storage_commit_group``
returns, and a crash at any point leaves either all of a commit or none of it.

Schema (one file, ``kv.sqlite3``):

- ``kv(key, value)``: the current data set;
- ``commits(seq, at, label)``: one row per committed transaction still in the history;
- ``history(key, seq, before)``: the before-image of every key a commit changed (NULL:
  the key did not exist), which is what ``storage_as_of`` (rollback) and
  ``storage_versions`` read;
- ``meta``: ``last_seq``, ``horizon`` (history at or below it was compacted away) and the
  schema version. A data set written by sqlite-storage 1.0 (no history) is upgraded in
  place on open, with its horizon at its last commit.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

from lugh_sdk.api import hookimpl
from lugh_sdk.api.storage_base import StagedTransactions, Writes, chain_versions, prefix_end, read_snapshot, write_snapshot
from lugh_sdk.api.types import HISTORY_KEYS, Commit, RollbackUnavailable, StorageError, Version

DB_NAME = "kv.sqlite3"
SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('last_seq', 0);
INSERT OR IGNORE INTO meta SELECT 'horizon', value FROM meta WHERE name = 'last_seq';
INSERT OR REPLACE INTO meta VALUES ('schema', 2);
CREATE TABLE IF NOT EXISTS commits (seq INTEGER PRIMARY KEY, at REAL NOT NULL, label TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS history (key TEXT NOT NULL, seq INTEGER NOT NULL, before BLOB,
                                    PRIMARY KEY (key, seq)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS history_by_seq ON history (seq);
"""


class SqliteStorage(StagedTransactions):
    """One database file, ``kv.sqlite3``, in the service's data directory."""

    def __init__(self) -> None:
        super().__init__()
        self._db: sqlite3.Connection | None = None
        self._file: Path | None = None
        self._checked: Path | None = None  # the data set storage_check found sound
        self._commits = 0
        self._groups = 0

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StorageError("storage is not open")
        return self._db

    @hookimpl
    def storage_check(self, path: str) -> None:
        file = Path(path) / DB_NAME
        if not file.exists():
            return
        # Read-only: the active incarnation may be writing (WAL readers do not block it).
        db = sqlite3.connect(f"{file.as_uri()}?mode=ro", uri=True, isolation_level=None)
        try:
            self._quick_check(db)
        except sqlite3.OperationalError:
            raise
        except sqlite3.DatabaseError as exc:
            raise self._corrupt(file, exc) from exc
        finally:
            db.close()
        self._checked = file.resolve()

    @staticmethod
    def _corrupt(file: Path, exc: Exception) -> StorageError:
        return StorageError(f"storage {file} is corrupt ({exc}); refusing to serve it: restore it from a backup")

    @staticmethod
    def _quick_check(db: sqlite3.Connection) -> None:
        problems = [row[0] for row in db.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError("; ".join(problems[:5]))

    @hookimpl
    def storage_open(self, path: str) -> bool:
        Path(path).mkdir(parents=True, exist_ok=True)
        file = Path(path) / DB_NAME
        # isolation_level=None: the module must not open transactions behind our back,
        # since a commit needs BEGIN IMMEDIATE to take the write lock up front.
        db = sqlite3.connect(file, isolation_level=None)
        try:
            if self._checked != file.resolve():  # else storage_check found it sound already
                self._quick_check(db)
            if db.execute("PRAGMA journal_mode=WAL").fetchone()[0] != "wal":
                raise sqlite3.OperationalError("cannot use write-ahead logging here")
            db.execute("PRAGMA synchronous=FULL")
            version = self._schema_version(db)
            if version > SCHEMA_VERSION:
                raise StorageError(f"storage {file} has schema {version}, newer than this plugin's "
                                   f"({SCHEMA_VERSION}): upgrade sqlite-storage")
            if version < SCHEMA_VERSION:  # else nothing is written: it opens on a full disk too
                db.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} COMMIT;")
            last, top = db.execute("SELECT (SELECT value FROM meta WHERE name = 'last_seq'), "
                                   "(SELECT max(seq) FROM commits)").fetchone()
            if top is not None and top > last:
                raise sqlite3.DatabaseError(f"commit {top} is recorded beyond the last sequence number {last}")
        except (sqlite3.OperationalError, StorageError):
            # Locked, unreadable, disk full...: a real problem, but not a corrupt file.
            db.close()
            raise
        except sqlite3.DatabaseError as exc:
            db.close()
            raise self._corrupt(file, exc) from exc
        self.storage_close()
        self._db, self._file, self._commits, self._groups = db, file, 0, 0
        return True

    @staticmethod
    def _schema_version(db: sqlite3.Connection) -> int:
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone():
            return 0
        row = db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
        return row[0] if row else 1

    @hookimpl
    def storage_get(self, key: str) -> bytes | None:
        row = self._conn().execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return bytes(row[0]) if row else None

    def _meta(self, name: str) -> int:
        return self._conn().execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()[0]

    def _write(self, fn):
        """Run ``fn(db)`` in one write transaction (durable at COMMIT)."""
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            result = fn(db)
            db.execute("COMMIT")
        except BaseException:
            # A failed COMMIT may already have rolled back; a second ROLLBACK would hide
            # the real error.
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return result

    def apply_group(self, groups: list[tuple[str, Writes]], bookkeeping: dict[str, bytes]) -> list[int]:
        def apply(db):
            seq = self._meta("last_seq")
            seqs, now = [], time.time()
            for label, writes in groups:
                seq += 1
                seqs.append(seq)
                db.execute("INSERT INTO commits VALUES (?, ?, ?)", (seq, now, label))
                # Before-images first, then the writes themselves.
                db.executemany("INSERT INTO history SELECT ?1, ?2, (SELECT value FROM kv WHERE key = ?1)",
                               [(key, seq) for key in writes])
                db.executemany("DELETE FROM kv WHERE key = ?", [(k,) for k, v in writes.items() if v is None])
                db.executemany("INSERT OR REPLACE INTO kv VALUES (?, ?)",
                               [(k, v) for k, v in writes.items() if v is not None])
            db.executemany("INSERT OR REPLACE INTO kv VALUES (?, ?)", bookkeeping.items())
            db.execute("UPDATE meta SET value = ? WHERE name = 'last_seq'", (seq,))
            return seqs

        seqs = self._write(apply)
        self._commits += len(seqs)
        self._groups += 1
        return seqs

    @hookimpl
    def storage_scan(self, prefix: str, after: str, limit: int) -> list[tuple[str, bytes]]:
        end = prefix_end(prefix)
        rows = self._conn().execute(
            "SELECT key, value FROM kv WHERE key >= ? AND key > ? AND (? IS NULL OR key < ?) ORDER BY key LIMIT ?",
            (prefix, after, end, end, limit))
        return [(k, bytes(v)) for k, v in rows]

    @hookimpl
    def storage_history(self, limit: int, before: int) -> list[Commit]:
        db = self._conn()
        rows = db.execute("SELECT seq, at, label FROM commits WHERE ? = 0 OR seq < ? ORDER BY seq DESC LIMIT ?",
                          (before, before, limit)).fetchall()
        out = []
        for seq, at, label in rows:
            changed = db.execute("SELECT count(*) FROM history WHERE seq = ?", (seq,)).fetchone()[0]
            keys = [k for (k,) in db.execute("SELECT key FROM history WHERE seq = ? ORDER BY key LIMIT ?",
                                             (seq, HISTORY_KEYS))]
            out.append(Commit(seq=seq, at=at, label=label, changed=changed, keys=keys))
        return out

    @hookimpl
    def storage_versions(self, key: str, limit: int) -> list[Version]:
        rows = self._conn().execute(
            "SELECT h.seq, c.at, c.label, h.before FROM history h JOIN commits c ON c.seq = h.seq "
            "WHERE h.key = ? ORDER BY h.seq DESC LIMIT ?", (key, limit))
        return chain_versions(((s, a, l, None if b is None else bytes(b)) for s, a, l, b in rows),
                              self.storage_get(key))

    @hookimpl
    def storage_as_of(self, seq: int) -> list[tuple[str, bytes | None]]:
        last, horizon = self._meta("last_seq"), self._meta("horizon")
        if seq > last:
            raise RollbackUnavailable(f"commit {seq} does not exist yet (the last is {last})")
        if seq < horizon:
            raise RollbackUnavailable(f"the history before commit {horizon} has been compacted away; "
                                      f"the oldest state that can be restored is as of commit {horizon}")
        # SQLite takes the bare column `before` from the row that gives MIN(seq): the
        # before-image of the first commit after `seq` is the value as of `seq`.
        rows = self._conn().execute(
            "SELECT key, before, MIN(seq) FROM history WHERE seq > ? GROUP BY key ORDER BY key", (seq,))
        return [(k, None if b is None else bytes(b)) for k, b, _ in rows]

    @hookimpl
    def storage_compact(self, keep: int) -> dict:
        def compact(db):
            horizon = max(self._meta("horizon"), self._meta("last_seq") - keep)
            removed = db.execute("DELETE FROM commits WHERE seq <= ?", (horizon,)).rowcount
            db.execute("DELETE FROM history WHERE seq <= ?", (horizon,))
            db.execute("UPDATE meta SET value = ? WHERE name = 'horizon'", (horizon,))
            return {"horizon": horizon, "removed": removed}

        result = self._write(compact)
        self._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return result

    @hookimpl
    def storage_position(self) -> dict:
        """Two rows of ``meta``: no count, so an open (a restart, a takeover) does not
        grow with the data set."""
        return {"last_seq": self._meta("last_seq"), "horizon": self._meta("horizon"), "durable": True}

    @hookimpl
    def storage_stats(self) -> dict:
        """``commits``/``groups`` count this process's commits and syncs since open."""
        db = self._conn()
        files = [self._file, self._file.with_name(DB_NAME + "-wal")]
        return {
            "keys": db.execute("SELECT count(*) FROM kv").fetchone()[0],
            "last_seq": self._meta("last_seq"),
            "horizon": self._meta("horizon"),
            "history_commits": db.execute("SELECT count(*) FROM commits").fetchone()[0],
            "commits": self._commits,
            "groups": self._groups,
            "bytes": sum(os.path.getsize(f) for f in files if f.exists()),
            "durable": True,
        }

    @hookimpl
    def storage_export(self, path: str) -> dict:
        db = self._conn()
        # One read transaction: the snapshot is one consistent state.
        db.execute("BEGIN")
        try:
            commits = db.execute("SELECT seq, at, label FROM commits ORDER BY seq").fetchall()
            return write_snapshot(
                path, last_seq=self._meta("last_seq"), horizon=self._meta("horizon"),
                items=((k, bytes(v)) for k, v in db.execute("SELECT key, value FROM kv ORDER BY key")),
                commits=((seq, at, label, [(k, None if b is None else bytes(b)) for k, b in db.execute(
                    "SELECT key, before FROM history WHERE seq = ? ORDER BY key", (seq,))])
                         for seq, at, label in commits))
        finally:
            db.execute("COMMIT")

    @hookimpl
    def storage_import(self, path: str) -> dict:
        snap = read_snapshot(path)

        def load(db):
            for table in ("kv", "commits", "history"):
                db.execute(f"DELETE FROM {table}")
            db.executemany("INSERT INTO kv VALUES (?, ?)", snap.items)
            db.executemany("INSERT INTO commits VALUES (?, ?, ?)", [c[:3] for c in snap.commits])
            db.executemany("INSERT INTO history VALUES (?, ?, ?)",
                           [(k, seq, b) for seq, _, _, changes in snap.commits for k, b in changes])
            db.executemany("UPDATE meta SET value = ? WHERE name = ?",
                           [(snap.last_seq, "last_seq"), (snap.horizon, "horizon")])

        self._write(load)
        return {"last_seq": snap.last_seq, "keys": len(snap.items)}

    @hookimpl
    def storage_close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
