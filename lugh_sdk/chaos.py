"""`lugh chaos`: a fault injector for operators and tests.

For ``duration`` seconds it injects faults at random times (a Poisson process of
``rate`` faults per second) into random services, reproducibly from ``seed``: the same
seed always gives the same sequence of (service, fault) pairs. Only the timing follows
the system: a fault waits until its target is up again, and until the target has room
in its restart budget (below).

Faults:

- ``kill``: SIGKILL to the service's process. Every service: the reincarnation server
  and the workers too.
- ``hang``: SIGSTOP. The kernel sees the missed heartbeats, kills the process and the
  service is restarted. (A worker the kernel itself had stopped to preempt its job is
  continued by the kernel: the fault is absorbed, and counts as recovered.)
- ``raise``: the plugin's next hook call raises (scheduler, storage and monitor), asked
  of the service host through the kernel (``FaultReq``), so the service's real error path
  runs; the service keeps serving.

Budget: chaos is meant to show recovery, not to make the reincarnation server give up.
It never kills or hangs a service more than ``intensity - 1`` times within its policy
``period`` (from `lugh status`), so no service is declared failed by chaos alone; pass
``respect_budget=False`` to test the give-up path instead.

Recovered: a killed or hung service is up again in a new process (the old one gone), or,
for an absorbed hang, the same process running again; a service made to raise answers a
ping afterwards. The recovery time is the kernel's own (from the failure it saw to the
new incarnation's first answer) when it has it, else when this process saw the service
back. Kill and hang act on this machine's processes: local targets only.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from kernel import protocol
from kernel.supervisor import proc_state as _proc_state
from lugh_sdk.client import KernelClient, LughError

KINDS = ("kill", "hang", "raise")
PLUGIN_SERVICES = ("scheduler", "storage", "monitor")
POLL = 0.05  # each poll is a status request that the kernel's loop answers (~2 ms of its CPU)


@dataclass
class Fault:
    n: int
    planned_s: float
    service: str
    kind: str
    injected_at: float | None = None  # time.monotonic()
    pid: int | None = None
    peer: str | None = None
    outcome: str = "pending"  # recovered, not recovered, skipped
    recovered_at: float | None = None
    detail: str = ""
    errors_before: int | None = None

    @property
    def restarts_it(self) -> bool:
        return self.kind in ("kill", "hang")


def plan(seed: int, duration: float, rate: float, services: list[str], kinds=KINDS,
         budgets: dict[str, tuple[int, float]] | None = None) -> list[Fault]:
    """The faults of a run, from the seed alone. ``budgets``: service -> (restarts
    allowed within a period, the period in seconds); none planned beyond it."""
    rng = random.Random(seed)
    budgets = budgets or {}
    services = sorted(services)
    out: list[Fault] = []
    t = 0.0
    while True:
        t += rng.expovariate(rate) if rate > 0 else duration
        if t >= duration:
            return out
        kind = rng.choice(list(kinds))
        candidates = []
        for name in services:
            if kind == "raise" and name not in PLUGIN_SERVICES:
                continue
            if kind != "raise" and name in budgets:
                allowed, period = budgets[name]
                recent = [f for f in out if f.service == name and f.restarts_it and t - f.planned_s < period]
                if len(recent) >= allowed:
                    continue
            candidates.append(name)
        if candidates:
            out.append(Fault(n=len(out) + 1, planned_s=round(t, 3), service=rng.choice(candidates), kind=kind))


def _alive(pid: int) -> bool:
    return _proc_state(pid) not in ("", "Z", "X")


class Chaos:
    def __init__(self, client: KernelClient, faults: list[Fault], budgets: dict, recover_timeout: float,
                 respect_budget: bool, on_progress=None):
        self.client = client
        self.faults = faults
        self.budgets = budgets
        self.recover_timeout = recover_timeout
        self.respect_budget = respect_budget
        self.on_progress = on_progress
        self.services: dict[str, dict] = {}
        self.start = time.monotonic()

    def poll(self) -> None:
        self.services = {s["name"]: s for s in self.client.request(protocol.StatusReq())["services"]}
        now = time.monotonic()
        for f in self.faults:
            if f.outcome == "pending" and f.injected_at is not None:
                self._check(f, now)
        if self.on_progress is not None:
            self.on_progress(now - self.start, sum(f.injected_at is not None for f in self.faults))

    def _check(self, f: Fault, now: float) -> None:
        s = self.services.get(f.service)
        if s is None or s["state"] != "up" or not s["pid"]:
            return
        if f.kind == "raise":
            back = True
        elif s["pid"] != f.pid:
            back = not _alive(f.pid)
        else:
            # the same process, running again (the kernel continued it): not a zombie on its way out
            back = f.kind == "hang" and _proc_state(f.pid) in ("R", "S", "D")
            if back:
                f.detail = "absorbed: the kernel continued the process"
        rec = s.get("last_recovery") or {}
        mine = f.restarts_it and rec.get("peer") == f.peer and rec.get("down_at", 0) >= f.injected_at - 0.001
        if not back or (mine and not rec.get("serving_at")):
            return  # (the kernel's account: serving again once the new incarnation has answered)
        if f.kind == "raise":
            try:
                self.client.request(protocol.PingServiceReq(service=f.service, count=1), timeout=10)
            except LughError:
                return
        f.outcome = "recovered"
        if mine:
            f.recovered_at = rec["serving_at"]  # the kernel's own account
            f.detail = f.detail or f"{rec.get('how') or 'restarted'}; {(s.get('last_failure') or '')[:80]}"
        else:
            f.recovered_at = now
        f.detail = f.detail or f"{s['peer']} up"

    def _room(self, f: Fault, now: float) -> bool:
        if not self.respect_budget or not f.restarts_it or f.service not in self.budgets:
            return True
        allowed, period = self.budgets[f.service]
        recent = [g for g in self.faults if g is not f and g.service == f.service and g.restarts_it
                  and g.injected_at is not None and now - g.injected_at < period]
        return len(recent) < allowed

    def _ready(self, f: Fault, now: float) -> bool:
        s = self.services.get(f.service)
        if s is None or s["state"] != "up" or not s["pid"]:
            return False
        if any(g.service == f.service and g.outcome == "pending" and g.injected_at is not None for g in self.faults):
            return False  # the last fault on it has not been recovered from yet
        return self._room(f, now)

    def inject(self, f: Fault) -> None:
        s = self.services[f.service]
        f.pid, f.peer = s["pid"], s["peer"]
        f.injected_at = time.monotonic()
        try:
            if f.kind == "kill":
                os.kill(f.pid, signal.SIGKILL)
            elif f.kind == "hang":
                os.kill(f.pid, signal.SIGSTOP)
                until = time.monotonic() + 1.0  # stopped for sure before it can count as continued
                while _proc_state(f.pid) not in ("T", "t", "Z", "X", "") and time.monotonic() < until:
                    time.sleep(0.001)
            else:
                armed = self.client.request(protocol.FaultReq(service=f.service, fault="raise"))
                f.pid, f.peer, f.errors_before = armed["pid"], armed["peer"], armed["errors_before"]
        except (ProcessLookupError, LughError) as exc:
            f.outcome, f.detail = "skipped", f"could not inject: {exc}"

    def run(self) -> None:
        for f in self.faults:
            due = self.start + f.planned_s
            waited_from = None
            while True:
                self.poll()
                now = time.monotonic()
                if now >= due and self._ready(f, now):
                    break
                if now >= due:
                    waited_from = waited_from or now
                    if now - waited_from > self.recover_timeout:
                        f.outcome, f.detail = "skipped", "the service did not come back up in time"
                        break
                time.sleep(min(POLL, max(0.0, due - now)) if now < due else POLL)
            if f.outcome == "pending":
                self.inject(f)
            if f.outcome == "skipped" and f.detail.startswith("could not inject"):
                # It went down between the status and the injection (another fault, a
                # restart under way): inject once more when it is back.
                f.outcome, f.injected_at, first = "pending", None, f.detail
                until = time.monotonic() + self.recover_timeout
                while time.monotonic() < until:
                    self.poll()
                    if self._ready(f, time.monotonic()):
                        self.inject(f)
                        break
                    time.sleep(POLL)
                if f.outcome == "pending" and f.injected_at is None:
                    f.outcome, f.detail = "skipped", first
        deadline = time.monotonic() + self.recover_timeout
        while any(f.outcome == "pending" and f.injected_at is not None for f in self.faults):
            if time.monotonic() > deadline:
                break
            self.poll()
            time.sleep(POLL)
        self._finish()

    def _finish(self) -> None:
        try:
            self.poll()
        except LughError:
            pass
        for f in self.faults:
            if f.outcome == "pending":
                if f.injected_at is None:
                    f.outcome, f.detail = "skipped", "the run ended first"
                    continue
                f.outcome = "not recovered"
                if f.kind == "hang" and f.pid and _proc_state(f.pid) in ("T", "t"):
                    os.kill(f.pid, signal.SIGCONT)  # leave nothing stopped behind
                    f.detail = "still stopped: continued by chaos"
            if f.kind == "raise" and f.outcome == "recovered":
                s = self.services.get(f.service, {})
                if s.get("peer") == f.peer and f.errors_before is not None:
                    fired = s.get("plugin_errors", 0) > f.errors_before
                    f.detail = "the plugin raised in a hook" if fired else "armed; no hook was called yet"


def run(home: Path, *, duration: float = 30.0, seed: int | None = None, rate: float = 1.0, kinds=KINDS,
        services: list[str] | None = None, recover_timeout: float = 60.0, respect_budget: bool = True,
        client: KernelClient | None = None, on_progress=None) -> dict:
    """Inject faults into the kernel of ``home`` for ``duration`` seconds; return the
    report (what was injected, what was recovered)."""
    if rate <= 0 or duration <= 0:
        raise LughError("--rate and --duration must be positive")
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise LughError(f"unknown fault kinds {sorted(unknown)}: use {', '.join(KINDS)}")
    seed = random.randrange(1 << 31) if seed is None else seed
    own = client is None
    client = client or KernelClient(home)
    try:
        status = {s["name"]: s for s in client.request(protocol.StatusReq())["services"]}
        names = services or list(status)
        missing = [n for n in names if n not in status]
        if missing:
            raise LughError(f"no such service: {', '.join(missing)} (services: {', '.join(status)})")
        budgets = {}
        for name in names:
            limits = status[name].get("limits") or {}
            budgets[name] = (max(1, (limits.get("intensity") or 5) - 1), float(limits.get("period_s") or 10.0))
        faults = plan(seed, duration, rate, names, kinds, budgets if respect_budget else None)
        chaos = Chaos(client, faults, budgets, recover_timeout, respect_budget, on_progress)
        chaos.run()
        return report(seed, duration, rate, chaos)
    finally:
        if own:
            client.close()


def report(seed: int, duration: float, rate: float, chaos: Chaos) -> dict:
    faults = []
    times = []
    for f in chaos.faults:
        d = asdict(f)
        d["injected_at_s"] = None if f.injected_at is None else round(f.injected_at - chaos.start, 3)
        d["recovered_after_ms"] = (round((f.recovered_at - f.injected_at) * 1000, 1)
                                   if f.recovered_at is not None and f.injected_at is not None else None)
        if d["recovered_after_ms"] is not None and f.restarts_it:
            times.append(d["recovered_after_ms"])
        faults.append(d)
    outcomes = Counter(f.outcome for f in chaos.faults)
    injected = [f for f in chaos.faults if f.injected_at is not None and f.outcome != "skipped"]
    times.sort()
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))] if times else None
    return {
        "seed": seed, "duration_s": round(time.monotonic() - chaos.start, 1), "planned_duration_s": duration,
        "rate": rate, "faults": faults,
        "summary": {"planned": len(chaos.faults), "injected": len(injected), "recovered": outcomes["recovered"],
                    "not_recovered": outcomes["not recovered"], "skipped": outcomes["skipped"],
                    "by_kind": dict(Counter(f.kind for f in injected)),
                    "by_service": dict(Counter(f.service for f in injected)),
                    "recovery_median_ms": pick(0.5), "recovery_p99_ms": pick(0.99),
                    "recovery_max_ms": times[-1] if times else None},
    }
