"""Live swap of a running service's plugin (MINIX 3 live update, Erlang release handling).

Steps, each journaled before it takes effect:

1. ``spawn``: start the new plugin in a new process beside the old one;
2. ``quiesce``: the kernel stops sending the service's stream to the old instance (it
   waits in the service's replay log);
3. ``export``/``import``: the old plugin exports its state, the new one imports and
   validates it (converting from the old kind where they differ);
4. ``health``: the new instance answers a health check;
5. ``redirect``: the service's endpoint now leads to the new instance, which gets the
   stream messages buffered since the export (replay);
6. ``commit``: after the health window, if the new instance is alive and healthy, the
   swap becomes permanent (the active configuration is rewritten) and the old process
   is stopped.

Any failure, timeout or crash rolls back to the old instance, which is still running,
so no job and no message is lost. A swap that was never committed is reverted at the
next boot (:meth:`kernel.core.Kernel.recover`).

What is particular to a kind is its *handover* (:class:`SchedulerHandover`,
:class:`StorageHandover`): how it quiesces, what state crosses, how the old instance is
brought back on a rollback, what is cleaned up. The swap.begin record also carries the
storage's last commit (``storage_seq``): `lugh kv rollback` can return the data to it.

This code runs in the control thread that asked for the swap; every change to kernel
state is handed to the loop with ``kernel.call``.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid

from kernel import kv, plugin_store, processes, protocol
from kernel.protocol import Lane

SPAWN_TIMEOUT = float(os.environ.get("LUGH_SWAP_SPAWN_TIMEOUT", "15"))  # process start and imports on a loaded 2-core machine (QEMU/TCG targets: more)
STEP_TIMEOUT = float(os.environ.get("LUGH_SWAP_STEP_TIMEOUT", "3"))  # each step's answer (a QEMU/TCG target sets more)
DATA_TIMEOUT = 60.0  # export or import of a storage data set (100 000 keys: about a second)


class SwapError(Exception):
    """The swap was refused before anything changed."""


class _Failed(Exception):
    def __init__(self, step: str, reason: str):
        super().__init__(reason)
        self.step = step


def resolve_plugin(home, service: str, name: str) -> str:
    """Accept a plugin's full name or its short form (``priority`` for
    ``priority-scheduler``), optionally with an exact version (``name==1.2.0``, as
    ``lugh install --swap`` asks: the swap and the configuration then name it)."""
    installed = plugin_store.installed(home)
    base, version = plugin_store.split_spec(name)
    if version is not None:
        if version in installed.get(base, []):
            return f"{base}=={version}"
        raise SwapError(f"{base} {version} is not installed (installed: {', '.join(installed.get(base, [])) or 'none'})")
    for candidate in (name, f"{name}-{service}"):
        if candidate in installed:
            return candidate
    raise SwapError(f"no plugin {name!r} is installed (installed: {', '.join(sorted(installed)) or 'none'})")


def run_swap(kernel, service_name: str, plugin_name: str, health_window: float) -> dict:
    handover_of = HANDOVERS.get(service_name)
    if handover_of is None:
        raise SwapError(f"live swap is implemented for the {' and '.join(HANDOVERS)} services; "
                        f"{service_name!r} cannot be swapped")
    plugin = resolve_plugin(kernel.home, service_name, plugin_name)
    manifest = plugin_store.read_manifest(plugin_store.locate(kernel.home, plugin))
    plugin_store.check_compatible(manifest, kind=service_name)
    op = uuid.uuid4().hex[:12]
    started = time.monotonic()
    # Journal writes (fsync) happen here, in the control thread, each before the loop is
    # asked to make its step happen: the dispatch loop never waits for the disk.
    old, previous = kernel.call(_reserve, kernel, op, service_name).result()
    handover = handover_of(kernel, op)
    kernel.journal.append("swap.begin", id=op, service=service_name, to=plugin, storage_seq=kv.last_commit(kernel),
                          **handover.begin_record(), **{"from": previous})
    step = "spawn"
    new = None
    try:
        new = kernel.call(lambda: kernel.start_instance(old.service, plugin=plugin, activate=False,
                                                        data_dir=handover.new_dir)).result()
        _wait(new.ready_future, SPAWN_TIMEOUT, step, "the new instance did not start")
        step = "quiesce"
        kernel.journal.append("swap.quiesce", id=op, peer=old.peer)
        kernel.call(handover.quiesce, old).result()
        step = "export"
        exported = handover.export(old)
        step = "import"
        kernel.journal.append("swap.import", id=op, **handover.describe(exported))
        handover.import_(new, exported)
        step = "health"
        _health(kernel, new, step)
        step = "redirect"
        kernel.journal.append("swap.redirect", id=op, old=old.peer, new=new.peer)
        kernel.call(handover.redirect, old, new).result()
        step = "window"
        time.sleep(health_window)
        if new.child.popen.poll() is not None:
            raise _Failed(step, "the new instance died during its health window")
        _health(kernel, new, step)
        step = "commit"
        record = kernel.journal.append("swap.commit", id=op, service=service_name, to=plugin,
                                       **handover.begin_record(), **{"from": previous})
        result = _finish(kernel, kernel.call(_commit, kernel, handover, record, old, new, plugin), started)
        kernel.save_config()  # the commit record is durable already: a crash before this rolls forward
        handover.cleanup(loser=old, committed=True)
        return result
    except _Failed as failure:
        step, reason = failure.step, str(failure)
    except Exception as exc:  # never leave a swap half-done, whatever went wrong
        reason = f"{type(exc).__name__}: {exc}"
    kernel.journal.append("swap.rollback", id=op, service=service_name, step=step, reason=reason)
    result = _finish(kernel, kernel.call(_rollback, kernel, handover, op, old, new, step, reason), started)
    handover.cleanup(loser=new, committed=False)
    return result


def _finish(kernel, fut, started) -> dict:
    result = fut.result()
    result["duration_ms"] = round((time.monotonic() - started) * 1000, 1)
    return result


def _wait(fut, timeout: float, step: str, what: str):
    try:
        return fut.result(timeout)
    except TimeoutError:
        raise _Failed(step, f"{what} within {timeout:g}s") from None
    except Exception as exc:
        raise _Failed(step, f"{what}: {exc}") from None


def _health(kernel, new, step: str) -> None:
    done = _wait(kernel.call(kernel.request, new, protocol.HealthCheck(req=0), Lane.HIGH).result(),
                 STEP_TIMEOUT, step, "the new instance did not answer its health check")
    if not done.ok:
        raise _Failed(step, f"the new instance failed its health check: {done.error}")


# --- the parts below run on the kernel's loop thread ------------------------------------

def _reserve(kernel, op, service_name):
    service = kernel.services[service_name]
    old = service.active
    if kernel.swapping:
        raise SwapError(f"a swap is already in progress ({kernel.swapping})")
    if old is None or not old.connected:
        raise SwapError(f"the {service_name} service is not running; nothing to swap from")
    kernel.swapping = op
    kernel.swap_marks = (time.monotonic(), dict(kernel.counters), kernel.table.totals.released)
    return old, service.plugin


def _commit(kernel, handover, record, old, new, plugin):
    service = old.service
    kernel.config["plugins"][service.name] = plugin
    kernel.config["op_seq"] = record["seq"]
    handover.commit(old, new)
    service.swap_fallback = None
    previous, service.plugin = service.plugin, plugin
    kernel._send(old, protocol.Stop(), Lane.HIGH)
    return _result(kernel, record["data"]["id"], service, previous, plugin, committed=True)


def _rollback(kernel, handover, op, old, new, step, reason):
    service = old.service
    if new is not None and new.child.popen.poll() is None:
        processes.kill(new.child)
    handover.rollback(old, new)
    service.swap_fallback = None
    if service.active is old and old.child.popen.poll() is not None:
        # The old instance died during the swap, after the redirect (so no one noticed):
        # the reincarnation server restarts it as after any crash.
        service.active = None
        kernel._event("rs", "service_down", service=service.name, reason="exited during a live swap")
    return _result(kernel, op, service, service.plugin, service.plugin, committed=False, step=step, reason=reason)


# --- what is particular to each kind ------------------------------------------------------

class SchedulerHandover:
    """The scheduler's state crosses in an ImportState; while quiesced the kernel
    dispatches with its fallback policy. On a rollback after the redirect the old
    instance is re-synchronised from the kernel's task table."""

    new_dir = None

    def __init__(self, kernel, op):
        self.kernel = kernel

    def begin_record(self) -> dict:
        return {}

    def quiesce(self, old):  # loop thread
        old.service.held = True
        self.kernel.fallback_only = True

    def export(self, old):
        return _wait(self.kernel.call(self.kernel.request, old, protocol.ExportState(req=0), Lane.HIGH).result(),
                     STEP_TIMEOUT, "export", "the old instance did not export its state")

    def describe(self, exported) -> dict:
        return {"jobs": len(exported.state.ready), "through_seq": exported.applied_seq,
                "from_kind": exported.state.kind}

    def import_(self, new, exported) -> None:
        done = _wait(self.kernel.call(self.kernel.request, new, protocol.ImportState(
            req=0, state=exported.state, applied_seq=exported.applied_seq), Lane.HIGH).result(),
            STEP_TIMEOUT, "import", "the new instance did not import the state")
        if not done.ok:
            raise _Failed("import", f"the new instance refused the state: {done.error}")

    def redirect(self, old, new):  # loop thread
        kernel, service = self.kernel, old.service
        service.active = new
        service.started = time.monotonic()
        service.swap_fallback = old
        service.held = False
        kernel._replay(service, new)
        kernel.fallback_only = False
        kernel.pick_req = None  # a decision owed by the old instance no longer counts
        kernel._want_decision()

    def commit(self, old, new):  # loop thread
        pass

    def rollback(self, old, new):  # loop thread
        kernel, service = self.kernel, old.service
        if service.active is not old:  # redirected (the new instance may be dead already)
            service.active = old
            # The new instance may have taken stream messages the old one never saw: give
            # the old one the kernel's truth rather than guess which.
            kernel.request(old, protocol.ImportState(req=0, state=kernel.truth_state(), applied_seq=service.seq),
                           Lane.HIGH)
            old.applied = service.seq
            kernel.pick_req = None
        service.held = False
        kernel._replay(service, old)
        kernel.fallback_only = False
        kernel._want_decision()

    def cleanup(self, loser, committed: bool) -> None:
        pass


class StorageHandover(SchedulerHandover):
    """The data set crosses in a snapshot file, into a new data directory.

    While quiesced, writes wait in the replay log and the old instance still serves
    reads. It commits what it has applied, then exports: the export answers only once
    the old instance has applied every stream message sent before the quiesce, so its
    position ``P`` covers exactly what the snapshot holds. The new instance imports it,
    both sides' last commit and key count must agree, and after the redirect the new
    instance gets the writes that waited.

    During the health window the replay log keeps everything after ``P``, and the new
    instance's acknowledgements are held back. Commit: they are sent, the configuration
    names the new directory, the old one is removed. Rollback: the old instance, still at
    ``P`` with its data set untouched, gets everything after ``P`` replayed and applies
    and acknowledges it itself; nothing the new one did is lost, nothing is acknowledged
    twice by different owners. A client's acknowledgement always comes from the instance
    that keeps the write. Open interactive transactions do not cross (their commit is
    refused; nothing of them is applied).
    """

    def __init__(self, kernel, op):
        super().__init__(kernel, op)
        self.old_dir = kernel.data_dir("storage")
        self.new_dir = kernel.home / "data" / f"storage-{op}"
        self.snapshot = kernel.home / "data" / f".handover-{op}.snap"
        self.position = 0
        self.through = 0

    def begin_record(self) -> dict:
        return {"data_dir": self.new_dir.name, "from_dir": self.old_dir.name}

    def quiesce(self, old):  # loop thread
        old.service.held = True
        self.through = old.service.seq  # everything up to here already went to the old instance

    def export(self, old):
        kernel = self.kernel
        done = _wait(kernel.call(kernel.request, old, protocol.ExportData(req=0, path=str(self.snapshot),
                                                                          through=self.through), Lane.HIGH).result(),
                     DATA_TIMEOUT, "export", "the old instance did not export its data set")
        if not done.ok:
            raise _Failed("export", done.error)
        self.position = done.applied_seq
        return done

    def describe(self, exported) -> dict:
        return {"through_seq": exported.applied_seq, "commit": exported.commit, "keys": exported.keys,
                "data_dir": self.new_dir.name}

    def import_(self, new, exported) -> None:
        kernel = self.kernel
        done = _wait(kernel.call(kernel.request, new, protocol.ImportData(
            req=0, path=str(self.snapshot), applied_seq=exported.applied_seq), Lane.HIGH).result(),
            DATA_TIMEOUT, "import", "the new instance did not import the data set")
        if not done.ok:
            raise _Failed("import", f"the new instance refused the data set: {done.error}")
        if (done.commit, done.keys) != (exported.commit, exported.keys):
            raise _Failed("import", f"the data sets differ after the handover: the old instance has commit "
                                    f"{exported.commit} and {exported.keys} keys, the new one commit {done.commit} "
                                    f"and {done.keys} keys")

    def redirect(self, old, new):  # loop thread
        service = old.service
        service.active = new
        service.started = time.monotonic()
        service.swap_fallback = old
        service.replay_floor = self.position
        service.held_acks = []
        service.held = False
        self.kernel._replay(service, new)

    def commit(self, old, new):  # loop thread
        kernel, service = self.kernel, old.service
        kernel.config.setdefault("data_dirs", {})[service.name] = self.new_dir.name
        held, service.held_acks, service.replay_floor = service.held_acks or [], None, None
        for msg, lane in held:
            kernel.route_kv_result(msg, lane)
        kernel._ack(new, new.applied)

    def rollback(self, old, new):  # loop thread
        kernel, service = self.kernel, old.service
        service.held_acks = service.replay_floor = None  # the old instance answers again itself
        if service.active is not old:  # redirected (the new instance may be dead already)
            service.active = old
            old.applied = self.position
        service.held = False
        kernel._replay(service, old)

    def cleanup(self, loser, committed: bool) -> None:
        """Remove the losing side's data directory once its process is gone (else the
        next boot does: :func:`prune_data_dirs`), and the snapshot."""
        self.snapshot.unlink(missing_ok=True)
        deadline = time.monotonic() + 10.0
        while loser is not None and loser.child.popen.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if loser is None or loser.child.popen.poll() is not None:
            shutil.rmtree(self.old_dir if committed else self.new_dir, ignore_errors=True)


HANDOVERS = {"scheduler": SchedulerHandover, "storage": StorageHandover}


def prune_data_dirs(kernel) -> None:
    """At boot: remove the data directories the journal says a storage swap left behind
    (the old one of a committed swap, the new one of a swap that never committed), and
    stray handover snapshots. Only directories the journal names, never the current one."""
    data = kernel.home / "data"
    if not data.is_dir():
        return
    current = kernel.data_dir("storage").name
    begun, committed = {}, set()
    for rec in kernel.journal.records():
        d = rec["data"]
        if rec["op"] == "swap.begin" and "data_dir" in d:
            begun[d["id"]] = d
        elif rec["op"] == "swap.commit":
            committed.add(d["id"])
    for op_id, d in begun.items():
        stale = d["from_dir"] if op_id in committed else d["data_dir"]
        if stale != current and re.fullmatch(r"storage(-[0-9a-f]{12})?", stale):
            shutil.rmtree(data / stale, ignore_errors=True)
    for path in data.glob(".handover-*.snap*"):
        path.unlink(missing_ok=True)


def _result(kernel, op, service, before, after, *, committed, step="", reason=""):
    since, counters, released_before = kernel.swap_marks
    kernel.swapping = None
    waits = [(g, s) for t, g, s in kernel.gaps if t >= since]
    intervals = [i for t, i in kernel.intervals if t >= since]
    totals = kernel.table.totals
    inst = service.active
    return {
        "id": op, "service": service.name, "plugin": after, "previous": before, "committed": committed,
        "step": step, "reason": reason,
        "jobs_released_during": totals.released - released_before,
        "fallback_decisions": kernel.counters["fallback_decisions"] - counters.get("fallback_decisions", 0),
        "max_dispatch_gap_ms": round(max((g for g, _ in waits), default=0.0) * 1000, 3),
        "max_dispatch_stall_ms": round(max((s for _, s in waits), default=0.0) * 1000, 3),
        "max_dispatch_interval_ms": round(max(intervals, default=0.0) * 1000, 3),
        "jobs_lost": totals.released - totals.completed - len(kernel.table.ready),
        "messages_lost": (inst.lost if inst else 0) + service.replay_lost,
    }
