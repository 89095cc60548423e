"""Key-value storage in memory: a dict for the data set, a list of commits with their
before-images for history and rollback, and a sorted key list for prefix scans."""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass
from pathlib import Path

from lugh_sdk.api import hookimpl
from lugh_sdk.api.storage_base import StagedTransactions, Writes, chain_versions, prefix_end, read_snapshot, write_snapshot
from lugh_sdk.api.types import HISTORY_KEYS, Commit, RollbackUnavailable, StorageError, Version

SNAPSHOT_NAME = "memory.snap"


@dataclass
class _Commit:
    seq: int
    at: float
    label: str
    before: dict[str, bytes | None]  # key -> its value before this commit


class MemoryStorage(StagedTransactions):
    def __init__(self) -> None:
        super().__init__()
        self._path: Path | None = None
        self._data: dict[str, bytes] = {}
        self._keys: list[str] = []  # sorted, for scans
        self._log: list[_Commit] = []  # oldest first, all above the horizon
        self._last_seq = 0
        self._horizon = 0
        self._commits = 0

    def _need_open(self) -> None:
        if self._path is None:
            raise StorageError("storage is not open")

    @hookimpl
    def storage_open(self, path: str) -> bool:
        self._path = Path(path)
        self._path.mkdir(parents=True, exist_ok=True)
        saved = self._path / SNAPSHOT_NAME
        if saved.exists():
            self.storage_import(str(saved))
        return True

    @hookimpl
    def storage_get(self, key: str) -> bytes | None:
        self._need_open()
        return self._data.get(key)

    def _set(self, key: str, value: bytes | None) -> None:
        present = key in self._data
        if value is None:
            if present:
                del self._data[key]
                del self._keys[bisect.bisect_left(self._keys, key)]
        else:
            if not present:
                bisect.insort(self._keys, key)
            self._data[key] = value

    def apply_group(self, groups: list[tuple[str, Writes]], bookkeeping: dict[str, bytes]) -> list[int]:
        self._need_open()
        seqs, now = [], time.time()
        for label, writes in groups:
            self._last_seq += 1
            seqs.append(self._last_seq)
            self._log.append(_Commit(self._last_seq, now, label, {k: self._data.get(k) for k in writes}))
            for key, value in writes.items():
                self._set(key, value)
        for key, value in bookkeeping.items():
            self._set(key, value)
        self._commits += len(seqs)
        return seqs

    @hookimpl
    def storage_scan(self, prefix: str, after: str, limit: int) -> list[tuple[str, bytes]]:
        self._need_open()
        start = bisect.bisect_right(self._keys, after) if after >= prefix else bisect.bisect_left(self._keys, prefix)
        end, out = prefix_end(prefix), []
        for key in self._keys[start:start + limit]:
            if end is not None and key >= end:
                break
            out.append((key, self._data[key]))
        return out

    def _index(self, seq: int) -> int:
        """Position in the log of the first commit with a sequence number above ``seq``."""
        return bisect.bisect_right(self._log, seq, key=lambda c: c.seq)

    @hookimpl
    def storage_history(self, limit: int, before: int) -> list[Commit]:
        self._need_open()
        end = self._index(before - 1) if before else len(self._log)
        return [Commit(seq=c.seq, at=c.at, label=c.label, changed=len(c.before), keys=sorted(c.before)[:HISTORY_KEYS])
                for c in reversed(self._log[max(0, end - limit):end])]

    @hookimpl
    def storage_versions(self, key: str, limit: int) -> list[Version]:
        self._need_open()
        rows = []
        for c in reversed(self._log):
            if len(rows) == limit:
                break
            if key in c.before:
                rows.append((c.seq, c.at, c.label, c.before[key]))
        return chain_versions(rows, self._data.get(key))

    @hookimpl
    def storage_as_of(self, seq: int) -> list[tuple[str, bytes | None]]:
        self._need_open()
        if seq > self._last_seq:
            raise RollbackUnavailable(f"commit {seq} does not exist yet (the last is {self._last_seq})")
        if seq < self._horizon:
            raise RollbackUnavailable(f"the history before commit {self._horizon} has been compacted away; "
                                      f"the oldest state that can be restored is as of commit {self._horizon}")
        state: dict[str, bytes | None] = {}
        for c in self._log[self._index(seq):]:
            for key, before in c.before.items():
                state.setdefault(key, before)  # the first commit after seq knew the value as of seq
        return sorted(state.items())

    @hookimpl
    def storage_compact(self, keep: int) -> dict:
        self._need_open()
        horizon = max(self._horizon, self._last_seq - keep)
        cut = self._index(horizon)
        del self._log[:cut]
        self._horizon = horizon
        return {"horizon": horizon, "removed": cut}

    @hookimpl
    def storage_stats(self) -> dict:
        self._need_open()
        return {"keys": len(self._data), "last_seq": self._last_seq, "horizon": self._horizon,
                "history_commits": len(self._log), "commits": self._commits,
                "bytes": sum(len(k) + len(v) for k, v in self._data.items()), "durable": False}

    @hookimpl
    def storage_export(self, path: str) -> dict:
        self._need_open()
        return write_snapshot(path, last_seq=self._last_seq, horizon=self._horizon,
                              items=((k, self._data[k]) for k in self._keys),
                              commits=((c.seq, c.at, c.label, sorted(c.before.items())) for c in self._log))

    @hookimpl
    def storage_import(self, path: str) -> dict:
        snap = read_snapshot(path)
        self._data = dict(snap.items)
        self._keys = sorted(self._data)
        self._log = [_Commit(seq, at, label, dict(changes)) for seq, at, label, changes in snap.commits]
        self._last_seq, self._horizon = snap.last_seq, snap.horizon
        return {"last_seq": snap.last_seq, "keys": len(snap.items)}

    @hookimpl
    def storage_close(self) -> None:
        if self._path is not None:
            self.storage_export(str(self._path / SNAPSHOT_NAME))
            self._path = None
