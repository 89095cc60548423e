"""Live swap of a running service's plugin (MINIX 3 live update, Erlang release handling).

Steps, each journaled before it takes effect:

1. ``spawn``: start the new plugin in a new process beside the old one;
2. ``quiesce``: the kernel stops sending the service's stream to the old instance (it
   waits in the service's replay log) and dispatches with its fallback policy;
3. ``export``/``import``: the old plugin exports its state, the new one imports and
   validates it (converting from the old kind where they differ);
4. ``health``: the new instance answers a health check;
5. ``redirect``: the service's endpoint now leads to the new instance, which gets the
   stream messages buffered since the export (replay), and decides again;
6. ``commit``: after the health window, if the new instance is alive and healthy, the
   swap becomes permanent (the active configuration is rewritten) and the old process
   is stopped.

Any failure, timeout or crash rolls back to the old instance: it is still running, and
if the endpoint had been redirected it is re-synchronised from the kernel's task table,
so no job and no message is lost. A swap that was never committed is reverted at the
next boot (:meth:`kernel.core.Kernel.recover`).

This code runs in the control thread that asked for the swap; every change to kernel
state is handed to the loop with ``kernel.call``.
"""

from __future__ import annotations

import time
import uuid

from kernel import plugin_store, processes, protocol
from kernel.protocol import Lane

SPAWN_TIMEOUT = 15.0  # process start and imports on a loaded 2-core machine
STEP_TIMEOUT = 3.0


class SwapError(Exception):
    """The swap was refused before anything changed."""


class _Failed(Exception):
    def __init__(self, step: str, reason: str):
        super().__init__(reason)
        self.step = step


def resolve_plugin(home, service: str, name: str) -> str:
    """Accept a plugin's full name or its short form (``priority`` for
    ``priority-scheduler``)."""
    installed = plugin_store.installed(home)
    for candidate in (name, f"{name}-{service}"):
        if candidate in installed:
            return candidate
    raise SwapError(f"no plugin {name!r} is installed (installed: {', '.join(sorted(installed)) or 'none'})")


def run_swap(kernel, service_name: str, plugin_name: str, health_window: float) -> dict:
    if service_name != "scheduler":
        raise SwapError(f"live swap is implemented for the scheduler service; {service_name!r} cannot be swapped yet")
    plugin = resolve_plugin(kernel.home, service_name, plugin_name)
    manifest = plugin_store.read_manifest(plugin_store.locate(kernel.home, plugin))
    plugin_store.check_compatible(manifest, kind=service_name)
    op = uuid.uuid4().hex[:12]
    started = time.monotonic()
    # Journal writes (fsync) happen here, in the control thread, each before the loop is
    # asked to make its step happen: the dispatch loop never waits for the disk.
    old, previous = kernel.call(_reserve, kernel, op, service_name).result()
    kernel.journal.append("swap.begin", id=op, service=service_name, to=plugin, **{"from": previous})
    step = "spawn"
    new = None
    try:
        new = kernel.call(lambda: kernel.start_instance(old.service, plugin=plugin, activate=False)).result()
        _wait(new.ready_future, SPAWN_TIMEOUT, step, "the new instance did not start")
        step = "quiesce"
        kernel.journal.append("swap.quiesce", id=op, peer=old.peer)
        kernel.call(_quiesce, kernel, old).result()
        step = "export"
        exported = _wait(kernel.call(kernel.request, old, protocol.ExportState(req=0), Lane.HIGH).result(),
                         STEP_TIMEOUT, step, "the old instance did not export its state")
        step = "import"
        kernel.journal.append("swap.import", id=op, jobs=len(exported.state.ready), through_seq=exported.applied_seq,
                              from_kind=exported.state.kind)
        done = _wait(kernel.call(kernel.request, new, protocol.ImportState(
            req=0, state=exported.state, applied_seq=exported.applied_seq), Lane.HIGH).result(),
            STEP_TIMEOUT, step, "the new instance did not import the state")
        if not done.ok:
            raise _Failed(step, f"the new instance refused the state: {done.error}")
        step = "health"
        _health(kernel, new, step)
        step = "redirect"
        kernel.journal.append("swap.redirect", id=op, old=old.peer, new=new.peer)
        kernel.call(_redirect, kernel, old, new).result()
        step = "window"
        time.sleep(health_window)
        if new.child.popen.poll() is not None:
            raise _Failed(step, "the new instance died during its health window")
        _health(kernel, new, step)
        step = "commit"
        record = kernel.journal.append("swap.commit", id=op, service=service_name, to=plugin, **{"from": previous})
        result = _finish(kernel, kernel.call(_commit, kernel, record, old, plugin), started)
        kernel.save_config()  # the commit record is durable already: a crash before this rolls forward
        return result
    except _Failed as failure:
        step, reason = failure.step, str(failure)
    except Exception as exc:  # never leave a swap half-done, whatever went wrong
        reason = f"{type(exc).__name__}: {exc}"
    kernel.journal.append("swap.rollback", id=op, service=service_name, step=step, reason=reason)
    return _finish(kernel, kernel.call(_rollback, kernel, op, old, new, step, reason), started)


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


def _quiesce(kernel, old):
    old.service.held = True
    kernel.fallback_only = True


def _redirect(kernel, old, new):
    service = old.service
    service.active = new
    service.started = time.monotonic()
    service.held = False
    kernel._replay(service, new)
    kernel.fallback_only = False
    kernel.pick_req = None  # a decision owed by the old instance no longer counts
    kernel._want_decision()


def _commit(kernel, record, old, plugin):
    service = old.service
    kernel.config["plugins"][service.name] = plugin
    kernel.config["op_seq"] = record["seq"]
    previous, service.plugin = service.plugin, plugin
    kernel._send(old, protocol.Stop(), Lane.HIGH)
    return _result(kernel, record["data"]["id"], service, previous, plugin, committed=True)


def _rollback(kernel, op, old, new, step, reason):
    service = old.service
    if new is not None and new.child.popen.poll() is None:
        processes.kill(new.child)
    if service.active is new:
        service.active = old
        # The new instance may have taken stream messages the old one never saw: give
        # the old one the kernel's truth rather than guess which.
        kernel.request(old, protocol.ImportState(req=0, state=kernel.truth_state(), applied_seq=service.seq), Lane.HIGH)
        old.applied = service.seq
        kernel.pick_req = None
    service.held = False
    kernel._replay(service, old)
    kernel.fallback_only = False
    kernel._want_decision()
    return _result(kernel, op, service, service.plugin, service.plugin, committed=False, step=step, reason=reason)


def _result(kernel, op, service, before, after, *, committed, step="", reason=""):
    since, counters, released_before = kernel.swap_marks
    kernel.swapping = None
    gaps = [g for t, g in kernel.gaps if t >= since]
    totals = kernel.table.totals
    inst = service.active
    return {
        "id": op, "service": service.name, "plugin": after, "previous": before, "committed": committed,
        "step": step, "reason": reason,
        "jobs_released_during": totals.released - released_before,
        "fallback_decisions": kernel.counters["fallback_decisions"] - counters.get("fallback_decisions", 0),
        "max_dispatch_gap_ms": round(max(gaps, default=0.0) * 1000, 3),
        "jobs_lost": totals.released - totals.completed - len(kernel.table.ready),
        "messages_lost": (inst.lost if inst else 0) + service.replay_lost,
    }
