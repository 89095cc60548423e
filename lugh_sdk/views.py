"""How the CLI shows things: rich tables on a terminal, plain text otherwise (rich
degrades by itself when stdout is not a TTY)."""

from __future__ import annotations

import datetime
import time

from rich.console import Console, Group
from rich.table import Table

console = Console()


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB" if n else "-"


def services_table(status: dict) -> Table:
    t = Table(title="Services", title_justify="left")
    for col in ("service", "state", "pid", "plugin", "uptime", "restarts", "incarnation", "standby", "memory (rss/budget)", "shm", "last failure"):
        t.add_column(col)
    for s in status["services"]:
        state = s["state"]
        style = {"up": "green", "down": "yellow", "failed": "red"}.get(state, "")
        plugin = f"{s['plugin']} {s['version']}".strip() or "-"
        standby = s.get("standby")
        failure = (s["last_failure"] or "")[:60]
        if s.get("safe_mode"):  # the reincarnation server gave up: what the kernel does instead
            failure = f"[red]safe mode:[/] {s['safe_mode']}; {failure}"
        t.add_row(s["name"], f"[{style}]{state}[/]", str(s["pid"] or "-"), plugin, f"{s['uptime_s']:.0f}s",
                  str(s["restarts"]), str(s["incarnation"]),
                  f"{standby['pid']} ({standby['state']})" if standby else "-",
                  f"{_mib(s['memory_rss'])} / {_mib(s['memory_budget'])}", _mib(s["shm_bytes"]), failure)
    return t


def print_chaos(report: dict) -> None:
    """`lugh chaos`: what was injected, and what was recovered."""
    t = Table(title=f"Faults injected (seed {report['seed']})", title_justify="left")
    for col in ("#", "at s", "service", "fault", "pid", "outcome", "back after ms", "detail"):
        t.add_column(col)
    for f in report["faults"]:
        style = "green" if f["outcome"] == "recovered" else "yellow" if f["outcome"] == "skipped" else "red"
        t.add_row(str(f["n"]), f"{f['injected_at_s'] if f['injected_at_s'] is not None else '-'}", f["service"],
                  f["kind"], str(f["pid"] or "-"), f"[{style}]{f['outcome']}[/]",
                  "-" if f["recovered_after_ms"] is None else f"{f['recovered_after_ms']:.0f}", f["detail"][:60])
    console.print(t)
    s = report["summary"]
    console.print(f"{s['injected']} faults injected in {report['duration_s']} s ({', '.join(f'{k} {v}' for k, v in s['by_kind'].items())}); "
                  f"[green]{s['recovered']} recovered[/], "
                  + (f"[red]{s['not_recovered']} not recovered[/]" if s["not_recovered"] else "0 not recovered")
                  + f", {s['skipped']} skipped; recovery median {s['recovery_median_ms']} ms, max {s['recovery_max_ms']} ms.")


def lanes_table(status: dict) -> Table:
    t = Table(title="IPC lanes", title_justify="left")
    for col in ("lane", "queued in", "buffered out", "handled", "dropped"):
        t.add_column(col)
    for name, lane in status["lanes"].items():
        t.add_row(name, str(lane["queued"]), str(lane["outbound_buffered"]), str(lane["handled"]), str(lane["dropped"]))
    return t


def tasks_summary(status: dict) -> Table:
    tasks = status["tasks"]
    t = Table(title="Tasks", title_justify="left")
    for col in ("tasks", "released", "completed", "ready", "missed", "skipped", "resp p50", "resp p99", "resp max", "dispatch gap max"):
        t.add_column(col)
    t.add_row(str(tasks["count"]), str(tasks["released"]), str(tasks["completed"]), str(tasks["ready"]),
              str(tasks["missed"]), str(tasks["skipped"]), f"{tasks['response_p50_ms']} ms",
              f"{tasks['response_p99_ms']} ms", f"{tasks['response_max_ms']} ms", f"{tasks['dispatch_gap_max_ms']} ms")
    return t


def _cpu_policy(status: dict) -> str:
    """The dispatch path's CPU policy (kernel/realtime.py): what the kernel asked for and got."""
    k = status["kernel"]
    policy = lambda cpu: f"SCHED_FIFO {cpu['priority']}" if cpu["policy"] == "fifo" else f"{cpu['policy']} policy"
    line = f"CPU: kernel {policy(k['cpu'])}"
    for kind, label in (("scheduler", "scheduler service"), ("worker", "workers")):
        service = next((s for s in status["services"] if s["kind"] == kind and s.get("cpu")), None)
        line += f", {label} {policy(service['cpu'])}" if service else ""
    if k["rt_priority_asked"] and k["cpu"]["policy"] != "fifo":
        line += f" [yellow](SCHED_FIFO {k['rt_priority_asked']} was refused: the kernel's log says why)[/]"
    return line


def status_renderable(status: dict) -> Group:
    k = status["kernel"]
    mem = status["memory"]
    head = (f"kernel pid {k['pid']} v{k['version']}, up {k['uptime_s']:.0f}s; shared memory: {mem['regions']} regions, "
            f"{_mib(mem['region_bytes'])}, {mem['reclaimed']} reclaimed")
    if "cpu" in k:
        head += "\n" + _cpu_policy(status)
    return Group(head, services_table(status), lanes_table(status), tasks_summary(status))


def print_status(status: dict) -> None:
    console.print(status_renderable(status))


def print_tasks(data: dict) -> None:
    t = Table(title="Tasks", title_justify="left")
    for col in ("name", "period", "deadline", "budget", "prio", "action", "released", "completed", "missed", "skipped", "resp p50", "resp p99", "resp max"):
        t.add_column(col)
    for r in data["tasks"]:
        t.add_row(r["name"], f"{r['period_ms']:g}", f"{r['deadline_ms']:g}", f"{r['budget_ms']:g}", str(r["priority"]),
                  r["action"], str(r["released"]), str(r["completed"]), str(r["missed"]), str(r["skipped"]),
                  f"{r['response_p50_ms']}", f"{r['response_p99_ms']}", f"{r['response_max_ms']}")
    console.print(t)
    if data.get("recent"):
        j = Table(title="Last jobs (times: kernel monotonic seconds)", title_justify="left")
        for col in ("job", "release", "start", "finish", "response ms", "missed", "ok"):
            j.add_column(col)
        for r in data["recent"][-10:]:
            j.add_row(r["job"], f"{r['release']:.4f}", f"{r['start']:.4f}" if r["start"] else "-", f"{r['finish']:.4f}",
                      str(r["response_ms"]), "yes" if r["missed"] else "no", "yes" if r["ok"] else "no")
        console.print(j)


def print_swap(data: dict) -> None:
    if data["committed"]:
        console.print(f"[green]Swapped[/] {data['service']}: {data['previous']} -> {data['plugin']} in {data['duration_ms']} ms; "
                      f"longest dispatch gap {data['max_dispatch_gap_ms']} ms"
                      + (f" (stall {data['max_dispatch_stall_ms']} ms)" if data.get("max_dispatch_stall_ms") is not None else "")
                      + f", jobs lost {data['jobs_lost']}, "
                      f"messages lost {data['messages_lost']}.")
    else:
        console.print(f"[red]Swap rolled back[/] at step {data['step']}: {data['reason']}. "
                      f"{data['service']} still runs {data['plugin']}; jobs lost {data['jobs_lost']}.")


def print_log(data: dict) -> None:
    t = Table(title="Journal", title_justify="left")
    for col in ("seq", "time", "operation", "details"):
        t.add_column(col)
    for r in data["records"]:
        when = datetime.datetime.fromtimestamp(r["at"]).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        details = ", ".join(f"{k}={v}" for k, v in r["data"].items())
        t.add_row(str(r["seq"]), when, r["op"], details)
    console.print(t)
    for p in data.get("problems", []):
        console.print(f"[yellow]warning:[/] {p}")


def show_value(value: bytes | None, limit: int = 0) -> str:
    """A stored value for people: its text if it is printable UTF-8, else hex."""
    if value is None:
        return "-"
    try:
        text = value.decode()
        shown = text if text.isprintable() or not text else "hex:" + value.hex()
    except UnicodeDecodeError:
        shown = "hex:" + value.hex()
    return shown if not limit or len(shown) <= limit else shown[:limit - 1] + "…"


def value_fields(value: bytes | None, name: str = "value") -> dict:
    """A value for JSON: ``{name: text}`` when it is UTF-8, else ``{name_hex: hex}``."""
    if value is None:
        return {name: None}
    try:
        return {name: value.decode()}
    except UnicodeDecodeError:
        return {name + "_hex": value.hex()}


def _when(at: float) -> str:
    return datetime.datetime.fromtimestamp(at).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def print_kv_scan(prefix: str, items: list, more: bool) -> None:
    t = Table(title=f"Keys under {prefix!r}" if prefix else "Keys", title_justify="left")
    for col in ("key", "bytes", "value"):
        t.add_column(col)
    for key, value in items:
        t.add_row(key, str(len(value)), show_value(value, 60))
    console.print(t)
    if more:
        console.print("(more: raise --limit)")


def print_kv_history(key: str | None, data: dict) -> None:
    if key is None:
        t = Table(title="Commits, newest first", title_justify="left")
        for col in ("seq", "time", "by", "keys changed"):
            t.add_column(col)
        for c in data["commits"]:
            keys = ", ".join(c["keys"]) + (f" (+{c['changed'] - len(c['keys'])} more)" if c["changed"] > len(c["keys"]) else "")
            t.add_row(str(c["seq"]), _when(c["at"]), c["label"], keys)
    else:
        t = Table(title=f"Versions of {key!r}, newest first", title_justify="left")
        for col in ("seq", "time", "by", "before", "after"):
            t.add_column(col)
        for v in data["versions"]:
            t.add_row(str(v["seq"]), _when(v["at"]), v["label"], show_value(v["before"], 40), show_value(v["after"], 40))
    console.print(t)


def watch(home, period: float = 1.0) -> None:
    """Refresh the status until interrupted."""
    from rich.live import Live

    from kernel import protocol
    from lugh_sdk.client import KernelClient

    with KernelClient(home) as client, Live(console=console, refresh_per_second=2) as live:
        while True:
            live.update(status_renderable(client.request(protocol.StatusReq())))
            time.sleep(period)
