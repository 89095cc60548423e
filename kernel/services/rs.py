"""The reincarnation server (MINIX 3's RS, an OTP supervisor). ``python -m kernel.services.rs``.

The kernel sees a service process exit at once (pidfd) and a hang by missed
heartbeats, and tells the RS (HIGH lane, ``Event`` kinds ``service_down`` and
``service_hung``). The RS owns the *policy*: when to restart and when to give up.
The kernel owns the *mechanism*: it keeps the service's endpoint, buffers its messages
while it is down, spawns the next incarnation on ``Restart`` and replays the buffer.

Policy, per service:
- the first restart after a quiet period is immediate; each further one waits twice as
  long as the last (``BACKOFF_START``), up to ``BACKOFF_CAP``;
- more than ``INTENSITY`` restarts within ``PERIOD`` seconds: the service is declared
  failed (``GiveUp``) and the kernel enters its safe mode for that kind.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field

from kernel import protocol
from kernel.processes import die_with_parent
from kernel.protocol import Lane
from kernel.services import loop

BACKOFF_START = 0.05
BACKOFF_CAP = 5.0
INTENSITY = 5
PERIOD = 10.0


@dataclass
class Record:
    restarts: deque = field(default_factory=deque)  # times of recent restarts
    backoff: float = 0.0
    due: float | None = None
    reason: str = ""
    given_up: bool = False


class RestartPolicy:
    def __init__(self, backoff_start=BACKOFF_START, backoff_cap=BACKOFF_CAP, intensity=INTENSITY, period=PERIOD):
        self.backoff_start = backoff_start
        self.backoff_cap = backoff_cap
        self.intensity = intensity
        self.period = period
        self.services: dict[str, Record] = {}

    def failed(self, service: str, now: float, reason: str) -> str:
        """Record a failure; returns 'restart' (a restart is scheduled) or 'give-up'."""
        rec = self.services.setdefault(service, Record())
        while rec.restarts and now - rec.restarts[0] > self.period:
            rec.restarts.popleft()
        if not rec.restarts:
            rec.backoff = 0.0  # quiet for a whole period: start again with an immediate restart
        if len(rec.restarts) >= self.intensity:
            rec.given_up = True
            rec.due = None
            return "give-up"
        rec.due = now + rec.backoff
        rec.reason = reason
        rec.backoff = min(self.backoff_cap, max(self.backoff_start, rec.backoff * 2))
        return "restart"

    def due(self, now: float) -> list[tuple[str, str]]:
        out = []
        for name, rec in self.services.items():
            if rec.due is not None and rec.due <= now:
                rec.due = None
                rec.restarts.append(now)
                out.append((name, rec.reason))
        return out

    def next_timer(self) -> float:
        return min((r.due for r in self.services.values() if r.due is not None), default=float("inf"))


class Server:
    def __init__(self, policy: RestartPolicy):
        self.policy = policy
        self.pending: list = []

    def handle(self, msg):
        if isinstance(msg, protocol.Event) and msg.kind in ("service_down", "service_hung"):
            service = str(msg.data.get("service", ""))
            if self.policy.failed(service, time.monotonic(), msg.kind + ": " + str(msg.data.get("reason", ""))) == "give-up":
                return protocol.GiveUp(service=service, reason=f"more than {self.policy.intensity} restarts "
                                                               f"in {self.policy.period:g} s")
        return None

    def tick(self, now: float):
        return [(protocol.Restart(service=name, reason=reason), Lane.HIGH) for name, reason in self.policy.due(now)]

    def next_timer(self) -> float:
        return self.policy.next_timer()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kernel.services.rs")
    parser.add_argument("--peer", required=True)
    parser.add_argument("--heartbeat", type=float, default=0.1)
    args = parser.parse_args(argv)
    die_with_parent(int(os.environ["LUGH_PARENT_PID"]))
    link = loop.connect_from_env(args.peer)
    try:
        loop.serve(link, Server(RestartPolicy()), loop.Stream(), args.heartbeat)
    finally:
        link.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
