"""Progress bars for long control requests (install, rollback, live swap).

The request runs in a thread on its own control connection; a second connection polls
the kernel (``ProgressReq``) every 100 ms: the install's phase and the bytes
downloaded, and the journaled step of a swap in progress. Bars are drawn only on a
terminal; elsewhere the request simply runs, and rich is not even imported (a script's
`lugh install --json` does not pay for it).
"""

from __future__ import annotations

import sys
import threading

from kernel import protocol

INSTALL_PHASES = ["metadata", "download", "stage", "activate", "swap"]
SWAP_STEPS = ["begin", "quiesce", "import", "redirect", "commit"]
POLL = 0.1


def request(connect, req, *, timeout: float, console=None, swap: bool = False) -> dict:
    """Send ``req`` and return its reply data, drawing progress while it runs (on
    ``console``, a rich Console; by default stderr, if it is a terminal).
    ``connect()`` opens a client of the target (called twice: request and polls)."""
    if console is None and sys.stderr.isatty():
        from rich.console import Console

        console = Console(stderr=True)
    outcome: dict = {}

    def run():
        try:
            with connect() as client:
                outcome["data"] = client.request(req, timeout=timeout)
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    worker = threading.Thread(target=run, name="lugh-request", daemon=True)
    worker.start()
    if console is not None and console.is_terminal:
        _draw(connect, worker, console, swap)
    worker.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["data"]


def _size(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"


def _draw(connect, worker: threading.Thread, console, swap: bool) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description:<30}"), BarColumn(), TextColumn("{task.fields[detail]}"),
               TimeElapsedColumn())
    phases = SWAP_STEPS if swap else INSTALL_PHASES
    with Progress(*columns, console=console, transient=False) as bars, connect() as poll:
        download = bars.add_task("download", total=None, visible=False, detail="")
        steps = bars.add_task("swap" if swap else "install", total=len(phases), detail="")
        swap_bar = None
        while worker.is_alive():
            try:
                state = poll.request(protocol.ProgressReq())
            except Exception:
                state = {}
            phase = state.get("phase")
            if phase in INSTALL_PHASES and not swap:
                bars.update(steps, completed=INSTALL_PHASES.index(phase), description=f"{state.get('name', '')}: {phase}",
                            detail=f"{INSTALL_PHASES.index(phase)}/{len(phases)}")
            if state.get("total"):
                done = state.get("done", 0)
                bars.update(download, total=state["total"], completed=done, visible=True,
                            description=f"download {state.get('name', '')}",
                            detail=f"{_size(done)} / {_size(state['total'])}")
            live = state.get("swap")
            if live:
                done = sum(1 for s in live["steps"] if s in SWAP_STEPS)
                if swap_bar is None:
                    swap_bar = steps if swap else bars.add_task("swap", total=len(SWAP_STEPS), detail="")
                bars.update(swap_bar, completed=done, description=f"swap: {live['step']}",
                            detail=f"{done}/{len(SWAP_STEPS)}")
            worker.join(POLL)
        bars.update(steps, completed=len(phases), detail="done")
        if swap_bar is not None:
            bars.update(swap_bar, completed=len(SWAP_STEPS), detail="done", description="swap: finished")
