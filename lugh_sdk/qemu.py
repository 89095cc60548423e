"""QEMU targets: `lugh up --target NAME` boots a virtual machine (x86_64 or aarch64)
and starts a LughOS kernel inside it, reached over mutual TLS.

What the VM is made of (installed and cached by ``.ci/qemu-setup``, under
``$LUGH_QEMU_CACHE``, default ``~/.cache/lugh-qemu``): Debian's kernel, a busybox
initramfs (``targets/init``) that loads the virtio and 9p modules and mounts the root
over 9p, read-only -- the host's own root for x86_64, an arm64 Python 3.11 sysroot for
aarch64 -- and the source tree. The target's own directory is shared too
(``LUGH_HOME/targets/NAME/guest``: boot settings, the server certificate and a home
prepared on the host with the first-party plugins and the target's own trust root);
the guest copies that home into a tmpfs and runs ``python -m kernel --listen
tls+tcp://0.0.0.0:7447``, which QEMU's user network forwards from
``127.0.0.1:PORT`` on the host. The guest's state lives in RAM: each boot starts
afresh.

KVM is used when it works; otherwise QEMU runs under TCG. /dev/kvm can open, create a
VM and still never run one (seen under nested virtualisation: QEMU spins a core and the
guest prints nothing), so a KVM guest must print its kernel's banner on the serial
console within ``KVM_ALIVE_S`` or it is stopped and booted again under TCG. A VM that
does not come up gives an error with the tail of its serial console.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from lugh_sdk.errors import LughError

BOOT_TIMEOUT = float(os.environ.get("LUGH_QEMU_BOOT_TIMEOUT", "600"))  # TCG on a busy 2-core machine
GUEST_PORT = 7447
# A KVM guest prints its banner within a second; silence this long: KVM does not run it.
KVM_ALIVE_S = float(os.environ.get("LUGH_QEMU_KVM_ALIVE_S", "15"))
# Under TCG the CPU model decides most of the boot time: with `-cpu max` the guest's
# software uses features that TCG emulates slowly (pointer authentication, computed in
# software, on every function call of Debian's arm64 binaries; on x86_64 most likely
# the wide vector routines glibc selects). `lugh up` to a healthy kernel on 2 busy
# cores: x86_64 151 s with max, 34 s with qemu64; aarch64 381 s with max, 36 s with
# cortex-a72 (ARMv8.0: no pointer authentication). LUGH_QEMU_CPU overrides it.
TCG_CPU = {"x86_64": "qemu64", "aarch64": "cortex-a72"}
# The swap's timeouts inside a guest (kernel/swap.py): its defaults suit a kernel on the
# host, where a new plugin host starts in about a second and answers a step in
# milliseconds. Under TCG on a loaded host both take far longer (at a host load of 23 an
# x86_64 guest's scheduler took over 3 s to import the swap's state), and a swap that
# times out rolls back. Likewise a service's start (kernel/supervisor.py): at a host
# load of 20 a guest's services took more than the 30 s allowed on the host to connect,
# were restarted, and the boot never converged. And the scheduler's ejection
# (kernel/core.py, 0.5 s without a decision): an aarch64 guest's install refused twice
# with "the scheduler service is not running; nothing to swap from" -- most likely the
# scheduler was ejected while the kernel's control thread imported the registry's code
# (the loop then gets the GIL late and reads the scheduler's answers late).
GUEST_KERNEL_ENV = {"LUGH_SWAP_SPAWN_TIMEOUT": "120", "LUGH_SWAP_STEP_TIMEOUT": "30", "LUGH_START_TIMEOUT": "300",
                    "LUGH_EJECT_AFTER": "5"}


def cache_dir() -> Path:
    return Path(os.environ.get("LUGH_QEMU_CACHE") or Path.home() / ".cache" / "lugh-qemu")


def _state(home: Path, name: str) -> Path:
    from lugh_sdk.targets import certs_dir

    return certs_dir(home, name)


def pid_of(home: Path, name: str) -> int | None:
    try:
        pid = int((_state(home, name) / "qemu.pid").read_text().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"qemu-system" not in f.read():
                return None
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split(")")[-1].split()[0] == "Z":
                return None
        return pid
    except (OSError, ValueError):
        return None


def running(home: Path, name: str) -> bool:
    return pid_of(home, name) is not None


def kvm_usable() -> bool:
    """Whether /dev/kvm lets us create a VM (it may exist and still be unusable)."""
    KVM_GET_API_VERSION, KVM_CREATE_VM = 0xAE00, 0xAE01
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if fcntl.ioctl(fd, KVM_GET_API_VERSION, 0) != 12:
            return False
        vm = fcntl.ioctl(fd, KVM_CREATE_VM, 0)
        os.close(vm)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _files(arch: str) -> dict:
    c = cache_dir() / arch
    files = {"kernel": c / "vmlinuz", "initrd": c / "initrd.img"}
    if arch == "aarch64":
        files["root"] = c / "sysroot"
    missing = [str(p) for p in files.values() if not p.exists()]
    binary = f"qemu-system-{arch}"
    if shutil.which(binary) is None:
        missing.append(binary)
    if missing:
        raise LughError(f"the QEMU target files are missing ({', '.join(missing)}): run .ci/qemu-setup first")
    return files


def prepare_guest(home: Path, name: str, entry: dict, workload: str) -> Path:
    """The directory the guest sees as ``/run/target``: boot settings, the server's
    certificate and key, the CA, and the guest's home with its plugins and trust root."""
    from lugh_sdk import firstparty

    d = _state(home, name)
    guest = d / "guest"
    tls = guest / "tls"
    tls.mkdir(parents=True, exist_ok=True)
    os.chmod(guest, 0o700)
    for f in ("ca.pem", "server.pem", "server.key"):
        shutil.copy2(d / f, tls / f)
    # The target's own home, prepared here: its first-party plugins, its own registry and
    # the trust root it verifies every plugin against. The guest copies it into RAM at
    # /run/home, so the registry it trusts is re-pointed there.
    from registry import trust

    prep = d / "home"
    firstparty.ensure_installed(prep)
    guest_home = guest / "home"
    shutil.rmtree(guest_home, ignore_errors=True)
    shutil.copytree(prep, guest_home, symlinks=True, ignore=shutil.ignore_patterns("run", "*.lock"))
    for info in (guest_home / "trust").glob("*/registry.json"):
        data = json.loads(info.read_text())
        if data["url"] == trust.to_url(prep / "registry"):
            data["url"] = trust.to_url("/run/home/registry")
            info.write_text(json.dumps(data, indent=2) + "\n")
    _compile_sources()
    if entry["arch"] == "x86_64":
        python, pythonpath = sys.executable, "/run/src"
    else:
        python, pythonpath = "/usr/bin/python3.11", "/run/src:/opt/lugh-site"
    (guest / "boot.env").write_text(
        f"LUGH_PYTHON='{python}'\nLUGH_PYTHONPATH='{pythonpath}'\nLUGH_WORKLOAD='{workload}'\n"
        f"LUGH_GUEST_PORT='{entry.get('guest_port', GUEST_PORT)}'\n"
        f"LUGH_DEBUG='{os.environ.get('LUGH_QEMU_DEBUG', '')}'\n"
        f"LUGH_KERNEL_ENV='{' '.join(f'{k}={v}' for k, v in GUEST_KERNEL_ENV.items())}'\n"
        # one worker and a slower heartbeat: under TCG every process costs much
        f"LUGH_KERNEL_ARGS='{os.environ.get('LUGH_QEMU_KERNEL_ARGS', '--workers 1 --heartbeat 2')}'\n")
    return guest


def _compile_sources() -> None:
    """The guest reads the source tree read-only: compile it here (the same CPython
    3.11 bytecode for both architectures), or every import compiles under TCG."""
    import compileall

    from lugh_sdk.firstparty import source_root

    root = source_root()
    for sub in ("kernel", "lugh_sdk", "registry"):
        compileall.compile_dir(str(root / sub), quiet=1, workers=1)


def command(home: Path, name: str, entry: dict, accel: str) -> list[str]:
    from lugh_sdk.firstparty import source_root
    from lugh_sdk.targets import parse_address

    arch = entry["arch"]
    files = _files(arch)
    d = _state(home, name)
    _, port = parse_address(entry["address"])
    root = "/" if arch == "x86_64" else str(files["root"])
    share = lambda path, tag: ["-virtfs", f"local,path={path},mount_tag={tag},security_model=none,readonly=on,multidevs=remap"]
    cpu = os.environ.get("LUGH_QEMU_CPU") or ("host" if accel == "kvm" else TCG_CPU[arch])
    if arch == "x86_64":
        machine = ["-machine", "q35", "-cpu", cpu]
        console = "ttyS0"
    else:
        machine = ["-machine", "virt", "-cpu", cpu]
        console = "ttyAMA0"
    return [f"qemu-system-{arch}", *machine, "-accel", accel, "-smp", os.environ.get("LUGH_QEMU_SMP", "2"), "-m", str(entry.get("memory_mb", 1024)),
            "-kernel", str(files["kernel"]), "-initrd", str(files["initrd"]),
            # loglevel 6 shows the banner (a notice) that tells a KVM guest runs; under TCG
            # every console line is slow, so only warnings and worse
            "-append", f"console={console} panic=-1 loglevel={6 if accel == 'kvm' else 4}",
            "-display", "none", "-monitor", "none", "-serial", f"file:{d / 'console.log'}", "-no-reboot",
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:{entry.get('guest_port', GUEST_PORT)}",
            "-device", "virtio-net-pci,netdev=n0",
            *share(root, "root"), *share(source_root(), "src"), *share(d / "guest", "target"),
            "-pidfile", str(d / "qemu.pid")]


def console_tail(home: Path, name: str, lines: int = 25) -> str:
    try:
        text = (_state(home, name) / "console.log").read_text(errors="replace")
    except OSError:
        return "(no serial console output)"
    return "\n".join(text.replace("\r", "").splitlines()[-lines:]) or "(no serial console output)"


def _console_says(home: Path, name: str, text: str) -> bool:
    try:
        return text in (_state(home, name) / "console.log").read_text(errors="replace")
    except OSError:
        return False


def up(home: Path, name: str, entry: dict, workload: str = "none", timeout: float = BOOT_TIMEOUT) -> dict:
    """Boot the VM and return the guest kernel's status once it is healthy."""
    from kernel.remote import READY_LINE
    from lugh_sdk import runtime, targets

    if running(home, name):
        raise LughError(f"target {name!r} is already running (pid {pid_of(home, name)}); nothing changed")
    _files(entry["arch"])
    prepare_guest(home, name, entry, workload)
    d = _state(home, name)
    (d / "console.log").unlink(missing_ok=True)
    accel = os.environ.get("LUGH_QEMU_ACCEL") or ("kvm" if entry["arch"] == os.uname().machine and kvm_usable() else "tcg")
    proc = _start(home, name, entry, accel)
    if accel == "kvm" and not _kvm_guest_alive(home, name, proc):
        _stop(home, name, proc.pid)
        proc = _start(home, name, entry, "tcg")
    deadline = time.monotonic() + timeout
    cli = targets.client(home, name, timeout=5.0)
    last = ["the guest kernel is not listening yet"]

    def check():
        code = proc.poll()
        if code is not None or _console_says(home, name, "lugh-init: FAILED"):
            _stop(home, name, proc.pid)
            raise LughError(f"the QEMU target {name!r} failed to boot (qemu status {code}):\n"
                            + _qemu_log(d) + console_tail(home, name))
        if time.monotonic() > deadline:
            _stop(home, name, proc.pid)
            raise LughError(f"the QEMU target {name!r} did not become healthy within {timeout:g}s "
                            f"(last: {last[0]}); serial console:\n" + console_tail(home, name))

    try:
        while True:
            check()
            if not _console_says(home, name, READY_LINE):  # hostfwd accepts TCP before the guest listens
                time.sleep(0.5)
                continue
            try:  # and only a healthy status counts
                status = cli.request(__import__("kernel.protocol").protocol.StatusReq(), timeout=20.0)
                if runtime.settled(status):
                    return status
                last[0] = "services: " + ", ".join(f"{s['name']} {s['state']}" for s in status["services"])
            except LughError as exc:
                last[0] = str(exc)
                cli.close()
            time.sleep(0.5)
    except BaseException:
        if proc.poll() is None:
            _stop(home, name, proc.pid)
        raise
    finally:
        cli.close()


def _kvm_guest_alive(home: Path, name: str, proc: subprocess.Popen) -> bool:
    """Whether a guest started under KVM runs: its serial console shows the kernel's
    banner (``command`` asks for it under KVM) before ``KVM_ALIVE_S``."""
    deadline = time.monotonic() + KVM_ALIVE_S
    while time.monotonic() < deadline and proc.poll() is None:
        if _console_says(home, name, "Linux version"):
            return True
        time.sleep(0.2)
    return False


def _start(home: Path, name: str, entry: dict, accel: str) -> subprocess.Popen:
    d = _state(home, name)
    (d / "console.log").unlink(missing_ok=True)
    with open(d / "qemu.log", "wb") as log:
        return subprocess.Popen(command(home, name, entry, accel), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)


def _qemu_log(d: Path) -> str:
    try:
        text = (d / "qemu.log").read_text(errors="replace").strip()
    except OSError:
        return ""
    return f"qemu: {text}\n" if text else ""


def down(home: Path, name: str, entry: dict, timeout: float = 60.0) -> bool:
    """Ask the guest kernel to stop (the guest then powers off); QEMU is killed if it
    has not exited in ``timeout`` seconds. True if the VM was running."""
    from kernel import protocol
    from lugh_sdk import targets

    pid = pid_of(home, name)
    if pid is None:
        return False
    try:
        with targets.client(home, name, timeout=10.0) as cli:
            cli.request(protocol.ShutdownReq())
    except LughError:
        pass
    _stop(home, name, pid, timeout)
    return True


def _stop(home: Path, name: str, pid: int, grace: float = 0.0) -> None:
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.2)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _alive(pid):
            break
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            break
        end = time.monotonic() + 5
        while time.monotonic() < end and _alive(pid):
            time.sleep(0.1)
    (_state(home, name) / "qemu.pid").unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:  # our child: alive until reaped (QEMU's main thread is a zombie while its others exit)
        return os.waitpid(pid, os.WNOHANG)[0] != pid
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
