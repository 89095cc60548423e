"""HIGH-lane latency, idle and under a LOW flood, measured in one run.

An attached client (this process) sends HIGH pings one at a time, ``--interval-ms``
apart, and times each round trip (client -> kernel -> client, the kernel's Pong). It
does so twice: with the kernel idle, then while a second attached client, in a separate
process (so that the measuring process is not starved by its own sending), floods the
LOW lane with pings and drains the kernel's LOW pongs between batches. By default the
flooder sends as fast as it can and retries at once when the lane refuses (a
misbehaving client); ``--flood-backoff-us N`` makes it sleep N µs after each refusal
(a flood that keeps the lane full without spinning a core).

Printed: idle and flood side by side (median, p99, max), the ratios (the goal: a LOW
flood must not delay HIGH traffic, flood p99 / idle p99 <= 2), and what became of the
LOW messages: handled and dropped by the kernel while HIGH was measured (``lugh
status`` lanes; dropped counts both the kernel's inbound LOW queue and its outbound LOW
buffers, here the flooder's pongs), and the flooder's own counts (sent, refused by its
socket because the kernel was not taking more, pongs received).

    python bench/lanes.py [--count 3000] [--interval-ms 1] [--flood-backoff-us 0] [--json]
"""

from __future__ import annotations

import json
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
    args = parser.parse_args()
    if args.child is not None:
        flooder(*args.child)
        return 0
    interval = args.interval_ms / 1000.0
    with temporary_kernel("none") as bench:
        with bench.attached("bench") as link:
            ping_series(link, 300)
            progress(f"HIGH pings, kernel idle: {args.count}, {args.interval_ms:g} ms apart")
            idle = summary_us(ping_series(link, args.count, Lane.HIGH, interval))
            progress("starting the LOW flood in a separate process")
            with child(__file__, str(bench.home), str(args.flood_backoff_us)) as flood:
                read_line(flood, "flooder")
                time.sleep(args.settle_s)
                progress(f"HIGH pings under the LOW flood: {args.count}, {args.interval_ms:g} ms apart")
                # Both snapshots while the flooder is attached: the drops counted in its
                # outbound buffers leave `lugh status` when it detaches.
                start = bench.status()["lanes"]["LOW"]
                t0 = time.monotonic()
                flooded = summary_us(ping_series(link, args.count, Lane.HIGH, interval))
                window_s = time.monotonic() - t0
                end = bench.status()["lanes"]["LOW"]
                flood.terminate()
                counts = json.loads(read_line(flood, "flooder"))

    during = {"handled": end["handled"] - start["handled"], "dropped": end["dropped"] - start["dropped"],
              "queued_at_end": end["queued"], "outbound_buffered_at_end": end["outbound_buffered"],
              "seconds": round(window_s, 2)}
    during["handled_per_s"] = round(during["handled"] / window_s)
    p99_ratio = ratio(flooded["p99_us"], idle["p99_us"])
    result = {
        "benchmark": "lanes", "count": args.count, "interval_ms": args.interval_ms,
        "flood_backoff_us": args.flood_backoff_us,
        "high_idle": idle, "high_under_low_flood": flooded,
        "ratio_flood_to_idle": {"median": ratio(flooded["median_us"], idle["median_us"]), "p99": p99_ratio,
                                "max": ratio(flooded["max_us"], idle["max_us"])},
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
        [["kernel, while HIGH was measured", during["handled"], during["dropped"], during["queued_at_end"],
          during["outbound_buffered_at_end"], during["seconds"], during["handled_per_s"]]])
    text += "\n\n" + table(
        ["LOW flood", "sent", "refused", "pongs received", "seconds"],
        [["flooder, whole flood", counts["sent"], counts["refused"], counts["pongs"], counts["seconds"]]])
    text += (f"\n\n{args.count} HIGH pings per phase, {args.interval_ms:g} ms apart; flooder backoff after a "
             f"refused send: {args.flood_backoff_us:g} µs.")
    emit(result, args.json, text)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
