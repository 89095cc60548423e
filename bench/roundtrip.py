"""Round-trip latency: the kernel's IPC beside bare pynng, measured in one run.

Rows (each ``--count`` round trips, one at a time, after ``--warmup`` untimed ones):

1. kernel -> scheduler service -> kernel: ``PingServiceReq`` on the HIGH lane, timed
   inside the kernel loop (the next ping leaves as the loop handles the previous pong);
   the scheduler service's generic loop answers the Ping with a Pong.
2. bare pynng: a Req0 socket here, a Rep0 echo server in a child Python process, over
   ``ipc://`` (the kernel's transport), with a payload of the size of the kernel's Ping.
   This is the floor: the same transport with no runtime around it.
3. attached external client -> kernel -> client: a Ping on the HIGH lane answered by the
   kernel's Pong, timed in this process (what a gateway or a CLI sees).
4. bare pynng in the lanes' pattern (diagnostic): a Push0/Pull0 pair each way, each side
   polling the Pull socket's ``recv_fd`` and receiving without blocking only once it is
   readable (``kernel.ipc.Readiness``), as the kernel and its peers do. Row 1 against
   row 4 is the cost of the runtime's own code; row 4 against row 2 is the cost of the
   pattern (a wake-up through NNG's pollable descriptor instead of a blocking receive).
5. bare pynng Push0/Pull0 with blocking receives (diagnostic): the floor of any design
   that keeps one-way sockets (which unsolicited messages and lanes need) but gives up
   polling several of them, e.g. one socket per direction with the lanes sorted at
   the receiver. Only Req0/Rep0 is faster, and it allows one outstanding request and
   no message the other side did not ask for.

The rows are measured in turn, ``--rounds`` times (``--count`` / ``--rounds`` round trips
each time), so that a change of the machine's load during the run weighs on every row
alike; each figure is the median of its per-round figures, each ratio the median of the
per-round ratios to the bare row of the same round.

The goal (the performance issue): kernel round trip / bare round trip <= 1.25, on the
median.

    python bench/roundtrip.py [--count 5000] [--quick] [--json]
"""

from __future__ import annotations

import sys
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (Lane, arguments, child, child_setup, emit, goal, ping_series, progress,  # noqa: E402
                           protocol, pynng, ratio, read_line, run, summary_us, table, temporary_kernel)
from kernel.ipc import Readiness, try_recv_msg  # noqa: E402

GOAL_RATIO = 1.25


def echo_server(pattern: str, address: str) -> None:
    """The bare baselines' server (child process): echo every message it gets."""
    stop = child_setup()
    if pattern == "reqrep":
        with pynng.Rep0(recv_timeout=200) as sock:
            sock.listen(address)
            print("ready", flush=True)
            while not stop["stop"]:
                try:
                    sock.send(sock.recv())
                except pynng.Timeout:
                    continue
        return
    inbound, outbound = pynng.Pull0(listen=address + ".in", recv_timeout=200), pynng.Push0(listen=address + ".out")
    with inbound, outbound:
        ready = Readiness({Lane.HIGH: inbound})
        print("ready", flush=True)
        while not stop["stop"]:
            if pattern == "pushpull-blocking":
                try:
                    outbound.send(inbound.recv())
                except pynng.Timeout:
                    pass
            elif ready.first(200) is not None and (msg := try_recv_msg(inbound)) is not None:
                outbound.send(msg.bytes)


def bare_series(pattern: str, address: str, count: int, size: int) -> list[float]:
    """Round trips to the echo server: Req0/Rep0 with blocking calls, or, as the
    kernel's lanes do it, a Push0/Pull0 pair per direction, polling the Pull socket's
    ``recv_fd`` and receiving without blocking once it is readable."""
    payload = b"x" * size
    rtts = []
    if pattern == "reqrep":
        with pynng.Req0(recv_timeout=5000, send_timeout=5000) as sock:
            sock.dial(address, block=True)
            for _ in range(count):
                sent = time.perf_counter()
                sock.send(payload)
                sock.recv()
                rtts.append(time.perf_counter() - sent)
        return rtts
    outbound, inbound = pynng.Push0(send_timeout=5000), pynng.Pull0(recv_timeout=5000)
    with outbound, inbound:
        outbound.dial(address + ".in", block=True)
        inbound.dial(address + ".out", block=True)
        ready = Readiness({Lane.HIGH: inbound})
        for _ in range(count):
            sent = time.perf_counter()
            outbound.send(payload)
            if pattern == "pushpull-blocking":
                inbound.recv()  # raises pynng.Timeout after 5 s
            else:
                while True:
                    if ready.first(5000) is None:
                        raise RuntimeError("the echo server did not answer within 5 s")
                    if try_recv_msg(inbound) is not None:
                        break
            rtts.append(time.perf_counter() - sent)
    return rtts


def main() -> int:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5000, help="round trips per row (default 5000)")
    parser.add_argument("--warmup", type=int, default=300, help="untimed round trips first (default 300)")
    parser.add_argument("--rounds", type=int, default=5, help="rows measured in turn, this many times (default 5)")
    args = parser.parse_args()
    if args.child is not None:
        echo_server(*args.child)
        return 0
    if args.quick:
        args.count, args.warmup = min(args.count, 1500), min(args.warmup, 150)
    # The kernel's Ping to a service: req numbers up to ``count``, no payload.
    size = len(protocol.encode(protocol.Ping(req=args.count)))
    chunk = max(1, args.count // args.rounds)
    patterns = ("reqrep", "pushpull", "pushpull-blocking")
    figures = {name: [] for name in ("kernel", "client", *patterns)}  # one summary per round
    with temporary_kernel("none") as bench, ExitStack() as stack:
        ping = lambda n: bench.request(protocol.PingServiceReq(service="scheduler", count=n, lane=Lane.HIGH),
                                       timeout=120)
        addresses = {}
        for pattern in patterns:
            addresses[pattern] = f"ipc://{bench.home}/bare-{pattern}"
            read_line(stack.enter_context(child(__file__, pattern, addresses[pattern])), "echo server")
            bare_series(pattern, addresses[pattern], args.warmup, size)
        link = stack.enter_context(bench.attached("bench"))
        ping_series(link, args.warmup)
        ping(args.warmup)
        for i in range(args.rounds):
            progress(f"round {i + 1}/{args.rounds}: {chunk} round trips per row, {size}-byte payload")
            figures["kernel"].append(ping(chunk))
            for pattern in patterns:
                figures[pattern].append(summary_us(bare_series(pattern, addresses[pattern], chunk, size)))
            figures["client"].append(summary_us(ping_series(link, chunk)))

    # Rows interleaved in rounds, so that a change in the machine's load during the run
    # weighs on every row alike; each figure is the median of its per-round figures, each
    # ratio the median of the per-round ratios.
    mid = lambda values: sorted(values)[len(values) // 2]
    summary = lambda rounds: {"count": chunk * len(rounds), **{k: round(mid([r[k] for r in rounds]), 1)
                                                               for k in ("median_us", "p99_us", "mean_us")}}
    per_round = lambda name, key: ratio(mid([r[key] / b[key] for r, b in zip(figures[name], figures["reqrep"])]), 1)
    ratios = lambda name: {"median": per_round(name, "median_us"), "p99": per_round(name, "p99_us")}
    kernel, bare, client, lanes_pattern, blocking = (summary(figures[n]) for n in ("kernel", "reqrep", "client",
                                                                                 *patterns[1:]))
    result = {
        "benchmark": "roundtrip", "count": chunk * args.rounds, "rounds": args.rounds, "payload_bytes": size,
        "kernel_service": kernel, "bare_pynng": bare, "client_kernel": client,
        "bare_pynng_lanes_pattern": lanes_pattern, "bare_pynng_pushpull_blocking": blocking,
        "ratio_kernel_to_bare": ratios("kernel"),
        "ratio_client_to_bare": ratios("client"),
        "ratio_lanes_pattern_to_bare": ratios("pushpull"),
        "ratio_pushpull_blocking_to_bare": ratios("pushpull-blocking"),
    }
    result["goal"] = goal(f"kernel/bare median <= {GOAL_RATIO}", result["ratio_kernel_to_bare"]["median"],
                          GOAL_RATIO)
    rows = []
    for label, row, key in (("kernel -> scheduler -> kernel (HIGH)", kernel, "ratio_kernel_to_bare"),
                            ("bare pynng Req0/Rep0, ipc://", bare, None),
                            ("client -> kernel -> client (HIGH)", client, "ratio_client_to_bare"),
                            ("bare pynng Push0/Pull0 + poll, ipc://", lanes_pattern,
                             "ratio_lanes_pattern_to_bare"),
                            ("bare pynng Push0/Pull0, blocking", blocking, "ratio_pushpull_blocking_to_bare")):
        r = result[key] if key else {"median": 1.0, "p99": 1.0}
        rows.append([label, row["median_us"], row["p99_us"], row["mean_us"], r["median"], r["p99"]])
    text = table(["round trip", "median µs", "p99 µs", "mean µs", "x bare (median)", "x bare (p99)"], rows)
    text += (f"\n\n{chunk * args.rounds} round trips per row in {args.rounds} interleaved rounds, {size}-byte "
             f"payload, one at a time; figures and ratios are medians of the per-round ones.")
    emit(result, args.json, text)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
