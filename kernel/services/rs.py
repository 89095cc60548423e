"""The reincarnation server (MINIX 3's RS, an OTP supervisor). ``python -m kernel.services.rs``.

The kernel sees a service process exit at once (pidfd) and a hang by missed heartbeats
(it kills a hung process itself, so both end as an exit), and tells the RS once per
failure (HIGH lane, ``Event`` kind ``service_down``, with the failed incarnation). The RS
owns the *policy* (:mod:`kernel.supervision`): when to restart, when to give up. The
kernel owns the *mechanism*: it keeps the service's endpoint, buffers its messages while
it is down, starts the next incarnation (or promotes the hot standby) on ``Restart`` and
replays the buffer; on ``GiveUp`` it rolls a crash-looping change back, or enters the
kind's safe mode. One standing order saves a round trip where it counts: when the last
policy state the RS sent says a failure would be restarted at once, a ready hot standby
takes over without waiting for ``Restart``, and the event says so (``taken``): the RS
counts that restart as its own.

The RS survives its own death: after every change it sends the kernel its whole policy
state (``PolicyState``, with the stream position it covers), and it acknowledges its
stream only up to that position, so the kernel keeps every later event. A new RS gets
the state (``PolicyImport``, with the settings and the services up now) and then the
replay of the events after it. A restart it had asked for just before it died is
recognised (the service is up) rather than asked for twice.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from kernel import protocol, supervision
from kernel.processes import die_with_parent
from kernel.protocol import Lane
from kernel.services import loop


def policy_from_env() -> supervision.RestartPolicy:
    """The policy before the kernel's settings arrive: the defaults, with
    ``LUGH_RS_POLICY`` (JSON, inherited from the kernel's environment) applied. The
    kernel folds the same variable into the settings it sends (:func:`supervision.load`)."""
    try:
        table = supervision.load(_nowhere(), environ=os.environ)
    except supervision.SettingsError:
        table = supervision.Table()
    return supervision.RestartPolicy(table)


def _nowhere():
    from pathlib import Path

    return Path("/nonexistent-lugh-home")


class Server:
    def __init__(self, policy: supervision.RestartPolicy, stream: loop.Stream):
        self.policy = policy
        self.stream = stream
        stream.durable_acks = True  # acknowledged only once the kernel holds a state that covers it
        self.out: list = []
        self.dirty = False

    def handle(self, msg):
        now = time.monotonic()
        if isinstance(msg, protocol.PolicyImport):
            self.policy.settings = supervision.Table.from_wire(msg.settings) if msg.settings else self.policy.settings
            self.policy.restore(msg.records)
            for name in msg.up:  # asked for and done before the state was saved
                self.policy.done_elsewhere(name, now)
            self.stream.applied = max(self.stream.applied, msg.applied_seq)
            self.stream.acked = msg.applied_seq
            self.dirty = True
        elif isinstance(msg, protocol.Event) and msg.kind == "service_down":
            service = str(msg.data.get("service", ""))
            reason = str(msg.data.get("reason", ""))
            verdict = self.policy.failed(service, now, reason, str(msg.data.get("peer", "")))
            if verdict == "restart" and msg.data.get("taken"):
                # The kernel's hot standby took over at once, on this policy's standing
                # order (RestartPolicy.immediate on the last state sent): count it.
                self.policy.done_elsewhere(service, now)
            elif verdict == "give-up":
                s = self.policy.settings(service)
                self.out.append((protocol.GiveUp(service=service, reason=f"more than {s.intensity} restarts in "
                                                                       f"{s.period:g} s"), Lane.HIGH))
            self.dirty = True
        elif isinstance(msg, protocol.Event) and msg.kind == "service_reset":
            self.policy.reset(str(msg.data.get("service", "")))
            self.dirty = True
        return None

    def tick(self, now: float):
        out, self.out = self.out, []
        for name, reason, peer in self.policy.due(now):
            out.append((protocol.Restart(service=name, reason=reason[:300], peer=peer), Lane.HIGH))
            self.dirty = True
        if self.dirty:
            # After the requests it describes: a Restart sent and then this RS killed is
            # recognised by its successor (the service is up), never lost.
            self.dirty = False
            out.append((protocol.PolicyState(applied_seq=self.stream.applied, records=self.policy.snapshot()),
                        Lane.HIGH))
            self.stream.acked = self.stream.applied
        return out

    def next_timer(self) -> float:
        return 0.0 if self.out or self.dirty else self.policy.next_timer()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kernel.services.rs")
    parser.add_argument("--peer", required=True)
    parser.add_argument("--heartbeat", type=float, default=0.1)
    parser.add_argument("--standby", action="store_true", help="wait, started, until promoted (hot standby)")
    args = parser.parse_args(argv)
    die_with_parent(int(os.environ["LUGH_PARENT_PID"]))
    link = loop.connect_from_env(args.peer)
    try:
        promote = loop.await_promotion(link, args.heartbeat) if args.standby else None
        if args.standby and promote is None:
            return 0
        stream = loop.Stream()
        server = Server(policy_from_env(), stream)
        if promote is not None:
            loop.promoted(link, promote, stream)
        loop.serve(link, server, stream, args.heartbeat)
    finally:
        link.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
