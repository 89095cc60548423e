"""The kernel's side of supervision: detection and mechanism (the policy is in
:mod:`kernel.supervision`, applied by the reincarnation server).

Everything here runs on the kernel's loop thread (:class:`kernel.core.Kernel` calls in),
except the journal writer and a crash-loop rollback's disk writes, which have threads of
their own so that the dispatch loop never waits for the disk.

**Detection.** An exit is seen at once: the kernel holds a pidfd per child in its
selector. A hang is seen by heartbeat: a peer silent for ``(missed + 1) * period`` of
*charged* time is killed (SIGKILL works on a stopped process too) and its exit is then
one failure, reported once. Charged time is wall time minus what cannot be the peer's
fault, measured from ``/proc/<pid>/schedstat`` (time spent runnable, waiting for a CPU)
and the kernel loop thread's own schedstat (time the kernel was not running, so it could
not hear anyone): under CPU contention detection takes longer in proportion, it never
kills a peer that was merely starved. Before a verdict the kernel reads the HIGH lane
once more (a heartbeat that came while it was busy is no silence), and when many peers
are silent at once it is the kernel that does not hear (or the machine that stalls):
then only a stopped one (``T``) is judged. A peer in uninterruptible disk wait (``D``,
an fsync on a busy disk) gets ``IO_GRACE`` more. A worker running a job does not heartbeat;
it is hung if it was stopped (``T``) by anyone but the kernel, and otherwise the job
watchdog (``JOB_KILL_FLOOR``) applies. A process that does not connect within
``START_TIMEOUT`` of its spawn (or a standby that does not finish its promotion) is
killed too.

**Mechanism.** On a failure the service's endpoint stays where it is (its address
belongs to the service, not to the process) and its stream waits in the replay log.
The kernel tells the reincarnation server (``service_down``, once per failure); the RS
answers ``Restart`` when its policy says so, and the kernel starts the next incarnation,
or promotes the hot standby, and replays. Where the RS's last policy state says the
failure would be restarted at once, a ready hot standby is promoted without waiting for
the ``Restart`` (a standing order: :meth:`Supervisor._take_over_at_once`). The RS and the workers are the kernel's own
children: the kernel applies the same policy to them itself (never giving up).

**Buffering while down.** Stream messages (HIGH, MEDIUM, LOW) wait in the service's
replay log and are delivered, in order, to the next incarnation. Requests outside the
stream (reads) are parked while the service is down, and those sent to an incarnation
that died before answering are sent again to the next one (:meth:`Supervisor.forward`). The log's MEDIUM and LOW
part is bounded: at ``DOWN_BUFFER_CAP`` messages in the log, a new MEDIUM or LOW message
is refused (the newest is dropped), counted in the service's ``buffer_dropped``, and a
storage request among them is answered with an error, so that no client waits in vain.
HIGH is never dropped: only the kernel and control requests produce HIGH stream traffic.

**Safe modes** (the RS gave up): *scheduler* -- the kernel's fallback policy decides,
the scheduler's stream is not kept (the kernel's task table supersedes it); *storage*
-- writes are refused with a clear error, writes buffered before the give-up stay
buffered (delivered if storage is brought back), reads are served by a read-only
incarnation whose stream is held; if that one dies too, reads are refused as well;
*monitor* -- the system runs without it, its events are dropped (counted).
`lugh restart SERVICE` brings a service out of its safe mode.

**Crash-loop rollback.** When the RS gives up on a service whose current plugin came
from a change journaled as ``swap.commit`` or ``install.commit`` (data ``service``,
``from``, ``to``: the values of ``services.json`` ``plugins[service]`` before and after),
the kernel journals ``crashloop.rollback`` and runs ``from`` again instead of entering the
safe mode. An install (issue 3) that changes what a service runs only has to journal
``install.commit`` with those three fields. One rollback per change: if the previous
plugin crash-loops too, the safe mode follows. A storage change that moved the data set
(``data_dir`` in its record) is not rolled back automatically (the old backend would
serve a data set without the commits made since): safe mode, with that reason.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
import uuid

from kernel import plugin_store, processes, protocol, supervision
from kernel.background import Background
from kernel.protocol import Lane

PLUGIN_KINDS = ("scheduler", "storage", "monitor")
# Stream messages waiting for a service, past which MEDIUM and LOW are refused (HIGH:
# never). LUGH_DOWN_BUFFER_CAP, in the kernel's environment, lowers it for a test.
DOWN_BUFFER_CAP = int(os.environ.get("LUGH_DOWN_BUFFER_CAP") or 20_000)
MARK_REFRESH = 0.01  # seconds a sign of life reuses the CPU-wait clocks read before it (Supervisor.mark)
IO_GRACE = 2.0  # more seconds for a silent peer that is in uninterruptible disk wait
# spawn to connected (process start, imports, plugin verification); a QEMU/TCG target sets
# more: its starved vCPUs do not show as waiting for a CPU (see charged())
START_TIMEOUT = float(os.environ.get("LUGH_START_TIMEOUT", "30"))
STANDBY_RETRY = 1.0  # after a standby failed, before the next one is spawned
STANDBY_AFTER_TAKEOVER = 0.5  # after a restart, before a new standby competes for the CPU
TERM_GRACE = 3.0  # an operator restart: SIGTERM, then SIGKILL after this
CHANGE_OPS = ("swap.commit", "install.commit")
ROLLBACK_OP = "crashloop.rollback"
SAFE_MODES = {
    "scheduler": "the kernel's fallback policy (EDF) makes every scheduling decision",
    "storage": "writes are refused; reads are served by a read-only incarnation",
    "monitor": "the system runs without a monitor; its events are dropped (counted)",
}


def schedstat_wait(path: str) -> float:
    """Seconds a task has spent runnable but waiting for a CPU (0.0 if unknown)."""
    try:
        with open(path, "rb") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def proc_state(pid: int) -> str:
    """The process state letter (R, S, D, T, Z...), or '' if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return ""


def _signal_name(reason: str) -> str:
    """'exit status -9: ...' -> 'killed by SIGKILL: ...'"""
    head, sep, tail = reason.partition(":")
    try:
        code = int(head.removeprefix("exit status "))
    except ValueError:
        return reason
    if code >= 0:
        return reason
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    return f"killed by {name}" + (f"{sep}{tail}" if tail.strip() else "")


def incarnation_of(peer: str) -> int:
    try:
        return int(peer.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return 0


def _is_installed(spec: str, installed: dict) -> bool:
    name, version = plugin_store.split_spec(spec)
    return name in installed and (version is None or version in installed[name])


def crashloop_target(records: list[dict], service: str, current: str, installed: dict) -> tuple[str | None, str, str]:
    """The plugin (a ``services.json`` spec: ``name`` or ``name==version``) to roll
    ``service`` back to after a crash loop of ``current``, from the last journaled change
    that brought ``current``, why not when there is none, and the id of that change's
    record. ``installed``: name -> versions, oldest first (:func:`kernel.plugin_store.installed`)."""
    base, pinned = plugin_store.split_spec(current)
    for rec in reversed(records):
        op, data = rec["op"], rec.get("data", {})
        if data.get("service") != service:
            continue
        if op == ROLLBACK_OP:
            return None, "it was rolled back once already since its last change", ""
        if op not in CHANGE_OPS:
            continue
        to = data.get("to") or (f"{data['name']}=={data['version']}" if data.get("name") and data.get("version") else "")
        previous = data.get("from")
        if not previous and op == "install.commit" and data.get("name") == base and pinned is None:
            # A newer version installed beside the running one, no swap: a restart runs
            # the newest, so the change is the version; back to the one before it.
            versions = installed.get(base, [])
            if data.get("version") in versions and versions.index(data["version"]) > 0:
                if versions[-1] != data["version"]:
                    continue  # an even newer one came later
                previous, to = f"{base}=={versions[versions.index(data['version']) - 1]}", current
        if not previous or to != current or previous == current:
            continue  # a change that did not bring what runs now
        if "data_dir" in data:
            return None, f"the change from {previous} moved its data set; not rolled back automatically", ""
        if not _is_installed(previous, installed):
            return None, f"the previous plugin {previous} is no longer installed", ""
        return previous, "", str(data.get("id", ""))
    return None, "no change to it is on record", ""


class Supervisor:
    def __init__(self, kernel):
        self.k = kernel
        self.table = supervision.load(kernel.home, kernel.options.heartbeat)
        self.local = supervision.RestartPolicy(self.table, escalate=False)  # the RS and the workers
        self.rs_state: dict = {"applied_seq": 0, "records": {}}
        # service -> the RS stream seq of its last failure report: until a policy state
        # covers it, the kernel's copy of the records is behind and it does not act on them
        self.unreported: dict[str, int] = {}
        self.wake_at = math.inf
        self.standby_retry: dict[str, float] = {}
        self.parked: dict[str, dict] = {}  # service -> {(origin, req): (request, lane)} while it is down
        self.inflight: dict[str, dict] = {}  # service -> {(origin, req): (request, lane, peer)} sent, unanswered
        self._kernel_schedstat: str | None = None
        self._journal = Background("supervision-journal")

    # ------------------------------------------------------------------ settings

    def settings(self, service) -> supervision.Settings:
        return self.table(service.name)

    def spawn_args(self, service, standby: bool) -> list[str]:
        return ["--heartbeat", repr(self.settings(service).heartbeat)] + (["--standby"] if standby else [])

    # ------------------------------------------------------------------ heartbeats and charged time

    def _kernel_wait(self) -> float:
        if self._kernel_schedstat is None:
            self._kernel_schedstat = f"/proc/self/task/{threading.get_native_id()}/schedstat"
        return schedstat_wait(self._kernel_schedstat)

    def mark(self, inst) -> None:
        """A sign of life from ``inst``: start charging silence from now. The CPU-wait
        clocks are read again only if the last reading is ``MARK_REFRESH`` old: a busy
        worker signs life a thousand times a second, and two /proc reads each time were
        5 % of the kernel. An older reading credits the waits since it too, so a silence
        is charged at most that much too little (against hang limits of 100s of ms)."""
        now = time.monotonic()
        inst.last_beat = now
        if now - inst.marked_at >= MARK_REFRESH:
            inst.marked_at = now
            inst.marks = (self._kernel_wait(),
                          schedstat_wait(f"/proc/{inst.child.pid}/schedstat") if inst.child else 0.0)

    def charged(self, inst, silence: float) -> float:
        """``silence`` less the time the peer waited for a CPU and the kernel was not
        running, since the last sign of life."""
        kernel_mark, peer_mark = inst.marks
        credit = max(0.0, self._kernel_wait() - kernel_mark)
        if inst.child is not None:
            credit += max(0.0, schedstat_wait(f"/proc/{inst.child.pid}/schedstat") - peer_mark)
        return silence - credit

    def kill(self, inst, reason: str) -> None:
        """Kill a child for a reason the kernel knows (hang, ejection...); its exit, seen
        through the pidfd, is then reported once, with this reason."""
        if not inst.kill_reason:
            inst.kill_reason = reason
        processes.kill(inst.child)

    # ------------------------------------------------------------------ the watchdog

    def check(self, now: float) -> None:
        """Run from the kernel's watchdogs (every ``WATCH_PERIOD``, or when ``wake_at``,
        which it sets, has come)."""
        k = self.k
        self.tick(now)
        wake = now + 0.05
        watched, suspects = 0, []
        for inst in list(k.instances.values()):
            service = inst.service
            if inst.child is None or inst.kill_reason and not inst.retiring:
                continue
            if service.active is not inst and service.standby is not inst:
                continue
            if inst.retiring:  # an operator restart that SIGTERM did not end
                if now - inst.retiring > TERM_GRACE:
                    processes.kill(inst.child)
                continue
            if not inst.connected or inst.promoting:
                since = inst.promoting or inst.child.started
                if now - since > START_TIMEOUT and self.charged(inst, now - since) > START_TIMEOUT:
                    what = "finish its promotion" if inst.promoting else "connect"
                    self.kill(inst, f"did not {what} within {START_TIMEOUT:g}s")
                continue
            if service.kind == "scheduler" and service.active is inst and k.pick_req is not None:
                continue  # silent with a decision owed: the pick watchdog ejects it
            watched += 1
            limit = self.settings(service).hang_after
            if now - inst.last_beat <= limit:
                wake = min(wake, inst.last_beat + limit)
            elif inst.job is None or (not inst.stopped and proc_state(inst.child.pid) == "T"):
                # (a worker running a job does not heartbeat: the job runs in its loop;
                # it is hung only if someone other than the kernel stopped it)
                suspects.append(inst)
        if suspects:
            wake = min(wake, self._judge(suspects, watched))
        self._maintain_standbys(now)
        self.wake_at = min(wake, self.local.next_timer())

    def _judge(self, suspects: list, watched: int) -> float:
        """The hang verdicts. Returns when to look again."""
        k = self.k
        k._drain_high()  # heartbeats that came while this pass ran are no silence
        now = time.monotonic()
        wake = now + 0.05
        silent = []
        for inst in suspects:
            if inst.kill_reason or k.instances.get(inst.peer) is not inst:
                continue
            s = self.settings(inst.service)
            silence = now - inst.last_beat
            if silence <= s.hang_after:
                continue
            charged = self.charged(inst, silence)
            if charged <= s.hang_after:
                wake = min(wake, now + max(0.005, s.hang_after - charged))
                continue
            silent.append((inst, s, silence, charged, proc_state(inst.child.pid)))
        # Many peers silent at once: it is the kernel that does not hear (or the whole
        # machine that stalls), not each of them that hangs. Only a stopped one is judged.
        mass = len(silent) >= 3 and len(silent) * 2 >= watched
        for inst, s, silence, charged, state in silent:
            if mass and state not in ("T", "t"):
                k.counters["hang_verdicts_deferred"] += 1
                continue
            if state == "D" and silence < s.hang_after + IO_GRACE:
                continue  # in disk wait (an fsync on a busy disk): a little longer
            service = inst.service
            k.counters["hangs"] += 1
            print(f"kernel: {inst.peer} hung: {silence * 1000:.0f} ms without a heartbeat, {charged * 1000:.0f} ms "
                  f"charged (state {state or '?'})", file=sys.stderr, flush=True)
            if service.active is inst:
                service.times["hang_detected_at"] = now
            self.kill(inst, f"hung: no heartbeat for {charged * 1000:.0f} ms "
                            f"({s.missed} missed at a {s.heartbeat * 1000:g} ms period)")
        return wake

    def tick(self, now: float) -> None:
        """Restarts of the kernel's own children that are due."""
        for name, reason, _peer in self.local.due(now):
            service = self.k.services.get(name)
            if service is not None and service.active is None:
                self.start(service, reason)

    # ------------------------------------------------------------------ failures

    def gone(self, inst, reason: str) -> None:
        """``inst`` exited (seen through its pidfd). Called by the kernel once per process."""
        k = self.k
        service = inst.service
        now = time.monotonic()
        reason = (inst.kill_reason or _signal_name(reason))[:600]
        if service.standby is inst:
            service.standby = None
            self.standby_retry[service.name] = now + STANDBY_RETRY
            if not inst.kill_reason.startswith("retired"):
                k.counters["standby_failures"] += 1
            return
        if service.active is not inst:
            return  # a swap candidate, a retired standby
        service.active = None
        self._repark(service, inst)
        service.failures += 1
        service.last_failure = reason
        service.last_peer = inst.peer
        service.times = {"down_at": now, "peer": inst.peer,
                         "hang_detected_at": service.times.get("hang_detected_at") if inst.kill_reason.startswith("hung") else None}
        k.counters["service_failures"] += 1
        if service.kind == "worker":
            k._worker_lost(inst, service)
        if service.kind == "scheduler" and k.pick_req is not None:
            k.pick_req = None
            k._fallback_decide()
        if getattr(service, "swap_fallback", None) is not None:
            pass  # a live swap's new instance died in its health window: the swap rolls back to the old
        elif inst.retiring:
            self.start(service, "restarted by the operator")
        elif service.failed:
            # In its safe mode already: a read-only storage incarnation ended, and the
            # reads that waited for it are refused (the next ones are, by kv_refusal).
            for msg, lane in self.parked.pop(service.name, {}).values():
                k.route_kv_result(protocol.KvResult(req=msg.req, origin=msg.origin, ok=False,
                                                    error=self.kv_refusal(service, msg)), lane)
        elif service.kind in PLUGIN_KINDS:
            taken = self._take_over_at_once(service, now, reason)
            k._event("rs", "service_down", service=service.name, peer=inst.peer, reason=reason, taken=taken)
            self.unreported[service.name] = k.services["rs"].seq
        else:
            self.local.failed(service.name, now, reason, inst.peer)
            self.tick(now)  # the first restart is immediate
            self.wake_at = now  # the watchdogs look again: a later restart may be due
        if service.name != "monitor":  # after the recovery began: the monitor can wait
            self._tell_monitor("service_down", service=service.name, peer=inst.peer, reason=reason[:200])

    def _take_over_at_once(self, service, now: float, reason: str) -> bool:
        """A standing order: when the RS's last policy state says a failure of this
        service now would be restarted at once, a ready hot standby takes over without
        waiting for the RS's ``Restart`` (one round trip to a process that may itself be
        busy). The RS still decides: it is told (``taken``) and counts the restart, and
        until its next state covers that, the kernel asks it again."""
        standby = service.standby
        if (standby is None or not standby.connected or standby.spec != self._spec(service) or self.k.swapping
                or service.name in self.unreported):
            return False
        if not self._rs_policy().immediate(service.name, now):
            return False
        self.k.counters["takeovers_at_once"] += 1
        self.start(service, reason)
        return True

    def _rs_policy(self) -> supervision.RestartPolicy:
        """The RS's policy as of the last state it sent (the kernel's copy)."""
        policy = supervision.RestartPolicy(self.table)
        policy.restore(self.rs_state["records"])
        return policy

    def on_restart(self, msg) -> None:
        k = self.k
        service = k.services.get(msg.service)
        if service is None or service.kind not in PLUGIN_KINDS:
            k.counters["unexpected_messages"] += 1
            return
        if service.active is not None or service.failed or (msg.peer and msg.peer != service.last_peer):
            k.counters["restarts_ignored"] += 1  # already restarted (a replayed request), or in safe mode
            return
        self.start(service, msg.reason)

    def start(self, service, reason: str):
        """The next incarnation of ``service``: the hot standby if one is ready, else a
        new process. The endpoint is the same; the replay log is delivered on connect."""
        k = self.k
        if service.active is not None or k.stopping:
            return None
        now = time.monotonic()
        service.restarts += 1
        standby = service.standby
        if standby is not None and standby.connected and standby.spec == self._spec(service) and not k.swapping:
            service.standby = None
            self._promote(service, standby)
            inst, how = standby, "standby"
        else:
            try:
                inst = k.start_instance(service, activate=True)
            except Exception as exc:  # the plugin was removed, the spawn failed...
                self._start_failed(service, f"cannot start: {type(exc).__name__}: {exc}")
                return None
            how = "spawn"
        service.times["how"] = how
        service.times.setdefault("restart_at", now)
        self.standby_retry[service.name] = max(self.standby_retry.get(service.name, 0.0), now + STANDBY_AFTER_TAKEOVER)
        self.record("service.restart", service=service.name, peer=inst.peer, failed=service.last_peer, how=how,
                    reason=reason[:200])
        return inst

    def _start_failed(self, service, reason: str) -> None:
        k = self.k
        service.failures += 1
        service.last_failure = reason
        service.last_peer = ""
        k.counters["service_failures"] += 1
        if service.kind in PLUGIN_KINDS:
            k._event("rs", "service_down", service=service.name, peer="", reason=reason)
        else:
            self.local.failed(service.name, time.monotonic(), reason)
            self.wake_at = 0.0  # a restart of its own may be due at once

    def _promote(self, service, standby) -> None:
        """A hot standby takes over: it has started, verified and imported its plugin
        already; on Promote it builds the service (opens the data set). Its state follows
        at once, without waiting for its answer: the whole replay log (it skips what it
        had applied: the seq says) or, a scheduler, the kernel's truth. Its answer gives
        its position; if it failed, it is killed and the log, never trimmed by it, goes
        to the next incarnation."""
        k = self.k
        service.active = standby
        service.started = time.monotonic()
        standby.promoting = time.monotonic()
        k.counters["standby_takeovers"] += 1
        fut = k.request(standby, protocol.Promote(req=0), Lane.HIGH)
        fut.add_done_callback(lambda f: self._promoted(service, standby, f))
        k._resume(service, standby)

    def _promoted(self, service, standby, fut) -> None:
        standby.promoting = 0.0
        if service.active is not standby:
            return
        done = None if fut.exception() is not None else fut.result()
        if done is None or not getattr(done, "ok", False):
            self.kill(standby, f"promotion failed: {fut.exception() or done.error}")
            return
        self.k._ack(standby, done.applied_seq)
        self.mark(standby)

    def _maintain_standbys(self, now: float) -> None:
        k = self.k
        if k.boot_tasks is not None or k.stopping:
            return  # boot first
        for service in k.services.values():
            wanted = self.settings(service).standby and not service.failed and service.kind != "client"
            standby = service.standby
            if standby is not None and (not wanted or standby.spec != self._spec(service)):
                self._retire_standby(service, "retired: " + ("no longer wanted" if not wanted else "stale plugin"))
                continue
            if (wanted and standby is None and service.active is not None and service.active.connected
                    and now >= self.standby_retry.get(service.name, 0.0) and not k.swapping):
                try:
                    standby = k.start_instance(service, activate=False, standby=True)
                except Exception as exc:
                    self.standby_retry[service.name] = now + 10 * STANDBY_RETRY
                    print(f"kernel: cannot start a standby for {service.name}: {exc}", file=sys.stderr)
                    continue
                standby.spec = self._spec(service)
                service.standby = standby

    def _retire_standby(self, service, reason: str = "retired") -> None:
        standby, service.standby = service.standby, None
        if standby is not None:
            self.kill(standby, reason)

    def _spec(self, service) -> tuple:
        if service.kind in PLUGIN_KINDS:
            return service.plugin, str(self.k.data_dir(service.name)) if hasattr(self.k, "data_dir") else ""
        return ()

    # ------------------------------------------------------------------ the reincarnation server

    def resume_rs(self, inst) -> None:
        """A new reincarnation server: the settings and the policy state its predecessor
        saved, then the events after it (replay)."""
        k = self.k
        state = self.rs_state
        up = [n for n, s in k.services.items() if s.kind in PLUGIN_KINDS and s.active is not None]
        k._send(inst, protocol.PolicyImport(applied_seq=state["applied_seq"], settings=self.table.to_wire(),
                                            records=state["records"], up=up), Lane.HIGH)
        inst.applied = state["applied_seq"]
        k._replay(inst.service, inst)

    def on_policy_state(self, inst, msg) -> None:
        if inst.service.kind != "rs" or inst.service.active is not inst:
            self.k.counters["unauthorized"] += 1
            return
        self.rs_state = {"applied_seq": msg.applied_seq, "records": msg.records}
        self.unreported = {name: seq for name, seq in self.unreported.items() if seq > msg.applied_seq}
        self.k._ack(inst, msg.applied_seq)

    def _reset_policy(self, service) -> None:
        if service.kind in PLUGIN_KINDS:
            self.k._event("rs", "service_reset", service=service.name)
        else:
            self.local.reset(service.name)

    # ------------------------------------------------------------------ giving up: safe modes, rollback

    def on_give_up(self, msg) -> None:
        k = self.k
        service = k.services.get(msg.service)
        if service is None or service.kind not in PLUGIN_KINDS or service.failed:
            return
        if service.active is not None:
            k.counters["restarts_ignored"] += 1  # brought back meanwhile (an operator restart)
            return
        target, why_not, change = crashloop_target(k.journal.records(), service.name, service.plugin,
                                           plugin_store.installed(k.home))
        if target is not None:
            self._crashloop_rollback(service, target, msg.reason, change)
        else:
            self.enter_safe_mode(service, msg.reason, note=why_not if "data set" in why_not else "")

    def enter_safe_mode(self, service, reason: str, note: str = "") -> None:
        k = self.k
        service.failed = True
        service.last_failure = f"given up: {reason}; last failure: {service.last_failure}"[:600]
        service.safe_mode = SAFE_MODES[service.kind] + (f" ({note})" if note else "")
        k.counters["safe_modes"] += 1
        self._retire_standby(service, "retired: the service failed")
        self.record("service.failed", service=service.name, reason=reason, safe_mode=service.safe_mode)
        if service.name != "monitor":
            self._tell_monitor("service_failed", service=service.name, reason=reason)
        if service.kind == "scheduler":
            service.replay.clear()  # superseded: a scheduler brought back gets the kernel's truth
            k.pick_req = None
            k._want_decision()
        elif service.kind == "monitor":
            service.buffer_dropped += len(service.replay)
            service.replay.clear()
        elif service.kind == "storage":
            service.held = True  # buffered writes stay buffered; the read-only incarnation gets none
            try:
                k.start_instance(service, activate=True)
            except Exception as exc:
                service.safe_mode = f"writes and reads are refused (no read-only incarnation: {exc})"

    def kv_refusal(self, storage, msg) -> str:
        """Why a storage request is refused in storage's safe mode ('' to serve it)."""
        if not storage.failed:
            return ""
        if isinstance(msg, getattr(protocol, "KV_STREAMED", (protocol.KvPut,))):
            return f"storage has failed and is in safe mode: writes are refused ({storage.last_failure[:200]})"
        if storage.active is None or not storage.active.connected:
            return f"storage has failed and is in safe mode: reads are unavailable ({storage.last_failure[:200]})"
        return ""

    def _crashloop_rollback(self, service, target: str, reason: str, change: str = "") -> None:
        k = self.k
        op = uuid.uuid4().hex[:12]
        current = service.plugin
        service.failed = True  # nothing restarts it meanwhile
        service.safe_mode = f"rolling back to {target} after a crash loop"

        def work():  # journal first (fsync), off the loop thread; then the effect
            try:
                # ``undoes``: the change it reverts (for `lugh rollback`: nothing left to undo there)
                record = k.journal.append(ROLLBACK_OP, id=op, service=service.name, reason=reason, undoes=change,
                                          **{"from": current, "to": target})
                k.call(self._rolled_back, service, current, target, record).result(30)
                k.save_config()  # the record is durable: a crash before this rolls forward at boot
            except Exception as exc:
                print(f"kernel: crash-loop rollback of {service.name} failed: {exc!r}", file=sys.stderr)
                k.call(self.enter_safe_mode, service, f"{reason}; rollback to {target} failed: {exc}")

        threading.Thread(target=work, name="crashloop-rollback", daemon=True).start()

    def _rolled_back(self, service, current: str, target: str, record: dict) -> None:
        k = self.k
        k.config["plugins"][service.name] = target
        k.config["op_seq"] = record["seq"]
        service.plugin = target
        service.failed = False
        service.safe_mode = ""
        service.last_failure = f"crash loop of {current} ({record['data']['reason']}); rolled back to {target}"
        k.counters["crashloop_rollbacks"] += 1
        self._reset_policy(service)
        self._retire_standby(service, "retired: stale plugin")
        self.start(service, f"rolled back from {current} after a crash loop")

    # ------------------------------------------------------------------ operator and chaos

    def operator_restart(self, name: str) -> dict:
        k = self.k
        service = k.services.get(name)
        if service is None:
            raise KeyError(name)
        if k.swapping:
            raise ValueError(f"a swap is in progress ({k.swapping}); restart after it")
        was_failed = service.failed
        service.failed = False
        service.safe_mode = ""
        if was_failed and service.kind == "storage":
            service.held = False
        self._reset_policy(service)
        self.record("service.operator_restart", service=name, was_failed=was_failed)
        inst = service.active
        if inst is not None and inst.child is not None:
            inst.retiring = time.monotonic()
            inst.kill_reason = "restarted by the operator"
            processes.kill(inst.child, signal.SIGCONT)
            processes.kill(inst.child, signal.SIGTERM)
        else:
            self.start(service, "restarted by the operator")
        return {"service": name, "restarting": True, "was_failed": was_failed}

    def inject(self, name: str, fault: str) -> dict:
        k = self.k
        service = k.services.get(name)
        if service is None:
            raise KeyError(name)
        if service.kind not in PLUGIN_KINDS:
            raise ValueError(f"{name} hosts no plugin: only scheduler, storage and monitor can be made to raise")
        inst = service.active
        if inst is None or not inst.connected or service.failed:
            raise ValueError(f"{name} is not up")
        k._send(inst, protocol.InjectFault(fault=fault), Lane.HIGH)
        k.counters["faults_injected"] += 1
        return {"service": name, "peer": inst.peer, "pid": inst.child.pid, "errors_before": inst.errors}

    # ------------------------------------------------------------------ buffering while down

    def admit(self, service, msg, lane) -> bool:
        """Whether a stream message for ``service`` is kept (see the module docstring)."""
        if service.failed and service.kind in ("scheduler", "monitor"):
            service.buffer_dropped += service.kind == "monitor"
            return False
        if lane is Lane.HIGH or len(service.replay) < DOWN_BUFFER_CAP:
            return True
        service.buffer_dropped += 1
        self.k.counters["buffer_dropped"] += 1
        origin = getattr(msg, "origin", "")
        if origin and hasattr(msg, "req"):
            self.k.route_kv_result(protocol.KvResult(
                req=msg.req, origin=origin, ok=False,
                error=f"dropped: {service.name} is restarting and {DOWN_BUFFER_CAP} messages wait for it already"), lane)
        return False

    def forward(self, service, msg, lane) -> None:
        """A request that is not part of the stream (a read): to the service now, or
        parked while it is down (bounded like the replay log), and sent again to the next
        incarnation if the one it went to dies before it answers."""
        key = (msg.origin, msg.req)
        inst = service.active
        if inst is not None and inst.connected:
            self.inflight.setdefault(service.name, {})[key] = (msg, lane, inst.peer)
            self.k._send(inst, msg, lane)
            return
        parked = self.parked.setdefault(service.name, {})
        if lane is not Lane.HIGH and len(parked) >= DOWN_BUFFER_CAP:
            service.buffer_dropped += 1
            self.k.counters["buffer_dropped"] += 1
            self.k.route_kv_result(protocol.KvResult(
                req=msg.req, origin=msg.origin, ok=False,
                error=f"dropped: {service.name} is restarting and {DOWN_BUFFER_CAP} requests wait for it already"), lane)
            return
        parked[key] = (msg, lane)

    def answered(self, service, msg) -> None:
        key = (msg.origin, msg.req)
        self.inflight.get(service.name, {}).pop(key, None)
        self.parked.get(service.name, {}).pop(key, None)

    def _repark(self, service, inst) -> None:
        """``inst`` died: what it was asked and did not answer waits for the next one."""
        inflight = self.inflight.get(service.name, {})
        lost = [key for key, (_, _, peer) in inflight.items() if peer == inst.peer]
        parked = self.parked.setdefault(service.name, {})
        for key in lost:
            msg, lane, _ = inflight.pop(key)
            parked[key] = (msg, lane)

    def _unpark(self, service) -> None:
        parked = self.parked.pop(service.name, {})
        for msg, lane in parked.values():
            self.forward(service, msg, lane)

    def _tell_monitor(self, kind: str, **data) -> None:
        monitor = self.k.services.get("monitor")
        if monitor is not None and not monitor.failed:
            self.k._event("monitor", kind, **data)

    # ------------------------------------------------------------------ recovery timing

    def resumed(self, service, inst) -> None:
        """The new incarnation has its state (import or replay sent): the reads parked
        meanwhile go to it; its first answer after that is when it serves again."""
        self._unpark(service)
        times = service.times
        if "down_at" not in times or "serving_at" in times:
            return
        times["state_at"] = time.monotonic()
        fut = self.k.request(inst, protocol.Ping(req=0), Lane.HIGH)

        def served(f):
            if f.exception() is None and service.times is times:
                times["serving_at"] = time.monotonic()
                times["serving_peer"] = inst.peer
                self._tell_monitor("service_up", service=service.name, peer=inst.peer)

        fut.add_done_callback(served)

    # ------------------------------------------------------------------ reporting

    def _safe_mode_now(self, service) -> str:
        if not service.failed:
            return service.safe_mode  # a rollback in progress, or nothing
        if service.kind == "storage" and service.safe_mode == SAFE_MODES["storage"]:
            inst = service.active
            if inst is None:
                return "writes and reads are refused (the read-only incarnation is gone)"
            if not inst.connected:
                return "writes are refused; a read-only incarnation is starting (reads are refused until it is up)"
        return service.safe_mode

    def service_status(self, service) -> dict:
        now = time.monotonic()
        inst = service.active
        standby = service.standby
        s = self.settings(service)
        if service.kind in PLUGIN_KINDS:
            policy = self._rs_policy().describe(service.name, now)
        else:
            policy = self.local.describe(service.name, now)
        times = service.times
        recovery = None
        if "down_at" in times:
            recovery = {"down_at": times["down_at"], "serving_at": times.get("serving_at"),
                        "hang_detected_at": times.get("hang_detected_at"), "how": times.get("how"),
                        "restart_at": times.get("restart_at"), "state_at": times.get("state_at"),
                        "peer": times.get("peer"), "serving_peer": times.get("serving_peer"),
                        "ms": round((times["serving_at"] - times["down_at"]) * 1000, 1) if times.get("serving_at") else None}
        return {
            "incarnation": incarnation_of(inst.peer) if inst else service.incarnations,
            "failures": service.failures,
            "safe_mode": self._safe_mode_now(service),
            "heartbeat_ms": round(s.heartbeat * 1000, 3),
            "limits": {"missed_heartbeats": s.missed, "hang_after_ms": round(s.hang_after * 1000, 3),
                       "backoff_start_ms": round(s.backoff_start * 1000, 3), "backoff_cap_s": s.backoff_cap,
                       "intensity": s.intensity if service.kind in PLUGIN_KINDS else None,
                       "period_s": s.period, "stable_s": s.stable, "standby": s.standby},
            "standby": None if standby is None else {"pid": standby.child.pid, "peer": standby.peer,
                                                     "state": "ready" if standby.connected else "starting"},
            "buffer_dropped": service.buffer_dropped,
            "policy": policy,
            "last_recovery": recovery,
        }

    # ------------------------------------------------------------------ the journal, asynchronously

    def record(self, op: str, **data) -> None:
        """Journal a record of what happened (a restart, a safe mode) without making the
        loop wait for the disk. Operations that must be durable *before* they take
        effect (a crash-loop rollback) append from their own thread instead."""
        self._journal.run(lambda: self.k.journal.append(op, **data))

    def close(self) -> None:
        self._journal.stop(5.0)
