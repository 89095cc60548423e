"""Reusable parts for storage backend plugins, so that a backend supplies only its store.

- :class:`StagedTransactions` implements the transaction hooks of plugin API 1.1
  (``storage_begin``/``put``/``delete``/``abort``/``commit_group``) and the 1.0
  ``storage_commit`` on top of one method a backend writes, :meth:`~StagedTransactions.apply_group`:
  open transactions are staged in memory (a dict per transaction, the last write to a
  key wins) and reach the backend only when they commit.
- The **neutral snapshot format** (:func:`write_snapshot`, :func:`read_snapshot`) in which
  ``storage_export`` hands a data set over to ``storage_import`` during a live swap, so
  that any backend can take over from any other.
- Small helpers both first-party backends use: :func:`prefix_end`, :func:`chain_versions`.

pluggy finds hookimpls on an instance through ``dir()``, so the inherited hooks below are
registered for every subclass; an override must carry ``@hookimpl`` again.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from lugh_sdk.api.markers import hookimpl
from lugh_sdk.api.types import StorageError, Version

Writes = dict[str, bytes | None]


def check_key(key) -> None:
    if not isinstance(key, str):
        raise TypeError(f"key must be str, not {type(key).__name__}")


def check_value(key: str, value) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"value of {key!r} must be bytes, not {type(value).__name__}")
    return bytes(value)


class StagedTransactions:
    """The transaction hooks, on writes staged in memory until commit.

    A subclass implements :meth:`apply_group` (and the other hooks of its kind) and calls
    ``super().__init__()``.
    """

    def __init__(self) -> None:
        self._staged: dict[int, Writes] = {}
        # storage_commit (API 1.0) uses transaction numbers the service never uses.
        self._one_shot = itertools.count(-1, -1)

    def apply_group(self, groups: list[tuple[str, Writes]], bookkeeping: dict[str, bytes]) -> list[int]:
        """Apply ``groups`` (label, writes) as consecutive commits plus ``bookkeeping``,
        atomically and durably; return their sequence numbers. Raise, having applied
        nothing, on any failure."""
        raise NotImplementedError

    def _open_txn(self, txn: int) -> Writes:
        try:
            return self._staged[txn]
        except KeyError:
            raise StorageError(f"transaction {txn} is not open") from None

    @hookimpl
    def storage_begin(self, txn: int) -> None:
        if txn in self._staged:
            raise StorageError(f"transaction {txn} is already open")
        self._staged[txn] = {}

    @hookimpl
    def storage_put(self, txn: int, key: str, value: bytes) -> None:
        check_key(key)
        self._open_txn(txn)[key] = check_value(key, value)

    @hookimpl
    def storage_delete(self, txn: int, key: str) -> None:
        check_key(key)
        self._open_txn(txn)[key] = None

    @hookimpl
    def storage_abort(self, txn: int) -> None:
        self._staged.pop(txn, None)

    @hookimpl
    def storage_commit_group(self, txns: list[int], labels: list[str], bookkeeping: dict[str, bytes]) -> list[int]:
        if len(labels) != len(txns):
            raise ValueError("one label per transaction")
        groups = [(label, self._open_txn(txn)) for txn, label in zip(txns, labels)]
        for key, value in bookkeeping.items():
            check_key(key)
            check_value(key, value)
        seqs = self.apply_group(groups, dict(bookkeeping))
        for txn in txns:
            del self._staged[txn]
        return seqs

    @hookimpl
    def storage_commit(self, writes: list[tuple[str, bytes | None]]) -> int:
        txn = next(self._one_shot)
        self.storage_begin(txn)
        try:
            for key, value in writes:
                if value is None:
                    self.storage_delete(txn, key)
                else:
                    self.storage_put(txn, key, value)
            return self.storage_commit_group([txn], [""], {})[0]
        finally:
            self.storage_abort(txn)


def prefix_end(prefix: str) -> str | None:
    """The smallest string that sorts after every string starting with ``prefix`` (None:
    no bound), so that a prefix scan is a range scan ``prefix <= key < prefix_end``."""
    stem = prefix.rstrip("\U0010ffff")
    if not stem:
        return None
    nxt = ord(stem[-1]) + 1
    if 0xD800 <= nxt <= 0xDFFF:  # surrogates are no characters (and no UTF-8)
        nxt = 0xE000
    return stem[:-1] + chr(nxt)


def chain_versions(rows: Iterable[tuple[int, float, str, bytes | None]], current: bytes | None) -> list[Version]:
    """Versions of one key from its before-images, newest first: (seq, at, label,
    before) rows, newest first, and the key's current value. What a commit left is what
    the next newer one found (or the current value, for the newest)."""
    out = []
    after = current
    for seq, at, label, before in rows:
        out.append(Version(seq=seq, at=at, label=label, before=before, after=after))
        after = before
    return out


# --------------------------------------------------------------------------- snapshots
#
# A snapshot file: MAGIC, then frames, each a 4-byte big-endian length and a msgpack
# body: first the header {"format", "last_seq", "horizon"}; then any number of item
# frames ["i", [[key, value], ...]] and commit frames ["c", [[seq, at, label,
# [[key, before], ...]], ...]]; last ["end", {"items", "commits", "sha256"}], the sha256
# of every byte before that frame. Written to a temporary file, fsynced, then renamed.

SNAPSHOT_FORMAT = 1
MAGIC = b"LUGHSNAP"
_CHUNK = 1000
_LEN = struct.Struct(">I")
MAX_FRAME = 64 << 20


@dataclass
class Snapshot:
    last_seq: int
    horizon: int
    items: list[tuple[str, bytes]] = field(default_factory=list)
    # (seq, at, label, [(key, before)]) oldest first
    commits: list[tuple[int, float, str, list[tuple[str, bytes | None]]]] = field(default_factory=list)


class SnapshotError(StorageError):
    """A snapshot file that must not be imported; the message says what is wrong."""


def write_snapshot(path: str | Path, *, last_seq: int, horizon: int, items: Iterable[tuple[str, bytes]],
                   commits: Iterable[tuple[int, float, str, list]]) -> dict:
    """Write a snapshot durably (the file appears whole or not at all); returns
    ``{"last_seq", "keys", "commits"}``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    enc = msgspec.msgpack.Encoder()
    digest = hashlib.sha256()
    counts = {"items": 0, "commits": 0}
    with open(tmp, "wb") as f:
        def frame(body) -> None:
            data = enc.encode(body)
            chunk = _LEN.pack(len(data)) + data
            digest.update(chunk)
            f.write(chunk)

        f.write(MAGIC)
        digest.update(MAGIC)
        frame({"format": SNAPSHOT_FORMAT, "last_seq": last_seq, "horizon": horizon})
        for tag, rows, count in (("i", items, "items"), ("c", commits, "commits")):
            it = iter(rows)
            while chunk := list(itertools.islice(it, _CHUNK)):
                counts[count] += len(chunk)
                frame([tag, chunk])
        data = enc.encode(["end", {**counts, "sha256": digest.hexdigest()}])
        f.write(_LEN.pack(len(data)) + data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"last_seq": last_seq, "keys": counts["items"], "commits": counts["commits"]}


_Item = tuple[str, bytes]
_CommitRow = tuple[int, float, str, list[tuple[str, bytes | None]]]
_item_chunk = msgspec.msgpack.Decoder(tuple[str, list[_Item]])
_commit_chunk = msgspec.msgpack.Decoder(tuple[str, list[_CommitRow]])


def read_snapshot(path: str | Path) -> Snapshot:
    """Read and validate a whole snapshot: magic, framing, checksum, counts, schema,
    keys unique, commits in order within (horizon, last_seq]. Raises SnapshotError."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SnapshotError(f"cannot read snapshot {path}: {exc}") from None
    if not data.startswith(MAGIC):
        raise SnapshotError(f"{path} is not a LughOS storage snapshot")
    frames, pos = [], len(MAGIC)
    while pos < len(data):
        if pos + 4 > len(data):
            raise SnapshotError(f"{path} is truncated")
        (size,) = _LEN.unpack_from(data, pos)
        if size > MAX_FRAME or pos + 4 + size > len(data):
            raise SnapshotError(f"{path} is truncated or corrupt (frame at byte {pos})")
        frames.append((pos, data[pos + 4:pos + 4 + size]))
        pos += 4 + size
    try:
        end_at, end = frames[-1]
        tag, trailer = msgspec.msgpack.decode(end)
        if tag != "end" or hashlib.sha256(data[:end_at]).hexdigest() != trailer["sha256"]:
            raise SnapshotError(f"{path} fails its checksum: corrupt or incomplete")
        header = msgspec.msgpack.decode(frames[0][1])
        if header.get("format") != SNAPSHOT_FORMAT:
            raise SnapshotError(f"{path} has snapshot format {header.get('format')}; this SDK reads {SNAPSHOT_FORMAT}")
        snap = Snapshot(last_seq=int(header["last_seq"]), horizon=int(header["horizon"]))
        for _, body in frames[1:-1]:
            kind = msgspec.msgpack.decode(body)[0]
            if kind == "i":
                snap.items.extend(_item_chunk.decode(body)[1])
            elif kind == "c":
                snap.commits.extend(_commit_chunk.decode(body)[1])
            else:
                raise SnapshotError(f"{path}: unknown frame {kind!r}")
    except SnapshotError:
        raise
    except (msgspec.MsgspecError, ValueError, TypeError, KeyError, IndexError, UnicodeDecodeError) as exc:
        raise SnapshotError(f"{path} is malformed: {exc}") from None
    if (len(snap.items), len(snap.commits)) != (trailer.get("items"), trailer.get("commits")):
        raise SnapshotError(f"{path}: counts differ from its trailer")
    if len({k for k, _ in snap.items}) != len(snap.items):
        raise SnapshotError(f"{path} lists a key twice")
    seqs = [c[0] for c in snap.commits]
    if seqs != sorted(set(seqs)) or any(s <= snap.horizon or s > snap.last_seq for s in seqs):
        raise SnapshotError(f"{path}: commit history out of order or outside ({snap.horizon}, {snap.last_seq}]")
    return snap
