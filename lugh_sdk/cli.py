"""`lugh`: the command line. Thin: each command parses, calls a library function, and
prints. Imports are lazy so that `lugh --help` starts fast.

User errors (LughError) print one clear line and exit 1, never a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="LughOS: a real-time microkernel runtime and its plugin SDK.")
task_app = typer.Typer(no_args_is_help=True, help="Periodic real-time tasks.")
app.add_typer(task_app, name="task")

HomeOpt = typer.Option(None, "--home", envvar="LUGH_HOME", help="State directory (default: ~/.local/share/lugh).")
TargetOpt = typer.Option("local", "--target", help="The kernel to act on (only 'local' for now).")
JsonOpt = typer.Option(False, "--json", help="Machine-readable output.")


def _home(home: Optional[Path]) -> Path:
    from lugh_sdk.home import lugh_home

    return lugh_home(home)


def _check_target(target: str) -> None:
    from lugh_sdk.errors import LughError

    if target != "local":
        raise LughError(f"unknown target {target!r}: only the local machine ('local') is available yet")


def _client(home, target):
    from lugh_sdk.client import KernelClient

    _check_target(target)
    return KernelClient(_home(home))


def _request(home, target, req, timeout: float | None = None) -> dict:
    with _client(home, target) as client:
        return client.request(req, timeout=timeout)


def _print_json(data) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


@app.command()
def up(
    detach: bool = typer.Option(False, "--detach", "-d", help="Return once every service is healthy."),
    workload: str = typer.Option("grid", help="Tasks at first boot: 'grid' (the energy-grid demo) or 'none'."),
    home: Optional[Path] = HomeOpt,
    target: str = TargetOpt,
):
    """Boot a kernel: the kernel, the reincarnation server, the services and workers."""
    from lugh_sdk import runtime, views

    _check_target(target)
    if workload not in ("grid", "none"):
        raise typer.BadParameter("workload must be 'grid' or 'none'")
    status = runtime.up(_home(home), workload=workload)
    views.print_status(status)
    if detach:
        return
    typer.echo("Running; press Ctrl-C to stop.")
    try:
        views.watch(_home(home))
    except KeyboardInterrupt:
        pass
    finally:
        runtime.down(_home(home))
        typer.echo("Stopped.")


@app.command()
def down(home: Optional[Path] = HomeOpt, target: str = TargetOpt):
    """Stop the kernel and every process it started."""
    from lugh_sdk import runtime

    _check_target(target)
    typer.echo("Stopped." if runtime.down(_home(home)) else "No kernel was running.")


@app.command()
def status(home: Optional[Path] = HomeOpt, target: str = TargetOpt, as_json: bool = JsonOpt):
    """Services, IPC lanes, tasks and memory of the running kernel."""
    from kernel import protocol
    from lugh_sdk import views

    data = _request(home, target, protocol.StatusReq())
    _print_json(data) if as_json else views.print_status(data)


@task_app.command("add")
def task_add(
    name: str,
    period: float = typer.Option(..., "--period", help="Period, ms."),
    deadline: Optional[float] = typer.Option(None, "--deadline", help="Relative deadline, ms (default: the period)."),
    budget: float = typer.Option(1.0, "--budget", help="Execution budget, ms."),
    priority: int = typer.Option(0, "--priority", help="0-255, larger is more important."),
    action: str = typer.Option("noop", "--action", help="noop, spin:MS, sample:QUANTITY:SENSOR or fail."),
    home: Optional[Path] = HomeOpt,
    target: str = TargetOpt,
):
    """Add a periodic task."""
    import msgspec

    from kernel import protocol
    from lugh_sdk.api.types import Task
    from lugh_sdk.client import LughError

    try:
        task = msgspec.convert(dict(name=name, period_ms=period, deadline_ms=deadline or period, budget_ms=budget,
                                    priority=priority, action=action), Task)
    except msgspec.ValidationError as exc:
        raise LughError(f"invalid task: {exc}") from None
    _request(home, target, protocol.TaskAddReq(task=task))
    typer.echo(f"Added task {name}.")


@task_app.command("list")
def task_list(home: Optional[Path] = HomeOpt, target: str = TargetOpt, as_json: bool = JsonOpt):
    """Tasks with their release, response-time and deadline-miss figures."""
    from kernel import protocol
    from lugh_sdk import views

    data = _request(home, target, protocol.TaskListReq())
    _print_json(data) if as_json else views.print_tasks(data)


@task_app.command("rm")
def task_rm(name: str, home: Optional[Path] = HomeOpt, target: str = TargetOpt):
    """Remove a task (its queued jobs are dropped; a running job finishes)."""
    from kernel import protocol

    data = _request(home, target, protocol.TaskRemoveReq(name=name))
    typer.echo(f"Removed task {name} ({data['queued_jobs_dropped']} queued jobs dropped).")


@app.command()
def swap(
    service: str = typer.Argument(..., help="The service: scheduler."),
    plugin: str = typer.Argument(..., help="The plugin to swap in, e.g. priority or edf-scheduler."),
    health_window: int = typer.Option(300, "--health-window", help="ms the new plugin must stay healthy before commit."),
    home: Optional[Path] = HomeOpt,
    target: str = TargetOpt,
    as_json: bool = JsonOpt,
):
    """Swap a running service's plugin live, with state transfer and rollback."""
    from kernel import protocol
    from lugh_sdk import views

    data = _request(home, target, protocol.SwapReq(service=service, plugin=plugin, health_window_ms=health_window),
                    timeout=120)
    _print_json(data) if as_json else views.print_swap(data)
    if not data["committed"]:
        raise typer.Exit(1)


@app.command()
def log(limit: int = typer.Option(0, help="Only the last N records."), home: Optional[Path] = HomeOpt,
        target: str = TargetOpt, as_json: bool = JsonOpt):
    """The kernel's journal of critical operations."""
    from kernel import protocol
    from lugh_sdk import views

    data = _request(home, target, protocol.LogReq(limit=limit))
    _print_json(data) if as_json else views.print_log(data)


@app.command()
def demo(
    duration: float = typer.Option(40.0, help="Seconds of workload; the swap happens half-way."),
    home: Optional[Path] = HomeOpt,
):
    """Boot the energy-grid demo, swap round-robin to priority live half-way, report, stop."""
    from lugh_sdk import demo as demo_mod

    ok = demo_mod.run(_home(home) if home else None, duration=duration)
    if not ok:
        raise typer.Exit(1)


def main() -> None:
    from lugh_sdk.errors import LughError

    try:
        app()
    except LughError as exc:
        typer.secho(f"error: {exc}", err=True, fg="red")
        sys.exit(1)
