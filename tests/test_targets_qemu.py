"""QEMU targets, end to end: boot an x86_64 and an aarch64 virtual machine with a LughOS
kernel inside (`lugh up --target`), install and swap to edf-scheduler over mutual TLS
(`lugh install edf-scheduler --swap --target`), check that the swap committed and that
the guest reports its own architecture, and shut down cleanly (`lugh down --target`).

They need what `.ci/qemu-setup` installs and caches. Without it they are skipped, unless
LUGH_REQUIRE_QEMU=1 (which `.ci/run` sets): then a missing setup fails them. One boot
per architecture serves all the tests of that architecture (a module-scoped fixture):
under TCG on 2 cores a boot takes 35 s to 2 minutes (the whole module: 4 minutes at a
host load of 5), and several times that on a host loaded by other work.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
from typer.testing import CliRunner

from lugh_sdk import qemu, targets
from lugh_sdk.cli import app
from lugh_sdk.errors import LughError

pytestmark = pytest.mark.timeout(900)


def _require(arch: str) -> None:
    try:
        qemu._files(arch)
    except LughError as exc:
        if os.environ.get("LUGH_REQUIRE_QEMU") == "1":
            pytest.fail(f"LUGH_REQUIRE_QEMU=1 and the QEMU targets are not set up: {exc}")
        pytest.skip(f"QEMU targets are not set up ({exc}); run `bash .ci/qemu-setup`")


def _lugh(home, *args):
    return CliRunner().invoke(app, list(args), env={"LUGH_HOME": str(home)})


class VM:
    """One QEMU target of one architecture, booted on first use by `lugh up --target`
    (again if a test stopped it: the tests do not depend on their order)."""

    def __init__(self, home, arch: str):
        self.home, self.arch = home, arch

    def up(self) -> "VM":
        if not qemu.running(self.home, "vm"):
            r = _lugh(self.home, "up", "--target", "vm")
            assert r.exit_code == 0, f"{r.output}\n{r.exception!r}"
        return self

    def settled(self, timeout: float = 300) -> dict:
        """Every service up: under TCG on a loaded host the guest's supervisor may be
        restarting one (the scheduler is ejected after 0.5 s without a decision)."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.json("status")
            if all(s["state"] == "up" for s in status["services"]) or time.monotonic() > deadline:
                return status
            time.sleep(2)

    def json(self, *args) -> dict:
        r = _lugh(self.home, *args, "--target", "vm", "--json")
        assert r.exit_code == 0, f"lugh {' '.join(args)}: {r.output}\n{r.exception!r}"
        return json.loads(r.output)


@pytest.fixture(scope="module", params=["x86_64", "aarch64"])
def vm(request, tmp_path_factory):
    arch = request.param
    _require(arch)
    home = tmp_path_factory.mktemp(f"qemu-{arch}")
    r = _lugh(home, "target", "add", "vm", "--qemu", arch)
    assert r.exit_code == 0, r.output
    machine = VM(home, arch)
    try:
        yield machine
    finally:
        _lugh(home, "down", "--target", "vm")
        assert not qemu.running(home, "vm"), "the VM was left running"
        # `target rm` deletes the target's files: keep the serial console for a post-mortem
        console = targets.certs_dir(home, "vm") / "console.log"
        if console.exists():
            shutil.copy2(console, home / "console.log")
        assert _lugh(home, "target", "rm", "vm").exit_code == 0


def test_guest_reports_its_architecture(vm):
    status = vm.up().settled()
    assert status["kernel"]["machine"] == vm.arch, status["kernel"]  # platform.machine() inside the guest
    assert all(s["state"] == "up" for s in status["services"]), status["services"]


def test_install_swap_commits_in_the_guest(vm):
    vm.up().settled()
    # first-party plugins come preinstalled in the guest's home: remove edf-scheduler so
    # that the guest really downloads, verifies (its own trust root) and installs it
    r = _lugh(vm.home, "uninstall", "edf-scheduler", "--target", "vm")
    assert r.exit_code == 0, r.output
    data = vm.json("install", "edf-scheduler", "--swap")
    assert data["installed"] and data["committed"], data
    assert data["swap"]["committed"] and data["swap"]["plugin"].startswith("edf-scheduler"), data["swap"]
    status = vm.json("status")
    sched = next(s for s in status["services"] if s["name"] == "scheduler")
    assert sched["plugin"] == "edf-scheduler" and sched["state"] == "up", sched
    ops = [r["op"] for r in vm.json("log")["records"]]
    assert "swap.commit" in ops and "install.commit" in ops, ops


def test_clean_shutdown(vm):
    vm.up()
    pid = qemu.pid_of(vm.home, "vm")
    r = _lugh(vm.home, "down", "--target", "vm")
    assert r.exit_code == 0 and "Stopped." in r.output, r.output
    assert not qemu.running(vm.home, "vm")
    # the guest powered itself off after its kernel stopped: QEMU was not killed
    console = qemu.console_tail(vm.home, "vm", 50)
    assert "lugh-init: kernel stopped; powering off" in console, console
    assert not os.path.exists(f"/proc/{pid}"), f"QEMU {pid} is still there"


def test_qemu_boot_failure_shows_the_console(home, monkeypatch):
    _require("x86_64")
    targets.add_qemu(home, "bad", "x86_64")
    # a guest whose root cannot be mounted: init says why on the serial console, powers off
    real = qemu.command

    def broken(*a, **kw):
        cmd = real(*a, **kw)
        return [c.replace("mount_tag=root,", "mount_tag=nothere,") for c in cmd]

    monkeypatch.setattr(qemu, "command", broken)
    with pytest.raises(LughError, match="failed to boot") as err:
        qemu.up(home, "bad", targets.get(home, "bad"), timeout=240)
    assert "lugh-init: FAILED: mount of the 9p root" in str(err.value)
    assert not qemu.running(home, "bad")
