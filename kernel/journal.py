"""The durable, append-only journal of critical operations.

One JSON record per line, each ending with its CRC-32, written and fsync'd *before* the
operation it records takes effect. A torn last line (power cut mid-write) fails its CRC
and is ignored on read, and reported; a bad line in the middle is corruption and is
reported as such (``Journal.problems``), never silently skipped.

Operations are named ``<subject>.<step>``: ``swap.begin``, ``swap.commit``,
``swap.rollback``, ``install.stage``... On boot the kernel resolves any operation that
began and never ended (:func:`unfinished`).
"""

from __future__ import annotations

import json
import os
import threading
import time
import zlib
from pathlib import Path


class Journal:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.problems: list[str] = []
        self._records = self._read()
        self._next = (self._records[-1]["seq"] + 1) if self._records else 1
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        _fsync_dir(path.parent)

    def _read(self) -> list[dict]:
        if not self.path.exists():
            return []
        lines = self.path.read_bytes().split(b"\n")
        records = []
        for number, line in enumerate(lines, 1):
            if not line:
                continue
            body, _, crc = line.rpartition(b"\t")
            try:
                ok = int(crc, 16) == zlib.crc32(body)
                record = json.loads(body) if ok else None
            except ValueError:
                ok, record = False, None
            if record is None:
                last = number >= len(lines) - 1
                self.problems.append(
                    f"journal line {number}: " + ("torn last record ignored" if last else "corrupt record"))
                continue
            records.append(record)
        return records

    def append(self, op: str, **data) -> dict:
        with self._lock:
            record = {"seq": self._next, "at": time.time(), "op": op, "data": data}
            body = json.dumps(record, separators=(",", ":"), sort_keys=True).encode()
            os.write(self._fd, body + b"\t" + format(zlib.crc32(body), "08x").encode() + b"\n")
            os.fsync(self._fd)
            self._next += 1
            self._records.append(record)
            return record

    def records(self, limit: int = 0) -> list[dict]:
        with self._lock:
            return list(self._records[-limit:] if limit else self._records)

    def close(self) -> None:
        os.close(self._fd)


def unfinished(records: list[dict], subject: str) -> list[dict]:
    """``<subject>.begin`` records with no later ``.commit`` or ``.rollback`` for the
    same operation id."""
    open_ops: dict[str, dict] = {}
    for record in records:
        head, _, step = record["op"].partition(".")
        if head != subject:
            continue
        op_id = record["data"].get("id")
        if step == "begin":
            open_ops[op_id] = record
        elif step in ("commit", "rollback"):
            open_ops.pop(op_id, None)
    return list(open_ops.values())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old or the new
    content, never a mix."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
