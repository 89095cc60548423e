"""The storage conformance suite, as cases of :mod:`lugh_sdk.harness.conformance`.

Two sources, one suite:

- the checks of :mod:`lugh_sdk.storage_conformance` (plugin API 1.1: transactions and
  sequence numbers, bookkeeping, prefix scans, history and versions, rollback through
  ``storage_as_of``, compaction, close and reopen, the snapshot handover), each needing
  the hook groups it uses, so that a backend of API 1.0 skips them;
- the cases below, on the API 1.0 hooks every backend has: atomic ``storage_commit``,
  odd keys and values, close and reopen, and durability across a process crash.

Durability is tested as far as a test can: a child process commits in a loop and is
killed with SIGKILL at an arbitrary moment; every commit it saw acknowledged must be
there after reopening, and the one in flight must be there whole or not at all. That
proves the data left the process before ``storage_commit`` returned; that it reached
the disk (fsync) before a power cut cannot be observed from a test and remains the
backend's promise (see docs/vendor-guide.md).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import msgspec

from lugh_sdk import storage_conformance
from lugh_sdk.harness.conformance import Context, Skipped, case, expect
from lugh_sdk.harness.loader import hook_groups

# Hook groups (lugh_sdk.harness.loader.hook_groups) each check of storage_conformance uses;
# a check not listed here is taken to need every group.
_CHECK_GROUPS = {
    "check_transactions_and_sequence_numbers": ("transactions",),
    "check_bad_writes_are_refused": ("transactions", "scan"),
    "check_bookkeeping_is_atomic_and_unversioned": ("transactions", "versions"),
    "check_prefix_scan": ("transactions", "scan"),
    "check_history_and_versions": ("transactions", "versions"),
    "check_rollback_restores_the_state_as_of_a_commit": ("transactions", "scan", "versions"),
    "check_compaction": ("transactions", "scan", "versions", "compact"),
    "check_close_and_reopen_keep_everything": ("transactions", "versions"),
    "check_storage_check_passes_a_sound_data_set": ("transactions", "check"),
    "check_storage_position_agrees_with_stats": ("transactions", "versions", "compact", "position"),
}


def _needs(check_name: str) -> tuple[str, ...]:
    groups = hook_groups("storage")
    names = _CHECK_GROUPS.get(check_name, tuple(groups))
    return tuple(h for g in names for h in groups.get(g, ()))


def _register(check) -> None:
    def run(ctx: Context) -> None:
        check(storage_conformance.opener(ctx.instance), ctx.workdir)

    run.__doc__ = check.__doc__ or check.__name__.removeprefix("check_").replace("_", " ").capitalize() + "."
    case("storage", check.__name__.removeprefix("check_").replace("_", "-"), needs=_needs(check.__name__))(run)


for _check in storage_conformance.CHECKS:
    _register(_check)


# --- API 1.0 cases ----------------------------------------------------------------------

_BASE = ("storage_open", "storage_get", "storage_commit", "storage_stats", "storage_close")


def _open(ctx: Context, path: Path):
    hook = ctx.new()
    expect(hook.storage_open(path=str(path)) is True, "storage_open did not return True")
    return hook


@case("storage", "commit-is-atomic", needs=_BASE)
def _atomic(ctx: Context) -> None:
    """A storage_commit with one bad write (a str value) raises and applies none of
    its writes; the next commit works."""
    hook = _open(ctx, ctx.workdir)
    first = hook.storage_commit(writes=[("a", b"old")])
    try:
        hook.storage_commit(writes=[("a", b"new"), ("b", b"2"), ("c", "not bytes")])
    except Exception:
        pass
    else:
        raise AssertionError("storage_commit accepted a str value (values are bytes or None)")
    expect((hook.storage_get(key="a"), hook.storage_get(key="b")) == (b"old", None),
           "a failed storage_commit applied some of its writes")
    expect(hook.storage_commit(writes=[("b", b"2")]) > first, "sequence numbers must increase")
    hook.storage_close()


@case("storage", "keys-and-values", needs=_BASE)
def _keys_and_values(ctx: Context) -> None:
    """Any str key (the service's own '.lugh/' keys, '/', non-ASCII, 1 KiB long) and any
    bytes value (empty, every byte, 256 KiB) are stored exactly; None deletes."""
    pairs = {".lugh/applied_seq": b"17", "a/b/c": b"", "ünïcödé ✓": bytes(range(256)), "k" * 1024: b"x" * (256 << 10),
             " ": b"\x00"}
    hook = _open(ctx, ctx.workdir)
    hook.storage_commit(writes=list(pairs.items()))
    for key, value in pairs.items():
        expect(hook.storage_get(key=key) == value, f"key {key[:20]!r} did not read back what was written")
    hook.storage_commit(writes=[("a/b/c", None), ("never-there", None)])
    expect(hook.storage_get(key="a/b/c") is None, "a None write did not delete the key")
    hook.storage_close()


@case("storage", "stats-cross-ipc", needs=_BASE)
def _stats(ctx: Context) -> None:
    """storage_stats is a dict with int ``keys`` and ``last_seq`` that can be sent over IPC."""
    hook = _open(ctx, ctx.workdir)
    seq = hook.storage_commit(writes=[("a", b"1"), ("b", b"2")])
    stats = hook.storage_stats()
    expect(isinstance(stats, dict), f"storage_stats returned {type(stats).__name__}, not a dict")
    expect(stats.get("keys") == 2 and stats.get("last_seq") == seq,
           f"storage_stats says keys={stats.get('keys')!r}, last_seq={stats.get('last_seq')!r}; expected 2 and {seq}")
    try:
        msgspec.msgpack.encode(stats)
    except (TypeError, msgspec.EncodeError) as exc:
        raise AssertionError(f"storage_stats cannot be sent over IPC: {exc}") from None
    hook.storage_close()


@case("storage", "reopen-keeps-commits", needs=_BASE)
def _reopen(ctx: Context) -> None:
    """What was committed is there after close and reopen by a fresh instance, and
    sequence numbers go on from the last one."""
    ctx.require_fresh()
    hook = _open(ctx, ctx.workdir)
    for i in range(3):
        last = hook.storage_commit(writes=[(f"k{i}", str(i).encode()), ("gone", None if i else b"x")])
    hook.storage_close()
    again = _open(ctx, ctx.workdir)
    expect([again.storage_get(key=f"k{i}") for i in range(3)] == [b"0", b"1", b"2"] and
           again.storage_get(key="gone") is None, "committed data differ after close and reopen")
    expect(again.storage_commit(writes=[("k3", b"3")]) > last, "sequence numbers went back after reopening")
    again.storage_close()


_CRASH_CHILD = textwrap.dedent("""
    import importlib, json, os, sys
    sys.path[:0] = json.loads(os.environ["LUGH_HARNESS_PATH"])
    from lugh_sdk.harness.loader import plugin_manager
    module, _, attr = sys.argv[1].partition(":")
    obj = importlib.import_module(module)
    for part in filter(None, attr.split(".")):
        obj = getattr(obj, part)
    hook = plugin_manager("storage", obj).hook
    hook.storage_open(path=sys.argv[2])
    print("durable", json.dumps(hook.storage_stats().get("durable", True)), flush=True)
    for i in range(100000):
        seq = hook.storage_commit(writes=[(f"a{i}", str(i).encode()), (f"b{i}", str(i).encode())])
        print("acked", i, seq, flush=True)
""")


@case("storage", "crash-keeps-acknowledged-commits", needs=_BASE)
def _crash(ctx: Context) -> None:
    """A process killed (SIGKILL) while committing loses no acknowledged commit, and
    the commit in flight is there whole or not at all."""
    ctx.require_fresh()
    ref = ctx.ref
    if ref is None:
        raise Skipped("the plugin cannot be imported by name in a child process (define its class at module level)")
    data = ctx.workdir / "data"
    env = {**os.environ, "LUGH_HARNESS_PATH": json.dumps([p for p in sys.path if p])}
    child = subprocess.Popen([sys.executable, "-c", _CRASH_CHILD, ref, str(data)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    acked: list[int] = []
    try:
        for line in child.stdout:
            word, *rest = line.split()
            if word == "durable" and rest == ["false"]:
                raise Skipped("the backend says it is not durable (storage_stats: durable False)")
            if word == "acked":
                acked.append(int(rest[0]))
                if len(acked) >= 40:
                    break
    finally:
        child.send_signal(signal.SIGKILL)
        _, err = child.communicate(timeout=60)
    expect(len(acked) >= 40, f"the child committing through the plugin failed: {err.strip()[-800:]}")
    hook = _open(ctx, data)
    lost = [i for i in acked if hook.storage_get(key=f"a{i}") != str(i).encode()]
    expect(not lost, f"acknowledged commits lost after a crash: {lost[:10]}")
    n = acked[-1] + 1  # perhaps in flight when killed
    a, b = hook.storage_get(key=f"a{n}"), hook.storage_get(key=f"b{n}")
    expect(a == b, f"the commit in flight at the crash was applied in part: a={a!r}, b={b!r}")
    hook.storage_close()
