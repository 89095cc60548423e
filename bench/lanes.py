"""HIGH-lane latency, idle and under a LOW flood, measured in one run.

An attached client (this process) sends HIGH pings one at a time, ``--interval-ms``
apart, and times each round trip (client -> kernel -> client, the kernel's Pong). It
does so with the kernel idle and while a second attached client, in a separate process
(so that the measuring process is not starved by its own sending), floods the LOW lane
with pings and drains the kernel's LOW pongs between batches: ``--rounds`` times each,
in turn (the flooder is paused with SIGSTOP for the idle phases), so that a change of
the machine's load during the run weighs on both alike. Figures are the medians of the
per-round figures, ratios the medians of the per-round ratios. By default the
flooder sends as fast as it can and retries at once when the lane refuses (a
misbehaving client); ``--flood-backoff-us N`` makes it sleep N µs after each refusal
(a flood that keeps the lane full without spinning a core).

Printed: idle and flood side by side (median, p99, max), the ratios (the goal: a LOW
flood must not delay HIGH traffic, flood p99 / idle p99 <= 2), and what became of the
LOW messages: handled and dropped by the kernel over the alternation (``lugh
status`` lanes; dropped counts both the kernel's inbound LOW queue and its outbound LOW
buffers, here the flooder's pongs), and the flooder's own counts (sent, refused by its
socket because the kernel was not taking more, pongs received).

    python bench/lanes.py [--count 3000] [--rounds 5] [--interval-ms 1] [--flood-backoff-us 0] [--quick] [--json]
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (KernelClient, Lane, arguments, attach, child, child_setup, detach, emit,  # noqa: E402
                           goal, ping_series, progress, protocol, ratio, read_line, run, summary_us, table,
                           temporary_kernel)

GOAL_P99_RATIO = 2.0
FLOOD_MAX_S = 120.0  # the flooder stops by itself after this, whatever happens
BATCH = 64


def flooder(home: str, backoff_us: str) -> None:
    """The flood (child process): LOW pings in batches, the kernel's pongs drained
    between batches; prints its counts as JSON when told to stop (SIGTERM)."""
    stop = child_setup()
    backoff = float(backoff_us) / 1e6
    client = KernelClient(Path(home))
    link = attach(client, "flood")
    sent = pongs = req = 0
    print("ready", flush=True)
    started = time.monotonic()
    try:
        while not stop["stop"] and time.monotonic() - started < FLOOD_MAX_S:
            for _ in range(BATCH):
                req += 1
                if link.send(protocol.Ping(req=req), Lane.LOW):
                    sent += 1
                elif backoff:
                    time.sleep(backoff)
            while link.recv(0) is not None:
                pongs += 1
        print(json.dumps({"sent": sent, "refused": link.dropped, "pongs": pongs,
                          "seconds": round(time.monotonic() - started, 2)}), flush=True)
    finally:
        detach(client, link)
        client.close()


def main() -> int:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=3000, help="HIGH pings per phase (default 3000)")
    parser.add_argument("--interval-ms", type=float, default=1.0, help="pause between HIGH pings (default 1)")
    parser.add_argument("--flood-backoff-us", type=float, default=0.0,
                        help="flooder's sleep after a refused send (default 0: retry at once)")
    parser.add_argument("--settle-s", type=float, default=1.0, help="flood time before measuring (default 1)")
    parser.add_argument("--rounds", type=int, default=5, help="idle and flood phases, in turn (default 5)")
    args = parser.parse_args()
    if args.child is not None:
        flooder(*args.child)
        return 0
    if args.quick:
        args.count, args.settle_s, args.rounds = min(args.count, 1200), min(args.settle_s, 0.5), 3
    interval = args.interval_ms / 1000.0
    chunk = max(1, args.count // args.rounds)
    rounds = {"idle": [], "flood": []}  # one summary per round
    window_s = 0.0
    with temporary_kernel("none") as bench:
        with bench.attached("bench") as link:
            ping_series(link, 300)
            progress("starting the LOW flooder in a separate process")
            with child(__file__, str(bench.home), str(args.flood_backoff_us)) as flood:
                read_line(flood, "flooder")
                # Both snapshots while the flooder is attached: the drops counted in its
                # outbound buffers leave `lugh status` when it detaches.
                start = bench.status()["lanes"]["LOW"]
                for i in range(args.rounds):
                    # Idle and flood in turn, so that a change of the machine's load
                    # weighs on both alike; the flooder is paused (SIGSTOP) for idle.
                    os.kill(flood.pid, signal.SIGSTOP)
                    time.sleep(args.settle_s / 2)  # the kernel drains what it had sent
                    progress(f"round {i + 1}/{args.rounds}: {chunk} HIGH pings, kernel idle, "
                             f"{args.interval_ms:g} ms apart")
                    rounds["idle"].append(summary_us(ping_series(link, chunk, Lane.HIGH, interval)))
                    os.kill(flood.pid, signal.SIGCONT)
                    time.sleep(args.settle_s)
                    progress(f"round {i + 1}/{args.rounds}: {chunk} HIGH pings under the LOW flood")
                    t0 = time.monotonic()
                    rounds["flood"].append(summary_us(ping_series(link, chunk, Lane.HIGH, interval)))
                    window_s += time.monotonic() - t0
                end = bench.status()["lanes"]["LOW"]
                flood.terminate()
                counts = json.loads(read_line(flood, "flooder"))
    mid = lambda values: sorted(values)[len(values) // 2]
    idle, flooded = ({"count": chunk * args.rounds, **{k: round(mid([r[k] for r in rounds[name]]), 1)
                                                        for k in ("median_us", "p99_us", "mean_us", "max_us")}}
                     for name in ("idle", "flood"))
    per_round = lambda key: ratio(mid([f[key] / i[key] for f, i in zip(rounds["flood"], rounds["idle"])]), 1)

    # LOW counts cover the whole alternation; the flood ran for the flood phases only.
    during = {"handled": end["handled"] - start["handled"], "dropped": end["dropped"] - start["dropped"],
              "queued_at_end": end["queued"], "outbound_buffered_at_end": end["outbound_buffered"],
              "seconds": round(window_s, 2)}
    during["handled_per_s"] = round(during["handled"] / window_s)
    p99_ratio = per_round("p99_us")
    result = {
        "benchmark": "lanes", "count": args.count, "interval_ms": args.interval_ms,
        "flood_backoff_us": args.flood_backoff_us,
        "high_idle": idle, "high_under_low_flood": flooded,
        "rounds": args.rounds,
        "ratio_flood_to_idle": {"median": per_round("median_us"), "p99": p99_ratio, "max": per_round("max_us")},
        "low_kernel_while_measured": during, "low_flooder": counts,
        "goal": goal(f"HIGH p99 under flood / idle <= {GOAL_P99_RATIO:g}", p99_ratio, GOAL_P99_RATIO),
    }
    rows = [[label, row["median_us"], row["p99_us"], row["max_us"]]
            for label, row in (("HIGH, kernel idle", idle), ("HIGH, under LOW flood", flooded))]
    r = result["ratio_flood_to_idle"]
    rows.append(["flood / idle", r["median"], r["p99"], r["max"]])
    text = table(["client -> kernel -> client", "median µs", "p99 µs", "max µs"], rows)
    text += "\n\n" + table(
        ["LOW flood", "handled", "dropped", "queued", "out buffered", "seconds", "handled/s"],
        [["kernel, over the rounds (s: flood phases)", during["handled"], during["dropped"], during["queued_at_end"],
          during["outbound_buffered_at_end"], during["seconds"], during["handled_per_s"]]])
    text += "\n\n" + table(
        ["LOW flood", "sent", "refused", "pongs received", "seconds"],
        [["flooder, whole flood", counts["sent"], counts["refused"], counts["pongs"], counts["seconds"]]])
    text += (f"\n\n{chunk * args.rounds} HIGH pings per phase in {args.rounds} rounds, {args.interval_ms:g} ms "
             f"apart; flooder backoff after a refused send: {args.flood_backoff_us:g} µs.")
    emit(result, args.json, text)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
