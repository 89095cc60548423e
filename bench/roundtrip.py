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
   waiting in a selector on ``recv_fd`` and receiving without blocking, as the kernel
   and its peers do. Row 1 against row 4 is the cost of the runtime's own code; row 4
   against row 2 is the cost of the pattern (an extra wake-up through NNG's pollable
   descriptor on each side).

The goal (the performance issue): kernel round trip / bare round trip <= 1.25, on the
median.

    python bench/roundtrip.py [--count 5000] [--json]
"""

from __future__ import annotations

import selectors
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (Lane, arguments, child, child_setup, emit, goal, ping_series, progress,  # noqa: E402
                           protocol, pynng, ratio, read_line, run, summary_us, table, temporary_kernel)
from kernel.ipc import try_recv_msg  # noqa: E402

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
    inbound, outbound = pynng.Pull0(listen=address + ".in"), pynng.Push0(listen=address + ".out")
    with inbound, outbound, selectors.DefaultSelector() as sel:
        sel.register(inbound.recv_fd, selectors.EVENT_READ)
        print("ready", flush=True)
        while not stop["stop"]:
            msg = try_recv_msg(inbound)
            if msg is None:
                sel.select(0.2)
            else:
                outbound.send(msg.bytes)


def bare_series(pattern: str, address: str, count: int, size: int) -> list[float]:
    """Round trips to the echo server: Req0/Rep0 with blocking calls, or, as the
    kernel's lanes do it, a Push0/Pull0 pair per direction, waiting in a selector on the
    Pull socket's ``recv_fd`` and receiving without blocking."""
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
    outbound, inbound = pynng.Push0(send_timeout=5000), pynng.Pull0()
    with outbound, inbound, selectors.DefaultSelector() as sel:
        outbound.dial(address + ".in", block=True)
        inbound.dial(address + ".out", block=True)
        sel.register(inbound.recv_fd, selectors.EVENT_READ)
        for _ in range(count):
            sent = time.perf_counter()
            outbound.send(payload)
            while try_recv_msg(inbound) is None:
                if not sel.select(5.0):
                    raise RuntimeError("the echo server did not answer within 5 s")
            rtts.append(time.perf_counter() - sent)
    return rtts


def main() -> int:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5000, help="round trips per row (default 5000)")
    parser.add_argument("--warmup", type=int, default=300, help="untimed round trips first (default 300)")
    args = parser.parse_args()
    if args.child is not None:
        echo_server(*args.child)
        return 0
    # The kernel's Ping to a service: req numbers up to ``count``, no payload.
    size = len(protocol.encode(protocol.Ping(req=args.count)))
    with temporary_kernel("none") as bench:
        ping = lambda n: bench.request(protocol.PingServiceReq(service="scheduler", count=n, lane=Lane.HIGH),
                                       timeout=120)
        progress(f"kernel -> scheduler -> kernel, {args.count} pings")
        ping(args.warmup)
        kernel = ping(args.count)
        kernel = {k: kernel[k] for k in ("count", "median_us", "p99_us", "mean_us")}

        bare = {}
        for pattern in ("reqrep", "pushpull"):
            progress(f"bare pynng {pattern} over ipc://, {args.count} round trips of {size} bytes")
            address = f"ipc://{bench.home}/bare-{pattern}"
            with child(__file__, pattern, address) as echo:
                read_line(echo, "echo server")
                bare_series(pattern, address, args.warmup, size)
                bare[pattern] = summary_us(bare_series(pattern, address, args.count, size))
        bare, lanes_pattern = bare["reqrep"], bare["pushpull"]

        progress(f"attached client -> kernel -> client, {args.count} pings")
        with bench.attached("bench") as link:
            ping_series(link, args.warmup)
            client = summary_us(ping_series(link, args.count))

    result = {
        "benchmark": "roundtrip", "count": args.count, "payload_bytes": size,
        "kernel_service": kernel, "bare_pynng": bare, "client_kernel": client,
        "bare_pynng_lanes_pattern": lanes_pattern,
        "ratio_kernel_to_bare": {"median": ratio(kernel["median_us"], bare["median_us"]),
                                 "p99": ratio(kernel["p99_us"], bare["p99_us"])},
        "ratio_client_to_bare": {"median": ratio(client["median_us"], bare["median_us"]),
                                 "p99": ratio(client["p99_us"], bare["p99_us"])},
        "ratio_lanes_pattern_to_bare": {"median": ratio(lanes_pattern["median_us"], bare["median_us"]),
                                        "p99": ratio(lanes_pattern["p99_us"], bare["p99_us"])},
    }
    result["goal"] = goal(f"kernel/bare median <= {GOAL_RATIO}", result["ratio_kernel_to_bare"]["median"],
                          GOAL_RATIO)
    rows = []
    for label, row, key in (("kernel -> scheduler -> kernel (HIGH)", kernel, "ratio_kernel_to_bare"),
                            ("bare pynng Req0/Rep0, ipc://", bare, None),
                            ("client -> kernel -> client (HIGH)", client, "ratio_client_to_bare"),
                            ("bare pynng Push0/Pull0 + selector, ipc://", lanes_pattern,
                             "ratio_lanes_pattern_to_bare")):
        r = result[key] if key else {"median": 1.0, "p99": 1.0}
        rows.append([label, row["median_us"], row["p99_us"], row["mean_us"], r["median"], r["p99"]])
    text = table(["round trip", "median µs", "p99 µs", "mean µs", "x bare (median)", "x bare (p99)"], rows)
    text += f"\n\n{args.count} round trips per row, {size}-byte payload, one at a time."
    emit(result, args.json, text)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
