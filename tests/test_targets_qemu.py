"""QEMU targets, end to end: boot an x86_64 and an aarch64 virtual machine with a LughOS
kernel inside (`lugh up --target`), install and swap to edf-scheduler over mutual TLS
(`lugh install edf-scheduler --swap --target`), check that the swap committed and that
the guest reports its own architecture, and shut down cleanly (`lugh down --target`).

They need the files `.ci/qemu-setup` installs, and they are opt-in: set
LUGH_QEMU_TESTS=1. They are not yet part of CI: each boot takes minutes under TCG on a
2-core machine (no usable KVM), and the install-and-swap step has not yet committed
inside a VM on a loaded machine (see the targets issue's closing note). With the
variable set, a missing setup fails rather than skips.
"""

from __future__ import annotations

import os
import time

import pytest
from typer.testing import CliRunner

from kernel import protocol
from lugh_sdk import qemu, targets
from lugh_sdk.cli import app
from lugh_sdk.errors import LughError

pytestmark = pytest.mark.timeout(1500)


def _ready(arch: str) -> str | None:
    try:
        qemu._files(arch)
    except LughError as exc:
        return str(exc)
    return None


def _require(arch: str) -> None:
    if os.environ.get("LUGH_QEMU_TESTS") != "1":
        pytest.skip("QEMU target tests are opt-in: run .ci/qemu-setup, then set LUGH_QEMU_TESTS=1")
    why = _ready(arch)
    if why is not None:
        pytest.fail(f"QEMU targets are not set up: {why}")


def _lugh(home, *args):
    return CliRunner().invoke(app, list(args), env={"LUGH_HOME": str(home)})


def _has_install_command() -> bool:
    return any(getattr(c, "name", None) == "install" or (c.callback and c.callback.__name__ == "install")
               for c in app.registered_commands)


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_qemu_target_install_swap(home, arch):
    _require(arch)
    r = _lugh(home, "target", "add", "vm", "--qemu", arch)
    assert r.exit_code == 0, r.output
    started = time.monotonic()
    try:
        r = _lugh(home, "up", "--target", "vm")
        assert r.exit_code == 0, f"{r.output}\n{r.exception!r}"
        boot_s = time.monotonic() - started
        with targets.client(home, "vm", timeout=60) as cli:
            st = cli.request(protocol.StatusReq())
            assert st["kernel"]["machine"] == arch, st["kernel"]
            assert all(s["state"] == "up" for s in st["services"]), st["services"]
        if _has_install_command():
            r = _lugh(home, "install", "edf-scheduler", "--swap", "--target", "vm")
            assert r.exit_code == 0, f"{r.output}\n{r.exception!r}"
        else:  # issue 3's CLI command is not there yet: the same request it sends
            with targets.client(home, "vm", timeout=300) as cli:
                cli.request(protocol.InstallReq(name="edf-scheduler", swap=True), timeout=300)
        with targets.client(home, "vm", timeout=60) as cli:
            sched = next(s for s in cli.request(protocol.StatusReq())["services"] if s["name"] == "scheduler")
            assert sched["plugin"] == "edf-scheduler" and sched["state"] == "up", sched
            kinds = [r["op"] for r in cli.request(protocol.LogReq(limit=0))["records"]]
            assert "swap.commit" in kinds, kinds
        print(f"{arch}: healthy {boot_s:.1f}s after `lugh up --target`")
    finally:
        r = _lugh(home, "down", "--target", "vm")
        assert not qemu.running(home, "vm"), "the VM was left running"
    assert r.exit_code == 0 and "Stopped." in r.output, r.output
    # down powered the guest off: QEMU exited by itself, and the target can be removed
    assert _lugh(home, "target", "rm", "vm").exit_code == 0


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
    assert "lugh-init" in str(err.value)
    assert not qemu.running(home, "bad")
