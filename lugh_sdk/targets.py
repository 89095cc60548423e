"""Targets: the kernels `lugh` can act on (`--target NAME`).

- ``local``: the kernel of this machine's LUGH_HOME (ipc control socket);
- a *remote* target (a hardware board, or any kernel started with ``--listen``):
  reached over NNG ``tls+tcp`` with mutual TLS (:mod:`lugh_sdk.tls`);
- a *QEMU* target (x86_64 or aarch64): a virtual machine `lugh up --target` boots
  (:mod:`lugh_sdk.qemu`), reached the same way through QEMU's user-mode port forward.

Targets are stored in ``LUGH_HOME/targets.json``; the certificates of a QEMU target,
and those `lugh target certs` makes, under ``LUGH_HOME/targets/NAME/``.
"""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlsplit

from lugh_sdk.errors import LughError, NotRunning

LOCAL = "local"
NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
ARCHES = ("x86_64", "aarch64")


def store_path(home: Path) -> Path:
    return home / "targets.json"


def certs_dir(home: Path, name: str) -> Path:
    return home / "targets" / name


def load(home: Path) -> dict:
    try:
        return json.loads(store_path(home).read_text())
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise LughError(f"{store_path(home)} is not valid JSON: {exc}") from None


def _save(home: Path, targets: dict) -> None:
    home.mkdir(parents=True, exist_ok=True)
    tmp = store_path(home).with_suffix(".tmp")
    tmp.write_text(json.dumps(targets, indent=2, sort_keys=True))
    os.replace(tmp, store_path(home))


def parse_address(address: str) -> tuple[str, int]:
    parts = urlsplit(address)
    if parts.scheme != "tls+tcp" or not parts.hostname or not parts.port:
        raise LughError(f"address {address!r}: give tls+tcp://HOST:PORT (the control channel is mutual TLS)")
    return parts.hostname, parts.port


def _check_name(name: str, targets: dict) -> None:
    if name == LOCAL or not NAME_RE.match(name):
        raise LughError(f"target name {name!r}: use lowercase letters, digits, - and _ (and not 'local')")
    if name in targets:
        raise LughError(f"target {name!r} already exists (remove it with `lugh target rm {name}`)")


def add_remote(home: Path, name: str, address: str, ca: Path, cert: Path, key: Path) -> dict:
    targets = load(home)
    _check_name(name, targets)
    parse_address(address)
    for what, path in (("--ca", ca), ("--cert", cert), ("--key", key)):
        if not Path(path).is_file():
            raise LughError(f"{what} {path}: no such file")
    entry = {"kind": "remote", "address": address, "ca": str(Path(ca).resolve()),
             "cert": str(Path(cert).resolve()), "key": str(Path(key).resolve())}
    targets[name] = entry
    _save(home, targets)
    return entry


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_qemu(home: Path, name: str, arch: str, port: int | None = None, memory_mb: int = 1024) -> dict:
    from lugh_sdk import tls

    targets = load(home)
    _check_name(name, targets)
    if arch not in ARCHES:
        raise LughError(f"--qemu {arch}: choose x86_64 or aarch64")
    d = certs_dir(home, name)
    tls.make_target_certs(d, name)
    port = port or free_port()
    entry = {"kind": "qemu", "arch": arch, "address": f"tls+tcp://127.0.0.1:{port}", "guest_port": 7447,
             "memory_mb": memory_mb, "ca": str(d / "ca.pem"), "cert": str(d / "client.pem"),
             "key": str(d / "client.key"), "tls_dir": str(d)}
    targets[name] = entry
    _save(home, targets)
    return entry


def remove(home: Path, name: str) -> None:
    targets = load(home)
    if name not in targets:
        raise LughError(f"unknown target {name!r}")
    entry = targets.pop(name)
    if entry["kind"] == "qemu":
        from lugh_sdk import qemu

        if qemu.running(home, name):
            raise LughError(f"target {name!r} is running: stop it first with `lugh down --target {name}`")
    _save(home, targets)
    if entry["kind"] == "qemu":  # its certificates and files were made by `target add`
        import shutil

        shutil.rmtree(certs_dir(home, name), ignore_errors=True)


def get(home: Path, name: str) -> dict:
    targets = load(home)
    if name not in targets:
        known = ", ".join([LOCAL, *sorted(targets)])
        raise LughError(f"unknown target {name!r} (known: {known}; add one with `lugh target add`)")
    return targets[name]


def client(home: Path, name: str, timeout: float = 30.0):
    """A client with ``request(req, timeout=None)`` for the named target."""
    if name == LOCAL:
        from lugh_sdk.client import KernelClient

        return KernelClient(home, timeout=timeout)
    entry = get(home, name)
    return RemoteClient(name, entry["address"], Path(entry["ca"]), Path(entry["cert"]), Path(entry["key"]),
                        timeout=timeout)


def check_own_certificate(ca: Path, cert: Path, key: Path) -> None:
    """Say clearly, before any handshake, what is wrong with our own certificate."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        ca_cert = x509.load_pem_x509_certificate(Path(ca).read_bytes())
        own = x509.load_pem_x509_certificate(Path(cert).read_bytes())
        own_key = serialization.load_pem_private_key(Path(key).read_bytes(), None)
    except (OSError, ValueError) as exc:
        raise LughError(f"cannot read the target's certificates: {exc}") from None
    now = dt.datetime.now(dt.timezone.utc)
    if own.not_valid_after_utc < now:
        raise LughError(f"the client certificate {cert} expired on {own.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if own.not_valid_before_utc > now:
        raise LughError(f"the client certificate {cert} is not valid before {own.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    try:
        own.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, Exception) as exc:  # InvalidSignature and friends
        raise LughError(f"the client certificate {cert} was not issued by the target's CA {ca} ({type(exc).__name__})") from None
    if own.public_key().public_numbers() != own_key.public_key().public_numbers():
        raise LughError(f"the key {key} does not belong to the certificate {cert}")


def _kernel_client():
    from lugh_sdk.client import KernelClient

    return KernelClient


class RemoteClient(_kernel_client()):
    """The control channel of a remote kernel over mutual TLS: a
    :class:`lugh_sdk.client.KernelClient` (same ``request``) that dials ``tls+tcp``."""

    def __init__(self, name: str, address: str, ca: Path, cert: Path | None, key: Path | None,
                 timeout: float = 30.0, connect_timeout: float = 5.0):
        self.home = None
        self.name = name
        self.address = address
        self.ca, self.cert, self.key = ca, cert, key
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._sock = None

    def _socket(self):
        import pynng

        from kernel import protocol
        from lugh_sdk.tls import tls_config

        if self._sock is not None:
            return self._sock
        host, port = parse_address(self.address)
        if self.cert is not None:
            check_own_certificate(self.ca, self.cert, self.key)
        try:  # NNG would retry forever: find out first whether anything listens
            socket.create_connection((host, port), timeout=self.connect_timeout).close()
        except OSError as exc:
            raise NotRunning(f"target {self.name!r} at {self.address} is unreachable: "
                             f"{exc.strerror or exc}") from None
        cfg = tls_config("client", self.ca, self.cert, self.key, server_name=host)
        sock = pynng.Req0(tls_config=cfg, recv_timeout=int(self.timeout * 1000), send_timeout=5000)
        sock.recv_max_size = protocol.MAX_MESSAGE_BYTES * 16
        # NNG's Req0 sends a request again after 60 s without a reply: a slow install on a
        # TCG guest would then run twice (the second is refused as "in progress")
        sock.resend_time = -1
        try:
            sock.dial(self.address, block=True)
        except pynng.CryptoError:
            sock.close()
            raise LughError(f"target {self.name!r} at {self.address}: the mutual TLS handshake failed (the target "
                            f"refused our certificate, or its certificate is not signed by our CA {self.ca})") from None
        except pynng.NNGException as exc:
            sock.close()
            raise NotRunning(f"target {self.name!r} at {self.address} is unreachable: {exc}") from None
        self._sock = sock
        return sock


def up(home: Path, name: str, workload: str = "none") -> dict:
    entry = get(home, name)
    if entry["kind"] == "qemu":
        from lugh_sdk import qemu

        return qemu.up(home, name, entry, workload=workload)
    raise LughError(f"target {name!r} is a board reached at {entry['address']}: start its kernel on the board "
                    f"(python -m kernel --home DIR --listen tls+tcp://0.0.0.0:PORT --tls-dir DIR)")


def down(home: Path, name: str) -> bool:
    from kernel import protocol

    entry = get(home, name)
    if entry["kind"] == "qemu":
        from lugh_sdk import qemu

        return qemu.down(home, name, entry)
    with client(home, name, timeout=10.0) as cli:
        cli.request(protocol.ShutdownReq())
    return True
