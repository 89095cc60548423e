"""Crash consistency of the storage service, under a write load of known transactions.

- kill -9 of the storage process, hundreds of times at random (seeded) moments, the
  reincarnation server restarting it each time; after each restart: every acknowledged
  commit present, no transaction partly visible, nothing applied twice (the last commit
  sequence number counts the transactions exactly), and every write still answered
  (the kernel replays what the dead instance had not committed);
- kill -9 of the whole kernel (its services die with it), then a real reboot, dozens of
  times: every acknowledged commit present, a transaction in flight at the kill applied
  entirely or not at all, never in part;
- a full disk (a small tmpfs; a file-size limit on the storage process where mounting is
  not allowed): writes fail with a clear error, nothing committed is lost, and writing
  works again once there is room.

Counts and seed: LUGH_CRASH_STORAGE_KILLS (default 200), LUGH_CRASH_KERNEL_KILLS (40),
LUGH_CRASH_SEED. Nothing here asserts on elapsed time.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import boot, down_and_check, running_kernel
from kernel import protocol
from lugh_sdk.api.types import StorageError
from lugh_sdk.client import KernelClient
from lugh_sdk.kv import KvClient

SEED = int(os.environ.get("LUGH_CRASH_SEED", "20261125"))
STORAGE_KILLS = int(os.environ.get("LUGH_CRASH_STORAGE_KILLS", "200"))
KERNEL_KILLS = int(os.environ.get("LUGH_CRASH_KERNEL_KILLS", "40"))
WRITERS = 4
# Restart at once, every time: the default policy would (rightly) give up after 5
# crashes in 10 s.
ENV = {"LUGH_RS_POLICY": json.dumps({"intensity": 1_000_000, "backoff_start": 0.0, "backoff_cap": 0.0})}


def booted(home: Path):
    """A kernel without workers (they play no part here), checked at the end like the
    ``kernel`` fixture's: none of its processes is left."""
    return running_kernel(home, workers=0, extra_env=ENV)


# --------------------------------------------------------------------------- the load

class Writer(threading.Thread):
    """One client writing transactions of known content, one at a time: transaction n
    writes keys <tag>/<name>/<n>/<j> (j < size(n)) and <tag>/<name>/last = n; every
    fifth is an interactive transaction (begin, write, commit), the others one message.
    ``status[n]`` is "acked", "refused" (answered with an error: not applied) or
    "unknown" (no answer: the kernel died)."""

    def __init__(self, home: Path, tag: str, name: str):
        super().__init__(daemon=True)
        self.tag, self.name = tag, name
        self.prefix = f"{tag}/{name}/"
        self.client = KernelClient(home)
        self.kv = KvClient.attach(self.client, name)
        self.status: dict[int, str] = {}
        self.errors: dict[int, str] = {}
        self.go = threading.Event()
        self.idle = threading.Event()
        self.dead = False  # the kernel was killed: stop waiting
        self.stop = False

    @staticmethod
    def size(n: int) -> int:
        return 1 + n * 7 % 5

    def writes(self, n: int) -> dict:
        keys = {f"{self.prefix}{n:07d}/{j}": b"%s:%d:%d" % (self.prefix.encode(), n, j) for j in range(self.size(n))}
        return keys | {self.prefix + "last": b"%d" % n}

    def _answer(self, req: int):
        while not self.dead:
            try:
                return self.kv.wait(req, 0.1)
            except StorageError:
                continue
        return None

    def _transaction(self, n: int):
        writes = list(self.writes(n).items())
        if n % 5:
            return self._answer(self.kv.send(protocol.KvPut(req=0, writes=writes), protocol.Lane.MEDIUM))
        reqs = [self.kv.send(protocol.KvTxn(req=0, txn=n, op=op, writes=w), protocol.Lane.MEDIUM)
                for op, w in (("begin", []), ("write", writes[:2]), ("write", writes[2:]), ("commit", []))]
        return self._answer(reqs[-1])  # only the commit is answered

    def run(self):
        n = 0
        while not self.stop:
            self.idle.set()
            self.go.wait()
            self.idle.clear()
            if self.stop or self.dead:
                continue
            n += 1
            self.status[n] = "unknown"
            try:
                result = self._transaction(n)
            except StorageError as exc:  # the lane refused the send: not applied
                self.status[n], self.errors[n] = "refused", str(exc)
                continue
            if result is None:
                self.dead = True
                self.go.clear()
            elif result.ok:
                self.status[n] = "acked"
            else:
                self.status[n], self.errors[n] = "refused", result.error

    def halt(self):
        self.stop = True
        self.go.set()

    def close(self):
        """Close this writer's sockets; every writer's thread must have ended first:
        NNG aborts the process if a socket closes under another thread's send."""
        assert not self.is_alive(), f"{self.name}: the thread did not end"
        if self.dead:
            self.kv.link.close()
        else:
            self.kv.close()
        self.client.close()


class Load:
    def __init__(self, home: Path, tag: str, rng: random.Random):
        self.writers = [Writer(home, tag, f"w{i}") for i in range(WRITERS)]
        self.rng = rng
        for w in self.writers:
            w.start()

    def acked(self) -> int:
        return sum(s == "acked" for w in self.writers for s in list(w.status.values()))

    def run_until_progress(self, at_least: int = 2) -> None:
        """Resume, let a few transactions be acknowledged, then a random extra while."""
        start = self.acked()
        for w in self.writers:
            w.go.set()
        deadline = time.monotonic() + 60
        while self.acked() < start + at_least:
            assert time.monotonic() < deadline, "the write load made no progress"
            time.sleep(0.002)
        time.sleep(self.rng.uniform(0, 0.08))

    def pause(self) -> None:
        """Stop starting transactions and wait until each writer's last one is answered."""
        for w in self.writers:
            w.go.clear()
        for w in self.writers:
            assert w.idle.wait(90), f"{w.name}: a transaction was never answered"

    def kernel_died(self) -> None:
        for w in self.writers:
            w.dead = True
            w.go.clear()

    def close(self) -> None:
        for w in self.writers:
            w.halt()
        for w in self.writers:
            w.join(30)
        for w in self.writers:
            w.close()


class Expect:
    """What the data set must hold: transactions found committed, checked so far."""

    def __init__(self):
        self.txns = 0  # committed transactions: each took exactly one sequence number
        self.keys = 0  # client keys
        self.checked: dict[tuple[str, str], int] = {}  # (tag, writer) -> last transaction checked
        self.with_data: set[tuple[str, str]] = set()  # writers with a committed transaction: a "last" key

    def check(self, kv: KvClient, load: Load, *, all_answered: bool) -> None:
        """Check each writer's transactions since the last check against the data set."""
        for w in load.writers:
            done = self.checked.get((w.tag, w.name), 0)
            after = f"{w.prefix}{done:07d}/\x7f" if done else ""
            found: dict[int, dict] = {}
            last = None
            for key, value in kv.scan(w.prefix, page=2000) if not done else _scan_after(kv, w.prefix, after):
                if key == w.prefix + "last":
                    last = int(value)
                    continue
                n, j = key[len(w.prefix):].split("/")
                found.setdefault(int(n), {})[key] = value
            for n in sorted(found):
                assert n in w.status, f"{w.name}: transaction {n} was never sent but is visible"
            newest = 0
            for n in range(done + 1, max(w.status, default=0) + 1):
                state, present = w.status[n], found.get(n, {})
                expected = {k: v for k, v in w.writes(n).items() if not k.endswith("/last")}
                if present:
                    assert present == expected, f"{w.name}: transaction {n} ({state}) is partly visible: {present}"
                    assert state != "refused", f"{w.name}: transaction {n} was refused ({w.errors.get(n)}) yet applied"
                    newest = n
                    self.txns += 1
                    self.keys += len(expected)
                else:
                    assert state != "acked", f"{w.name}: acknowledged transaction {n} is missing"
                    assert not (all_answered and state == "unknown"), f"{w.name}: transaction {n} never answered"
            if newest:
                assert last == newest, f"{w.name}: last = {last}, but the newest transaction present is {newest}"
                self.with_data.add((w.tag, w.name))
            self.checked[(w.tag, w.name)] = max(w.status, default=0)

    def check_totals(self, kv: KvClient) -> None:
        stats = kv.stats()
        assert stats["last_seq"] == self.txns, f"{stats['last_seq']} commits for {self.txns} transactions: " \
                                               f"one was applied twice or lost"
        assert stats["keys"] == self.keys + len(self.with_data), (stats["keys"], self.keys, len(self.with_data))


def _scan_after(kv: KvClient, prefix: str, after: str):
    """The pairs under ``prefix`` sorting after ``after`` (and the writer's last key)."""
    while True:
        result = kv.call(protocol.KvScan(req=0, prefix=prefix, after=after, limit=2000), protocol.Lane.HIGH, read=True)
        yield from result.items
        if not result.more:
            return
        after = result.info["after"]


def storage_of(kernel) -> dict:
    return kernel.service("storage")


# --------------------------------------------------------------------------- kill -9 storage

@pytest.mark.timeout(1200)  # about 100 s on a quiet 2-core machine; far more when it is shared
def test_kill_storage_hundreds_of_times_under_load(home):
    rng = random.Random(SEED)
    expect = Expect()
    with booted(home) as kernel:
        load = Load(home, "s", rng)
        try:
            with KvClient.attach(kernel.client, "check", timeout=60) as kv:
                pid = storage_of(kernel)["pid"]
                for kill in range(STORAGE_KILLS):
                    load.run_until_progress()
                    os.kill(pid, signal.SIGKILL)
                    st = kernel.wait_for(lambda s: _storage_back(s, pid), timeout=60,
                                         what=f"storage to come back after kill {kill + 1}")
                    pid = next(s["pid"] for s in st["services"] if s["name"] == "storage")
                    load.pause()
                    expect.check(kv, load, all_answered=True)
                    expect.check_totals(kv)
                refused = {n: e for w in load.writers for n, e in w.errors.items()}
                st = kernel.status()
        finally:
            load.close()
    storage = next(s for s in st["services"] if s["name"] == "storage")
    assert storage["restarts"] >= STORAGE_KILLS and storage["lost"] == 0
    # Only interactive transactions open at a kill may be refused (they live in the
    # killed process); a one-message transaction is always applied, once.
    assert all("is not open" in e for e in refused.values()), refused
    assert expect.txns > STORAGE_KILLS, "the load kept writing through the kills"
    print(f"\n{STORAGE_KILLS} storage kills: {expect.txns} transactions committed, {len(refused)} interactive "
          f"transactions refused after their process was killed, restarts {storage['restarts']}")


def _storage_back(status: dict, old_pid: int) -> bool:
    s = next(s for s in status["services"] if s["name"] == "storage")
    return s["state"] == "up" and s["pid"] not in (None, old_pid)


# --------------------------------------------------------------------------- kill -9 kernel

@pytest.mark.timeout(1200)  # about 80 s on a quiet 2-core machine
def test_kill_the_whole_kernel_dozens_of_times_under_load(home):
    rng = random.Random(SEED + 1)
    expect = Expect()
    loads: list[Load] = []
    for kill in range(KERNEL_KILLS + 1):
        running = boot(home, workers=0, extra_env=ENV)
        pids = running.pids()
        try:
            with KvClient.attach(running.client, "check", timeout=60) as kv:
                for load in loads[-1:]:
                    expect.check(kv, load, all_answered=False)
                expect.check_totals(kv)
            if kill < KERNEL_KILLS:
                load = Load(home, f"k{kill:03d}", rng)
                loads.append(load)
                load.run_until_progress()
                os.kill(pids[0], signal.SIGKILL)
                load.kernel_died()
        finally:
            down_and_check(running, pids)  # after a kill: reaps it and waits for its services to die too
        if kill < KERNEL_KILLS:
            loads[-1].close()
    unknown = sum(s == "unknown" for load in loads for w in load.writers for s in w.status.values())
    print(f"\n{KERNEL_KILLS} kernel kills: {expect.txns} transactions committed, {unknown} in flight at a kill "
          f"(each applied entirely or not at all)")
    assert unknown >= 1 and expect.txns > KERNEL_KILLS


# --------------------------------------------------------------------------- full disk

@contextlib.contextmanager
def small_tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (the rlimit variant covers a full disk)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.parametrize("limit", ["tmpfs", "rlimit"])
def test_a_full_disk_fails_writes_clearly_and_loses_nothing_committed(home, limit):
    data = home / "data"
    ballast = data / "ballast"
    with contextlib.ExitStack() as stack:
        if limit == "tmpfs":
            stack.enter_context(small_tmpfs(data, "6m"))
            ballast.write_bytes(bytes(1 << 20))  # freed later: room to write again
        kernel = stack.enter_context(booted(home))
        storage_pid = storage_of(kernel)["pid"]
        kv = stack.enter_context(KvClient.attach(kernel.client, "filler", timeout=60))
        if limit == "rlimit":  # no file of the storage process may grow past this
            resource.prlimit(storage_pid, resource.RLIMIT_FSIZE, (3 << 20, resource.RLIM_INFINITY))
        acked, value, failure = {}, bytes(range(256)) * 200, None
        for i in range(2000):
            key = f"fill/{i:05d}"
            try:
                acked[key] = kv.put(key, value + b"%d" % i)
            except StorageError as exc:
                failure = str(exc)
                break
        assert failure is not None and len(acked) > 3, "the disk filled up"
        assert failure.startswith("not committed: ") and ("full" in failure or "I/O" in failure), failure
        with pytest.raises(StorageError, match="not committed"):
            kv.put("one/more", value)
        # nothing committed is lost, and reads go on
        assert len(dict(kv.scan("fill/"))) == len(acked)
        assert kv.get(f"fill/{len(acked) - 1:05d}") == value + b"%d" % (len(acked) - 1)
        assert kernel.service("storage")["state"] == "up"
        # room again: writes work again, with no restart
        if limit == "tmpfs":
            ballast.unlink()
        else:
            resource.prlimit(storage_pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        assert kv.put("after/room", b"ok") > max(acked.values())
        # and a restart finds everything committed
        os.kill(storage_pid, signal.SIGKILL)
        kernel.wait_for(lambda s: _storage_back(s, storage_pid), what="storage to restart")
        got = dict(kv.scan("fill/"))
        assert got == {k: value + b"%d" % int(k[len("fill/"):]) for k in acked}
        assert kv.get("after/room") == b"ok" and kernel.service("storage")["state"] == "up"
