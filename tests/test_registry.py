"""The registry and the target's install path, working: keys, registry administration
(vendors, revocation, key rotation), publish, search, info, install, list, uninstall and
rollback, a registry served by `python -m http.server` on loopback, `install --swap`
committing, a failing swap rolling the install back, a plugin changed after
installation refused at load, and an install cut short by a stop reverted at boot.

The refusals themselves are in tests/test_registry_security.py.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from conftest import boot, down_and_check
from kernel import install, plugin_store, protocol
from kernel.plugin_store import PluginError
from lugh_sdk import progress
from lugh_sdk.api import Task
from lugh_sdk.cli import app
from lugh_sdk.client import KernelClient, LughError
from registry import local, publish
from registry.errors import RegistryError
from registry.keys import KeyStore
from wheelkit import UNHEALTHY, make_wheel, make_world, snapshot

TASKS = [
    Task(name="fast", period_ms=20, deadline_ms=20, budget_ms=2, priority=90, action="noop"),
    Task(name="mid", period_ms=50, deadline_ms=50, budget_ms=5, priority=50, action="spin:1"),
]
TIMEOUT = 120.0


def cli(home: Path, *args: str) -> str:
    """Run a `lugh` command in this process; user errors come back as LughError."""
    result = CliRunner().invoke(app, list(args), env={"LUGH_HOME": str(home), "COLUMNS": "200"})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result.output


# --------------------------------------------------------------------------- keys

def test_keys_new_list_export(tmp_path):
    home = tmp_path / "home"
    out = cli(home, "keys", "new", "acme")
    assert "PRIVATE" not in out and "Created key acme" in out
    keys = home / "keys"
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    assert stat.S_IMODE((keys / "acme.key").stat().st_mode) == 0o600
    listed = json.loads(cli(home, "keys", "list", "--json"))
    assert [(k["name"], k["private"]) for k in listed] == [("acme", True)]
    exported = cli(home, "keys", "export", "acme")
    assert exported.startswith("-----BEGIN PUBLIC KEY-----") and "PRIVATE" not in exported
    assert exported == (keys / "acme.pub").read_text()
    with pytest.raises(RegistryError, match="already exists"):
        cli(home, "keys", "new", "acme")
    with pytest.raises(RegistryError, match="not valid"):
        cli(home, "keys", "new", "Bad/Name")


# --------------------------------------------------------------------------- registry administration

def test_registry_init_add_vendor_publish_search_info(tmp_path):
    operator, vendor = tmp_path / "operator", tmp_path / "vendor"
    reg = tmp_path / "reg"
    cli(vendor, "keys", "new", "acme")
    pub = tmp_path / "acme.pub"
    pub.write_text(cli(vendor, "keys", "export", "acme"))
    out = cli(operator, "registry", "init", str(reg), "--trust", "mine")
    assert "Created registry" in out and (reg / "metadata" / "1.root.json").is_file()
    assert not list(reg.rglob("*.key")), "no private key inside a directory meant to be served"
    cli(operator, "registry", "add-vendor", "acme", "--key", str(pub), "--packages", "acme-*,tools-acme",
        "--registry", str(reg))
    with pytest.raises(RegistryError, match="already belongs to vendor 'acme'"):
        cli(operator, "registry", "add-vendor", "other", "--key", str(pub), "--packages", "acme-*",
            "--registry", str(reg))
    key = KeyStore(vendor / "keys").private_path("acme")
    wheel = make_wheel(tmp_path / "w", "acme-sched", "1.0.0")
    done = publish.publish(reg, wheel, "acme", key, home=operator)
    assert (done["name"], done["version"], done["vendor"], done["published"]) == ("acme-sched", "1.0.0", "acme", True)
    publish.publish(reg, make_wheel(tmp_path / "w2", "acme-sched", "1.1.0"), "acme", key, home=operator)
    with pytest.raises(RegistryError, match="already published"):
        publish.publish(reg, make_wheel(tmp_path / "w3", "acme-sched", "1.1.0", api=">=1.0"), "acme", key,
                        home=operator)
    found = json.loads(cli(operator, "search", "sched", "--registry", "mine", "--json"))["results"]
    assert [(r["name"], r["version"]) for r in found] == [("acme-sched", "1.1.0")]
    assert json.loads(cli(operator, "search", "nothing-like-it", "--registry", "mine", "--json"))["results"] == []
    info = json.loads(cli(operator, "info", "acme-sched", "--registry", "mine", "--json"))
    assert [v["version"] for v in info["versions"]] == ["1.0.0", "1.1.0"]
    head = info["versions"][-1]
    assert (head["kind"], head["api"], head["architectures"], head["vendor"]) == \
        ("scheduler", ">=1.0,<2", ["x86_64", "aarch64"], "acme")
    assert head["signature"].startswith("verified: vendor acme")
    text = cli(operator, "info", "acme-sched", "--registry", "mine")
    assert "verified" in text and "1.1.0" in text
    cli(operator, "registry", "revoke-vendor", "acme", "--registry", str(reg))
    with pytest.raises(LughError, match="revoked"):
        cli(operator, "info", "acme-sched", "--registry", "mine")


def test_key_rotation_keeps_targets_updating(tmp_path):
    w = make_world(tmp_path)
    w.publish(w.wheel("acme-a"))
    with install.OfflineTarget(w.target) as target:
        install.install(target, "acme-a", registry="test")
        repo = w.repo
        old_targets = repo.store.signer("test-targets")
        for role in ("root", "targets", "snapshot", "timestamp"):
            assert repo.rotate_key(role)["role"] == role
        vendor = repo.rotate_key("acme")  # a new key for acme, in the operator's store
        new_key = repo.store.private_path(vendor["key"])
        with pytest.raises(RegistryError, match="is not vendor 'acme''s key"):
            w.publish(w.wheel("acme-b"))  # the old vendor key is no longer acme's
        w.publish(w.wheel("acme-b"), key=new_key)
        # The target follows the root chain (2.root.json signed by old and new root keys).
        assert install.install(target, "acme-b", registry="test")["installed"]
        assert (w.target / "trust" / "test" / "metadata" / "root_history" / "2.root.json").is_file()
        # Targets metadata signed with the retired targets key is refused.
        md = repo.load("targets")
        md.signed.version += 1
        md.signatures.clear()
        md.sign(old_targets)
        repo.commit({"targets": md})
        before = snapshot(w.target)
        with pytest.raises(PluginError, match="signed by an unknown or untrusted key"):
            install.install(target, "acme-a", "1.0.0", registry="test", swap=False)
        assert snapshot(w.target) == before


# --------------------------------------------------------------------------- a registry over http

@pytest.fixture
def http_registry(tmp_path):
    """The registry directory of a world, served by `python -m http.server` on
    127.0.0.1 (an ephemeral port); stopped at teardown."""
    w = make_world(tmp_path)
    proc = subprocess.Popen([sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1",
                             "--directory", str(w.registry)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    try:
        line = proc.stdout.readline()
        port = int(re.search(r"port (\d+)", line).group(1))
        yield w, f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        proc.wait(10)


def test_install_from_a_registry_served_over_http(http_registry, tmp_path):
    w, url = http_registry
    w.publish(w.wheel("acme-web"))
    home = tmp_path / "remote-target"
    root = w.registry / "metadata" / "1.root.json"
    cli(home, "registry", "trust", "web", url, "--root", str(root))
    assert json.loads(cli(home, "search", "--registry", "web", "--json"))["results"][0]["name"] == "acme-web"
    with install.OfflineTarget(home) as target:
        done = install.install(target, "acme-web", registry=url)  # by its URL as well as by its name
        assert (done["installed"], done["registry"]) == (True, "web")
        plugin_store.verify_installed(plugin_store.locate(home, "acme-web"))
        # tampered on the server: refused over http too
        w.publish(w.wheel("acme-web", "1.1.0"))
        stored = next(p for p in (w.registry / "targets" / "acme-web").glob("*1.1.0*"))
        data = bytearray(stored.read_bytes())
        data[100] ^= 0xFF
        stored.write_bytes(bytes(data))
        before = snapshot(home)
        with pytest.raises(PluginError, match="does not match its signed length or hash"):
            install.install(target, "acme-web", registry="web")
        assert snapshot(home) == before


# --------------------------------------------------------------------------- on a running kernel

@pytest.fixture
def busy(kernel):
    for task in TASKS:
        kernel.request(protocol.TaskAddReq(task=task))
    wait_completed(kernel, 20)
    return kernel


def wait_completed(kernel, jobs: int) -> dict:
    start = kernel.status()["tasks"]["completed"]
    return kernel.wait_for(lambda st: st["tasks"]["completed"] >= start + jobs, what=f"{jobs} more jobs")


def scheduler_of(kernel) -> dict:
    return kernel.service("scheduler")


def journal_ops(kernel, op_id: str) -> list[str]:
    return [r["op"] for r in kernel.request(protocol.LogReq())["records"] if r["data"].get("id") == op_id]


def no_job_lost(kernel) -> None:
    t = kernel.status()["tasks"]
    assert t["released"] == t["completed"] + t["ready"], t


def acme_vendor(home: Path) -> Path:
    """Vendor acme (acme-*) of the home's own registry; its key's path."""
    return local.ensure_vendor(home, "acme", ["acme-*"], "acme")


def test_install_swap_list_uninstall_rollback(busy, tmp_path):
    home = busy.home
    key = acme_vendor(home)
    publish.publish(local.registry_dir(home), make_wheel(tmp_path / "w", "acme-sched"), "acme", key, home=home)
    assert busy.request(protocol.ProgressReq()) == {}
    # `lugh install acme-sched --swap`, with the progress bars drawn on a terminal
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=120)
    done = progress.request(lambda: KernelClient(home), protocol.InstallReq(name="acme-sched", swap=True),
                            timeout=TIMEOUT, console=console)
    assert (done["installed"], done["committed"], done["vendor"]) == (True, True, "acme"), done
    assert (done["swap"]["committed"], done["swap"]["jobs_lost"], done["swap"]["messages_lost"]) == (True, 0, 0)
    assert "swap" in screen.getvalue() and "install" in screen.getvalue()
    assert journal_ops(busy, done["id"]) == ["install.begin", "install.stage", "install.activate", "install.commit"]
    swap_ops = journal_ops(busy, done["swap"]["id"])
    assert swap_ops[0] == "swap.begin" and swap_ops[-1] == "swap.commit"
    sched = scheduler_of(busy)
    assert (sched["plugin"], sched["version"], sched["state"]) == ("acme-sched", "1.0.0", "up")
    wait_completed(busy, 20)
    listed = {p["name"]: p for p in busy.request(protocol.PluginListReq())["plugins"]}
    assert listed["acme-sched"]["in_use_by"] == ["scheduler"] and listed["acme-sched"]["integrity"] == "ok"
    assert listed["acme-sched"]["vendor"] == "acme" and listed["edf-scheduler"]["in_use_by"] == []
    assert "acme-sched" in cli(home, "list")
    # installing it again only verifies it; uninstalling it while in use is refused
    again = busy.request(protocol.InstallReq(name="acme-sched"), timeout=TIMEOUT)
    assert (again["installed"], again["already_installed"]) == (False, True)
    with pytest.raises(LughError, match="acme-sched 1.0.0 is in use by the scheduler service"):
        busy.request(protocol.UninstallReq(name="acme-sched"))
    # a new version of a plugin in use needs --swap
    publish.publish(local.registry_dir(home), make_wheel(tmp_path / "w2", "acme-sched", "1.1.0"), "acme", key,
                    home=home)
    with pytest.raises(LughError, match="in use by the scheduler service: install acme-sched 1.1.0 with --swap"):
        busy.request(protocol.InstallReq(name="acme-sched"), timeout=TIMEOUT)
    # `lugh rollback`: swap back to round-robin, remove acme-sched
    undo = busy.request(protocol.RollbackReq(), timeout=TIMEOUT)
    assert (undo["undid"], undo["swapped_back_to"], undo["removed"]) == \
        ("install", "round-robin-scheduler", "acme-sched==1.0.0")
    assert scheduler_of(busy)["plugin"] == "round-robin-scheduler"
    assert "acme-sched" not in plugin_store.installed(home)
    assert plugin_store.read_pin(home, "acme-sched", "1.0.0") is None
    # the next rollback undoes the swap before it (none here but the first-party
    # provisioning, which rollback leaves be)
    with pytest.raises(LughError, match="no install or swap left to undo"):
        busy.request(protocol.RollbackReq(), timeout=TIMEOUT)
    out = cli(home, "uninstall", "edf-scheduler")
    assert "Uninstalled edf-scheduler 1.0.0" in out and "edf-scheduler" not in plugin_store.installed(home)
    wait_completed(busy, 20)
    no_job_lost(busy)


def test_a_failing_swap_rolls_the_install_back(busy, tmp_path):
    home = busy.home
    key = acme_vendor(home)
    publish.publish(local.registry_dir(home), make_wheel(tmp_path / "w", "acme-sick", code=UNHEALTHY), "acme", key,
                    home=home)
    before_files = snapshot(home)
    old = scheduler_of(busy)
    done = busy.request(protocol.InstallReq(name="acme-sick", swap=True), timeout=TIMEOUT)
    assert (done["committed"], done["installed"], done["swap"]["committed"], done["swap"]["step"]) == \
        (False, False, False, "health"), done
    assert "health" in done["reason"]
    assert journal_ops(busy, done["id"]) == ["install.begin", "install.stage", "install.activate", "install.rollback"]
    rollback = [r for r in busy.request(protocol.LogReq())["records"] if r["data"].get("id") == done["id"]][-1]
    assert rollback["data"]["step"] == "swap"
    assert "acme-sick" not in plugin_store.installed(home)
    after = scheduler_of(busy)
    assert (after["plugin"], after["pid"], after["state"]) == ("round-robin-scheduler", old["pid"], "up")
    assert snapshot(home) == before_files
    wait_completed(busy, 20)
    no_job_lost(busy)
    # through the CLI: the same outcome, exit status 1
    result = CliRunner().invoke(app, ["install", "acme-sick", "--swap"], env={"LUGH_HOME": str(home), "COLUMNS": "200"})
    assert result.exit_code == 1 and "Rolled back the install of acme-sick" in result.output


def test_a_plugin_changed_after_installation_is_refused_at_load(busy):
    home = busy.home
    # not in use: swapping to it fails at spawn, with the reason
    edf = plugin_store.locate(home, "edf-scheduler")
    module = edf / "lugh_edf_scheduler" / "plugin.py"
    module.write_text(module.read_text() + "\nimport os  # changed after installation\n")
    result = busy.request(protocol.SwapReq(service="scheduler", plugin="edf"), timeout=TIMEOUT)
    assert (result["committed"], result["step"]) == (False, "spawn")
    assert "modified after installation" in result["reason"]
    # RECORD rewritten to match the change: refused by the pin kept outside the plugin
    record = next(edf.glob("*.dist-info/RECORD"))
    import base64
    import hashlib

    digest = base64.urlsafe_b64encode(hashlib.sha256(module.read_bytes()).digest()).rstrip(b"=").decode()
    record.write_text(re.sub(r"(lugh_edf_scheduler/plugin.py,)sha256=[^,]+", rf"\1sha256={digest}", record.read_text()))
    plugin_store.verify_files(edf)  # the files agree with the rewritten RECORD ...
    with pytest.raises(PluginError, match="RECORD changed after installation"):
        plugin_store.verify_installed(edf)  # ... not with the pin
    listed = {p["name"]: p for p in busy.request(protocol.PluginListReq())["plugins"]}
    assert "RECORD changed after installation" in listed["edf-scheduler"]["integrity"]
    # in use: the restart after a crash refuses it; `lugh status` and the log say why
    rr = plugin_store.locate(home, "round-robin-scheduler")
    target = next(p for p in rr.rglob("plugin.py"))
    target.write_text(target.read_text() + "\n# changed after installation\n")
    victim = scheduler_of(busy)["pid"]
    os.kill(victim, signal.SIGKILL)
    st = busy.wait_for(lambda s: "modified after installation" in scheduler_of_status(s)["last_failure"],
                       timeout=60, what="the refusal in last_failure")
    failure = scheduler_of_status(st)["last_failure"]
    assert "plugin refused" in failure and "plugin.py" in failure, failure
    logs = "".join(p.read_text(errors="replace") for p in (home / "run").glob("scheduler-*.log"))
    assert "modified after installation" in logs
    wait_completed(busy, 20)  # the kernel's fallback keeps dispatching


def scheduler_of_status(st: dict) -> dict:
    return next(s for s in st["services"] if s["name"] == "scheduler")


def test_an_install_cut_short_is_reverted_at_the_next_boot(home, tmp_path):
    from lugh_sdk import firstparty

    firstparty.ensure_installed(home)
    key = acme_vendor(home)
    publish.publish(local.registry_dir(home), make_wheel(tmp_path / "w", "acme-half"), "acme", key, home=home)
    target = install.OfflineTarget(home)
    # what an install leaves when the machine stops right after activation
    staged = tmp_path / "staged"
    staged.mkdir()
    manifest = plugin_store.stage_wheel(make_wheel(tmp_path / "w2", "acme-half"), staged)
    target.journal.append("install.begin", id="cut0short0", name="acme-half", version="1.0.0", swap=False,
                          existing=False)
    target.journal.append("install.activate", id="cut0short0", path="plugins/acme-half/1.0.0")
    plugin_store.activate(home, staged, manifest, source="registry")
    (home / "plugins" / ".staging-cut0short0").mkdir()
    target.close()
    running = boot(home)
    pids = running.pids()
    try:
        records = running.request(protocol.LogReq())["records"]
        mine = [r for r in records if r["data"].get("id") == "cut0short0"]
        assert [r["op"] for r in mine] == ["install.begin", "install.activate", "install.rollback"]
        assert "reverted at boot" in mine[-1]["data"]["reason"]
        assert "acme-half" not in plugin_store.installed(home)
        assert plugin_store.read_pin(home, "acme-half", "1.0.0") is None
        assert not list((home / "plugins").glob(".staging-*"))
        done = running.request(protocol.InstallReq(name="acme-half"), timeout=TIMEOUT)  # and it installs fine
        assert done["installed"]
    finally:
        down_and_check(running, pids)


def test_boot_recovery_rolls_an_install_forward_when_its_swap_committed(tmp_path):
    from kernel.journal import Journal

    home = tmp_path / "home"
    staged = tmp_path / "staged"
    staged.mkdir()
    manifest = plugin_store.stage_wheel(make_wheel(tmp_path / "w", "acme-fwd"), staged)
    journal = Journal(home / "state" / "journal.log")
    journal.append("install.begin", id="fwd", name="acme-fwd", version="1.0.0", swap=True, existing=False)
    journal.append("install.activate", id="fwd", path="plugins/acme-fwd/1.0.0")
    plugin_store.activate(home, staged, manifest, source="registry")
    journal.append("swap.begin", id="sw", service="scheduler", to="acme-fwd==1.0.0")
    journal.append("swap.commit", id="sw", service="scheduler", to="acme-fwd==1.0.0")
    install.recover(home, journal)  # what Kernel.recover runs after the swap recovery
    last = journal.records()[-1]
    assert (last["op"], last["data"]["id"]) == ("install.commit", "fwd") and "rolled forward" in last["data"]["reason"]
    plugin_store.verify_installed(plugin_store.locate(home, "acme-fwd"))  # still there, still pinned
    journal.close()
