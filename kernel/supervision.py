"""Supervision settings and the restart policy (MINIX 3's reincarnation server, Erlang/OTP
supervisors, the QNX High Availability Manager).

The *policy* (when to restart, when to give up) lives here, as plain data and pure
functions: the reincarnation server (:mod:`kernel.services.rs`) applies it to the plugin
services, the kernel applies the same code to the processes it supervises itself (the
reincarnation server and the workers, which are never given up on), and the tests drive
it with a fake clock.

Settings, per service, with configurable defaults. Optional file ``<home>/supervision.toml``
(read by the kernel at boot; a bad file stops the boot with a clear error)::

    [defaults]
    heartbeat_ms = 100      # a peer heartbeats every period, from its own loop
    missed_heartbeats = 2   # it is hung when this many heartbeats are missed (see below)
    backoff_start_ms = 50   # the second restart within a period waits this long ...
    backoff_cap_s = 5       # ... each further one twice as long, up to this cap
    intensity = 5           # more than this many restarts ...
    period_s = 10           # ... within this many seconds: declared failed (safe mode)
    stable_s = 10           # up this long since its last restart: the next restart is immediate again
    standby = false         # keep a hot standby (a pre-spawned spare) for the service

    [services.storage]
    standby = true
    heartbeat_ms = 200

``LUGH_RS_POLICY`` (JSON, in the kernel's environment) overrides the defaults' policy
fields for a soak or fault-injection run: ``{"intensity": 100000, "backoff_cap": 0.05}``
(keys ``backoff_start``, ``backoff_cap``, ``intensity``, ``period``, ``stable``, in seconds).

**Hang tolerance.** A heartbeat is *missed* when the next one falls due without it (one
merely late by less than a period is late, not missed). With the last heartbeat at ``t``
and period ``P``, the first is missed at ``t + 2P`` and the second at ``t + 3P``: the peer
is declared hung, and killed, after ``(missed_heartbeats + 1) * P`` of silence (300 ms by
default). Silence is *charged* time only (:mod:`kernel.supervisor`): time the peer spent
waiting for a CPU, and time the kernel itself was not running, are not held against it.

**Restart policy.** The first restart is immediate. Each further restart waits
``backoff``, which starts at ``backoff_start`` and doubles up to ``backoff_cap``; it goes
back to immediate once the service has stayed up ``stable`` seconds since its last
restart. More than ``intensity`` restarts within ``period`` seconds: the service is
declared failed and the kernel enters that kind's safe mode (docs/architecture.md).
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from collections import deque
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

FILE_NAME = "supervision.toml"
POLICY_ENV = "LUGH_RS_POLICY"


class SettingsError(ValueError):
    """A supervision.toml that cannot be used; the message says what is wrong."""


@dataclass(frozen=True)
class Settings:
    heartbeat: float = 0.1
    missed: int = 2
    backoff_start: float = 0.05
    backoff_cap: float = 5.0
    intensity: int = 5
    period: float = 10.0
    stable: float = 10.0
    standby: bool = False

    @property
    def hang_after(self) -> float:
        """Seconds of charged silence after which a peer is hung."""
        return (self.missed + 1) * self.heartbeat

    def to_wire(self) -> dict:
        return asdict(self)

    @classmethod
    def from_wire(cls, data: dict) -> "Settings":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# TOML key -> (field, factor to seconds or None, type)
_KEYS = {
    "heartbeat_ms": ("heartbeat", 1e-3, float),
    "missed_heartbeats": ("missed", None, int),
    "backoff_start_ms": ("backoff_start", 1e-3, float),
    "backoff_cap_s": ("backoff_cap", 1.0, float),
    "intensity": ("intensity", None, int),
    "period_s": ("period", 1.0, float),
    "stable_s": ("stable", 1.0, float),
    "standby": ("standby", None, bool),
}
_ENV_KEYS = {"backoff_start", "backoff_cap", "intensity", "period", "stable"}


def _parse(table: dict, where: str, base: Settings) -> Settings:
    if not isinstance(table, dict):
        raise SettingsError(f"{where}: expected a table")
    changes = {}
    for key, value in table.items():
        if key not in _KEYS:
            raise SettingsError(f"{where}: unknown setting {key!r} (known: {', '.join(_KEYS)})")
        name, factor, kind = _KEYS[key]
        if kind is bool:
            if not isinstance(value, bool):
                raise SettingsError(f"{where}.{key}: expected true or false")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
            raise SettingsError(f"{where}.{key}: expected a{'n integer' if kind is int else ' number'}")
        elif value < 0 or (key in ("heartbeat_ms", "missed_heartbeats") and value <= 0):
            raise SettingsError(f"{where}.{key}: must be {'positive' if key.endswith(('ms', 'beats')) else '>= 0'}")
        changes[name] = kind(value * factor) if factor else kind(value)
    return replace(base, **changes)


class Table:
    """Settings for every service: the defaults, and per-service overrides."""

    def __init__(self, defaults: Settings | None = None, services: dict[str, Settings] | None = None):
        self.defaults = defaults or Settings()
        self.services = dict(services or {})

    def __call__(self, name: str) -> Settings:
        return self.services.get(name, self.defaults)

    def to_wire(self) -> dict:
        return {"defaults": self.defaults.to_wire(), "services": {n: s.to_wire() for n, s in self.services.items()}}

    @classmethod
    def from_wire(cls, data: dict) -> "Table":
        return cls(Settings.from_wire(data.get("defaults", {})),
                   {n: Settings.from_wire(s) for n, s in data.get("services", {}).items()})


def load(home: Path, heartbeat: float = 0.1, environ=os.environ) -> Table:
    """The table for a kernel: built-in defaults (with the kernel's ``--heartbeat``),
    then ``LUGH_RS_POLICY``, then ``<home>/supervision.toml``."""
    defaults = Settings(heartbeat=heartbeat)
    raw_env = environ.get(POLICY_ENV, "")
    if raw_env:
        try:
            env = json.loads(raw_env)
        except ValueError as exc:
            raise SettingsError(f"{POLICY_ENV}: not JSON ({exc})") from None
        unknown = set(env) - _ENV_KEYS
        if unknown:
            raise SettingsError(f"{POLICY_ENV}: unknown keys {sorted(unknown)} (known: {sorted(_ENV_KEYS)})")
        defaults = replace(defaults, **{k: type(getattr(defaults, k))(v) for k, v in env.items()})
    path = home / FILE_NAME
    if not path.exists():
        return Table(defaults)
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{path}: not valid TOML ({exc})") from None
    unknown = set(data) - {"defaults", "services"}
    if unknown:
        raise SettingsError(f"{path}: unknown sections {sorted(unknown)} (use [defaults] and [services.NAME])")
    defaults = _parse(data.get("defaults", {}), "defaults", defaults)
    services = data.get("services", {})
    if not isinstance(services, dict):
        raise SettingsError(f"{path}: [services] must hold one table per service")
    return Table(defaults, {name: _parse(t, f"services.{name}", defaults) for name, t in services.items()})


def write(home: Path, defaults: dict | None = None, services: dict[str, dict] | None = None) -> Path:
    """Write ``<home>/supervision.toml`` (TOML keys as in the module docstring); read at
    the next boot."""
    import tomli_w

    data: dict = {}
    if defaults:
        data["defaults"] = defaults
    if services:
        data["services"] = services
    path = home / FILE_NAME
    _parse(data.get("defaults", {}), "defaults", Settings())  # refuse a bad table now, not at boot
    for name, t in (services or {}).items():
        _parse(t, f"services.{name}", Settings())
    path.write_text(tomli_w.dumps(data))
    return path


# --------------------------------------------------------------------------- the policy

@dataclass
class Record:
    """What the policy knows of one service."""
    restarts: deque = field(default_factory=deque)  # times of the restarts within the period
    backoff: float = 0.0  # wait before the next restart
    due: float | None = None  # a restart is scheduled at this time
    reason: str = ""
    peer: str = ""  # the incarnation whose failure the scheduled restart answers
    given_up: bool = False
    failures: int = 0

    def to_wire(self) -> dict:
        d = asdict(self)
        d["restarts"] = list(self.restarts)
        return d

    @classmethod
    def from_wire(cls, data: dict) -> "Record":
        names = {f.name for f in fields(cls)}
        rec = cls(**{k: v for k, v in data.items() if k in names})
        rec.restarts = deque(rec.restarts)
        return rec


class RestartPolicy:
    """Restart decisions for a set of services (times: ``time.monotonic()``, which is
    the same clock in every process of the machine, so a record survives the process
    that made it).

    ``escalate=False`` (the kernel's own children) never gives up: the system cannot
    run without its reincarnation server or its workers, so they are restarted with
    the same backoff, forever.
    """

    def __init__(self, settings: Table | None = None, escalate: bool = True):
        self.settings = settings or Table()
        self.escalate = escalate
        self.services: dict[str, Record] = {}

    def failed(self, service: str, now: float, reason: str, peer: str = "") -> str:
        """Record a failure; returns 'restart' (a restart is scheduled, see :meth:`due`),
        'give-up' (declared failed) or 'pending' (a restart was already scheduled)."""
        s = self.settings(service)
        rec = self.services.setdefault(service, Record())
        rec.failures += 1
        if rec.given_up:
            return "give-up"
        if rec.due is not None:
            return "pending"
        while rec.restarts and now - rec.restarts[0] > s.period:
            rec.restarts.popleft()
        if not rec.restarts or now - rec.restarts[-1] >= s.stable:
            rec.backoff = 0.0  # it ran stably since its last restart: immediate again
        if self.escalate and len(rec.restarts) >= s.intensity:
            rec.given_up = True
            rec.reason = reason
            return "give-up"
        rec.due = now + rec.backoff
        rec.reason = reason
        rec.peer = peer
        rec.backoff = min(s.backoff_cap, max(s.backoff_start, rec.backoff * 2))
        return "restart"

    def immediate(self, service: str, now: float) -> bool:
        """Whether a failure of ``service`` at ``now`` would be answered by a restart at
        once (what :meth:`failed` would schedule with no backoff). Once true it stays
        true until the next failure: restarts only leave the period, and a service only
        becomes stable, as time passes."""
        s = self.settings(service)
        rec = self.services.get(service)
        if rec is None:
            return not self.escalate or s.intensity > 0
        if rec.given_up or rec.due is not None:
            return False
        recent = [t for t in rec.restarts if now - t <= s.period]
        if self.escalate and len(recent) >= s.intensity:
            return False
        return not recent or now - recent[-1] >= s.stable or rec.backoff == 0.0

    def due(self, now: float) -> list[tuple[str, str, str]]:
        """Restarts due now, as (service, reason, failed peer); each is counted."""
        out = []
        for name, rec in self.services.items():
            if rec.due is not None and rec.due <= now:
                rec.due = None
                rec.restarts.append(now)
                out.append((name, rec.reason, rec.peer))
        return out

    def done_elsewhere(self, service: str, now: float) -> None:
        """The scheduled restart happened (it was sent before this policy's state was
        saved): count it, drop the schedule."""
        rec = self.services.get(service)
        if rec is not None and rec.due is not None:
            rec.restarts.append(min(now, rec.due))
            rec.due = None

    def reset(self, service: str) -> None:
        """Forget a service's history (it was rolled back, or restarted by an operator)."""
        self.services.pop(service, None)

    def next_timer(self) -> float:
        return min((r.due for r in self.services.values() if r.due is not None), default=math.inf)

    def describe(self, service: str, now: float) -> dict:
        rec = self.services.get(service)
        s = self.settings(service)
        if rec is None:
            return {"restarts_in_period": 0, "backoff_s": 0.0, "next_restart_in_s": None, "given_up": False}
        recent = [t for t in rec.restarts if now - t <= s.period]
        return {"restarts_in_period": len(recent), "backoff_s": round(rec.backoff, 3),
                "next_restart_in_s": None if rec.due is None else round(max(0.0, rec.due - now), 3),
                "given_up": rec.given_up}

    def snapshot(self) -> dict:
        return {name: rec.to_wire() for name, rec in self.services.items()}

    def restore(self, data: dict) -> None:
        self.services = {name: Record.from_wire(rec) for name, rec in data.items()}
