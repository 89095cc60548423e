"""Targets: the time from `lugh up --target` to a healthy kernel for each QEMU
architecture, and the time of a remote install-and-swap (`lugh install edf-scheduler
--swap`) over mutual TLS beside the same on the local target.

    python bench/targets.py [--json] [--arch x86_64 --arch aarch64] [--no-qemu]

The QEMU part needs `.ci/qemu-setup` (it is left out, and says why, without it). Each
VM is booted, measured and powered off again; a VM is never left running. The local
and the TLS figures come from one kernel (a temporary home) serving its control channel
both on its ipc socket and on tls+tcp://127.0.0.1 with mutual TLS.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import arguments, emit, goal, progress, run, table, temporary_kernel  # noqa: E402
from kernel import protocol  # noqa: E402
from lugh_sdk import qemu, targets, tls  # noqa: E402
from lugh_sdk.errors import LughError  # noqa: E402


def install_swap(cli, plugin: str) -> float:
    started = time.monotonic()
    data = cli.request(protocol.InstallReq(name=plugin, swap=True), timeout=300)
    elapsed = time.monotonic() - started
    swap = data.get("swap") or {}
    if swap and not swap.get("committed", True):
        raise RuntimeError(f"the swap to {plugin} did not commit: {data}")
    return elapsed


def local_vs_tls(rounds: int) -> dict:
    """Install-and-swap back and forth (edf <-> priority) on one kernel, alternately
    through the local socket and through mutual TLS on loopback."""
    certs = tls.make_target_certs(Path(tempfile.mkdtemp(prefix="lugh-bench-certs-")), "bench")
    port = targets.free_port()
    address = f"tls+tcp://127.0.0.1:{port}"
    out = {"local_s": [], "tls_s": [], "tls_status_rtt_ms": []}
    with temporary_kernel(kernel_args=["--listen", address, "--tls-dir", str(certs["ca.pem"].parent)]) as bench:
        remote = targets.RemoteClient("bench", address, certs["ca.pem"], certs["client.pem"], certs["client.key"])
        with remote:
            for i in range(rounds):
                for how, cli in (("local", bench.client), ("tls", remote)):
                    for plugin in ("edf-scheduler", "priority-scheduler"):
                        progress(f"round {i + 1}: install --swap {plugin} over {how}")
                        out[f"{how}_s"].append(install_swap(cli, plugin))
            for _ in range(20):
                t = time.perf_counter()
                remote.request(protocol.StatusReq())
                out["tls_status_rtt_ms"].append((time.perf_counter() - t) * 1000)
    return out


def qemu_boot(arch: str) -> dict:
    home = Path(tempfile.mkdtemp(prefix="lugh-bench-qemu-"))
    targets.add_qemu(home, "vm", arch)
    entry = targets.get(home, "vm")
    progress(f"booting a QEMU {arch} target (TCG: minutes)")
    started = time.monotonic()
    try:
        status = qemu.up(home, "vm", entry)
        boot_s = time.monotonic() - started
        with targets.client(home, "vm", timeout=300) as cli:
            swap_s = install_swap(cli, "edf-scheduler")
        return {"arch": arch, "up_to_healthy_s": round(boot_s, 1), "machine": status["kernel"]["machine"],
                "install_swap_s": round(swap_s, 2), "cpu": os.environ.get("LUGH_QEMU_CPU") or qemu.TCG_CPU[arch],
                "host_load_after": round(os.getloadavg()[0], 2)}
    finally:
        qemu.down(home, "vm", entry)


def main() -> int:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", choices=list(targets.ARCHES))
    parser.add_argument("--no-qemu", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    med = lambda xs: round(sorted(xs)[len(xs) // 2], 3) if xs else None
    load_before = round(os.getloadavg()[0], 2)  # other work on the machine slows TCG most of all
    lt = local_vs_tls(args.rounds)
    result = {"benchmark": "targets", "host_load_before": load_before, "install_swap": {
        "local_median_s": med(lt["local_s"]), "tls_median_s": med(lt["tls_s"]),
        "tls_status_rtt_median_ms": med(lt["tls_status_rtt_ms"]), "samples": len(lt["local_s"])}}
    boots, skipped = [], None
    if not args.no_qemu:
        for arch in args.arch or list(targets.ARCHES):
            try:
                qemu._files(arch)
            except LughError as exc:
                skipped = str(exc)
                continue
            boots.append(qemu_boot(arch))
    result["qemu"] = boots
    if skipped:
        result["qemu_skipped"] = skipped
    s = result["install_swap"]
    overhead = (s["tls_median_s"] or 0) - (s["local_median_s"] or 0)
    result["goal"] = goal("install-and-swap over mutual TLS within 1 s of the local target (s)",
                          round(overhead, 3), 1.0)
    text = table(["install --swap", "median s"], [["local (ipc)", s["local_median_s"]],
                                                  ["remote (tls+tcp, loopback)", s["tls_median_s"]]])
    text += f"\nstatus round trip over mutual TLS: median {s['tls_status_rtt_median_ms']} ms"
    if boots:
        text += "\n" + table(["QEMU target", "up -> healthy s", "install --swap s", "guest machine", "cpu", "load after"],
                             [[b["arch"], b["up_to_healthy_s"], b["install_swap_s"], b["machine"], b["cpu"],
                               b["host_load_after"]] for b in boots])
    text += f"\nhost load average (1 min) at the start: {load_before}"
    if skipped:
        text += f"\nQEMU left out: {skipped}"
    emit(result, args.json, text)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
