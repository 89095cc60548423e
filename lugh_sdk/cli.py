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

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None, help="LughOS: a real-time microkernel runtime and its plugin SDK.")
task_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Periodic real-time tasks.")
app.add_typer(task_app, name="task")
kv_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="The storage service: a transactional key-value store with history.")
app.add_typer(kv_app, name="kv")
from lugh_sdk.target_cli import target_app  # noqa: E402  (`lugh target ...`)

app.add_typer(target_app, name="target")

HomeOpt = typer.Option(None, "--home", envvar="LUGH_HOME", help="State directory (default: ~/.local/share/lugh).")
TargetOpt = typer.Option("local", "--target", help="The kernel to act on: 'local' or a target added with `lugh target add`.")
JsonOpt = typer.Option(False, "--json", help="Machine-readable output.")


def _home(home: Optional[Path]) -> Path:
    from lugh_sdk.home import lugh_home

    return lugh_home(home)


def _check_target(target: str) -> None:
    if target != "local":
        from lugh_sdk import targets

        targets.get(_home(None), target)  # a clear error for an unknown target


def _client(home, target):
    from lugh_sdk import targets  # local: the ipc socket; others: mutual TLS (lugh_sdk/targets.py)

    return targets.client(_home(home), target)


def _request(home, target, req, timeout: float | None = None) -> dict:
    with _client(home, target) as client:
        return client.request(req, timeout=timeout)


def _print_json(data) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


@app.command()
def up(
    detach: bool = typer.Option(False, "--detach", "-d", help="Return once every service is healthy."),
    workload: str = typer.Option("grid", help="Tasks at first boot: 'grid' (the energy-grid demo) or 'none'."),
    slots: int = typer.Option(1, help="Jobs running at once (dispatch slots; global scheduling over that many CPUs)."),
    workers: int = typer.Option(3, help="Worker processes; more than --slots, so that preemption finds one idle."),
    dispatch_batch: int = typer.Option(1, help="Scheduler decisions per answer, sent ahead to the worker's deck "
                                              "(1-64; a throughput mode, single slot: docs/architecture.md)."),
    rt_priority: int = typer.Option(0, help="Real-time CPU policy: SCHED_FIFO priority of the kernel (3-99, e.g. "
                                            "20), its scheduler service one below, workers at 1; for a machine "
                                            "dedicated to the runtime (docs/architecture.md). 0: the normal policy."),
    home: Optional[Path] = HomeOpt,
    target: str = TargetOpt,
):
    """Boot a kernel: the kernel, the reincarnation server, the services and workers."""
    from lugh_sdk import runtime, views

    if workload not in ("grid", "none"):
        raise typer.BadParameter("workload must be 'grid' or 'none'")
    if target != "local" and (slots, workers, dispatch_batch, rt_priority) != (1, 3, 1, 0):
        raise typer.BadParameter("--slots, --workers, --dispatch-batch and --rt-priority apply to the local target "
                                 "only (a guest's kernel boots with the defaults)")
    if target != "local":  # a QEMU target boots its VM; returns once its kernel is healthy
        from lugh_sdk import targets

        views.print_status(targets.up(_home(home), target, workload=workload))
        return
    status = runtime.up(_home(home), workload=workload, workers=workers,
                        kernel_args=["--slots", str(slots), "--dispatch-batch", str(dispatch_batch),
                                     "--rt-priority", str(rt_priority)])
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

    if target != "local":
        from lugh_sdk import targets

        typer.echo("Stopped." if targets.down(_home(home), target) else "No kernel was running.")
        return
    typer.echo("Stopped." if runtime.down(_home(home)) else "No kernel was running.")


@app.command()
def status(home: Optional[Path] = HomeOpt, target: str = TargetOpt, as_json: bool = JsonOpt):
    """Services, IPC lanes, tasks and memory of the running kernel."""
    from kernel import protocol

    data = _request(home, target, protocol.StatusReq())
    if as_json:
        _print_json(data)
    else:
        from lugh_sdk import views  # rich: only for a person reading

        views.print_status(data)


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
    service: str = typer.Argument(..., help="The service: scheduler or storage."),
    plugin: str = typer.Argument(..., help="The plugin to swap in, e.g. priority or edf-scheduler."),
    health_window: int = typer.Option(300, "--health-window", help="ms the new plugin must stay healthy before commit."),
    home: Optional[Path] = HomeOpt,
    target: str = TargetOpt,
    as_json: bool = JsonOpt,
):
    """Swap a running service's plugin live, with state transfer and rollback."""
    from kernel import protocol
    from lugh_sdk import progress

    data = progress.request(lambda: _client(home, target),  # with a progress bar of the swap's steps on a terminal
                            protocol.SwapReq(service=service, plugin=plugin, health_window_ms=health_window),
                            timeout=120, swap=True)
    if as_json:
        _print_json(data)
    else:
        from lugh_sdk import views  # rich: only for a person reading

        views.print_swap(data)
    if not data["committed"]:
        raise typer.Exit(1)


def _kv_value(text: Optional[str], file: Optional[Path], hex_value: Optional[str]) -> bytes:
    from lugh_sdk.errors import LughError

    given = [v for v in (text, file, hex_value) if v is not None]
    if len(given) != 1:
        raise LughError("give the value as an argument, or with --file or --hex (one of them)")
    if file is not None:
        return file.read_bytes()
    if hex_value is not None:
        try:
            return bytes.fromhex(hex_value)
        except ValueError:
            raise LughError("--hex: not a hexadecimal string") from None
    return text.encode()


@kv_app.command("get")
def kv_get(key: str, home: Optional[Path] = HomeOpt, target: str = TargetOpt, as_json: bool = JsonOpt):
    """Print a key's committed value (text, or hex when it is not UTF-8). Exit 1 if absent."""
    from kernel import protocol
    from lugh_sdk import views

    value = _request(home, target, protocol.KvReq(get=key))["value"]
    if as_json:
        _print_json({"key": key, **views.value_fields(value)})
    elif value is not None:
        typer.echo(views.show_value(value))
    if value is None:
        if not as_json:
            typer.echo(f"{key}: no value", err=True)
        raise typer.Exit(1)


@kv_app.command("put")
def kv_put(key: str, value: Optional[str] = typer.Argument(None, help="The value, as text."),
           file: Optional[Path] = typer.Option(None, "--file", help="Read the value from this file."),
           hex_value: Optional[str] = typer.Option(None, "--hex", help="The value, in hexadecimal."),
           home: Optional[Path] = HomeOpt, target: str = TargetOpt, as_json: bool = JsonOpt):
    """Write a key (durable when this returns)."""
    from kernel import protocol

    data = _request(home, target, protocol.KvReq(put=[(key, _kv_value(value, file, hex_value))]))
    _print_json({"key": key, "commit": data["commit"]}) if as_json else typer.echo(f"Committed {key} (commit {data['commit']}).")


@kv_app.command("del")
def kv_del(keys: list[str] = typer.Argument(..., help="One or more keys, deleted in one transaction."),
           home: Optional[Path] = HomeOpt, target: str = TargetOpt, as_json: bool = JsonOpt):
    """Delete keys (all in one transaction)."""
    from kernel import protocol

    data = _request(home, target, protocol.KvReq(put=[(k, None) for k in keys]))
    _print_json({"keys": keys, "commit": data["commit"]}) if as_json else \
        typer.echo(f"Deleted {', '.join(keys)} (commit {data['commit']}).")


@kv_app.command("scan")
def kv_scan(prefix: str = typer.Argument("", help="Key prefix (default: every key)."),
            limit: int = typer.Option(100, "--limit", help="At most this many pairs."),
            home: Optional[Path] = HomeOpt, target: str = TargetOpt, as_json: bool = JsonOpt):
    """List the pairs whose key starts with PREFIX, in key order."""
    from kernel import protocol
    from lugh_sdk import views

    items, after, more = [], "", True
    with _client(home, target) as client:
        while more and len(items) < limit:
            page = client.request(protocol.KvScanReq(prefix=prefix, after=after, limit=min(1000, limit - len(items))))
            items += page["items"]
            after, more = page["after"], page["more"]
    if as_json:
        _print_json({"prefix": prefix, "items": [{"key": k, **views.value_fields(v)} for k, v in items], "more": more})
    else:
        views.print_kv_scan(prefix, items, more)


@kv_app.command("history")
def kv_history(key: Optional[str] = typer.Argument(None, help="A key: its versions (default: the last commits)."),
               limit: int = typer.Option(20, "--limit", help="At most this many entries."),
               before: int = typer.Option(0, "--before", help="Only commits before this sequence number."),
               home: Optional[Path] = HomeOpt, target: str = TargetOpt, as_json: bool = JsonOpt):
    """The last commits (sequence number, time, who, keys), or the versions of one key."""
    from kernel import protocol
    from lugh_sdk import views

    data = _request(home, target, protocol.KvHistoryReq(key=key, limit=limit, before=before))
    if not as_json:
        return views.print_kv_history(key, data)
    for v in data.get("versions", []):
        v.update(views.value_fields(v.pop("before"), "before"), **views.value_fields(v.pop("after"), "after"))
    _print_json(data)


@kv_app.command("rollback")
def kv_rollback(seq: int = typer.Argument(..., help="Restore the data as it was right after this commit."),
                yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
                home: Optional[Path] = HomeOpt, target: str = TargetOpt, as_json: bool = JsonOpt):
    """Restore the state as of commit SEQ, as a new commit (journaled; it can itself be rolled back)."""
    from kernel import protocol

    if not yes and not typer.confirm(f"Restore every key changed since commit {seq} to its value then?"):
        raise typer.Exit(1)
    data = _request(home, target, protocol.KvRollbackReq(to_seq=seq), timeout=150)
    if as_json:
        _print_json(data)
    elif data["restored"]:
        typer.echo(f"Restored the state as of commit {seq}: {data['restored']} keys rewritten in commit "
                   f"{data['commit']} (undo: lugh kv rollback {data['commit'] - 1}).")
    else:
        typer.echo(f"Nothing changed since commit {seq}.")


@kv_app.command("compact")
def kv_compact(keep: int = typer.Option(..., "--keep", help="Keep the history of this many last commits."),
               home: Optional[Path] = HomeOpt, target: str = TargetOpt, as_json: bool = JsonOpt):
    """Drop older history (rollback cannot go back further than the kept commits)."""
    from kernel import protocol

    data = _request(home, target, protocol.KvCompactReq(keep=keep), timeout=150)
    _print_json(data) if as_json else typer.echo(
        f"Dropped the history of {data['removed']} commits; rollback can go back to commit {data['horizon']}.")


@kv_app.command("stats")
def kv_stats(home: Optional[Path] = HomeOpt, target: str = TargetOpt, as_json: bool = JsonOpt):
    """Keys, last commit, history kept, group commits, open transactions."""
    from kernel import protocol

    data = _request(home, target, protocol.KvStatsReq())
    if as_json:
        _print_json(data)
    else:
        for name in sorted(data):
            typer.echo(f"{name:>18}: {data[name]}")


@app.command()
def restart(service: str = typer.Argument(..., help="The service: scheduler, storage, monitor, rs, w0..."),
            home: Optional[Path] = HomeOpt, target: str = TargetOpt):
    """Restart a service now; also brings a failed service out of its safe mode."""
    from kernel import protocol

    data = _request(home, target, protocol.ServiceRestartReq(service=service))
    typer.echo(f"Restarting {service}" + (" (it was in safe mode)." if data["was_failed"] else "."))


@app.command()
def chaos(
    duration: float = typer.Option(30.0, "--duration", help="Seconds of fault injection."),
    seed: Optional[int] = typer.Option(None, "--seed", help="The same seed injects the same faults (default: random, printed)."),
    rate: float = typer.Option(1.0, "--rate", help="Faults per second, on average."),
    faults: str = typer.Option("kill,hang,raise", "--faults", help="Which kinds: kill (-9), hang (SIGSTOP), raise (in a plugin hook)."),
    services: Optional[str] = typer.Option(None, "--services", help="Comma-separated services (default: all, the reincarnation server included)."),
    home: Optional[Path] = HomeOpt,
    target: str = TargetOpt,
    as_json: bool = JsonOpt,
):
    """Inject faults into random services at random times; print what was injected and what recovered."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from lugh_sdk import chaos as chaos_mod, views
    from lugh_sdk.errors import LughError

    if target != "local":
        raise LughError("lugh chaos kills and stops processes on this machine: only the local target")
    kinds = [k.strip() for k in faults.split(",") if k.strip()]
    names = [s.strip() for s in services.split(",") if s.strip()] if services else None
    with Progress(TextColumn("chaos"), BarColumn(), TextColumn("{task.fields[n]} faults"), TimeRemainingColumn(),
                  transient=True, disable=as_json) as bar:
        task = bar.add_task("chaos", total=duration, n=0)
        report = chaos_mod.run(_home(home), duration=duration, seed=seed, rate=rate, kinds=kinds, services=names,
                               on_progress=lambda elapsed, n: bar.update(task, completed=min(elapsed, duration), n=n))
    _print_json(report) if as_json else views.print_chaos(report)
    if report["summary"]["not_recovered"]:
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
    duration: float = typer.Option(40.0, help="Seconds of workload; the swaps happen at one and two thirds."),
    home: Optional[Path] = HomeOpt,
):
    """Boot the energy-grid demo; swap round-robin to priority live, then install edf and swap to it; report, stop."""
    from lugh_sdk import demo as demo_mod

    ok = demo_mod.run(_home(home) if home else None, duration=duration)
    if not ok:
        raise typer.Exit(1)


from lugh_sdk import cli_vendor  # noqa: E402  (the vendor's commands: new, check, build, publish)

cli_vendor.register(app)
from lugh_sdk import cli_registry  # noqa: E402  (keys, registry, search, info, install, list, uninstall, rollback)

cli_registry.register(app)


def main() -> None:
    from lugh_sdk.errors import LughError

    try:
        app()
    except LughError as exc:
        typer.secho(f"error: {exc}", err=True, fg="red")
        sys.exit(1)
