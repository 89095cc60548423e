"""Remote targets over mutual TLS, on loopback: a kernel serving its control channel on
tls+tcp answers a client with a valid certificate, and refuses one without a
certificate, with a certificate from another CA, or with an expired one; the CLI's
`lugh target` commands and `--target` errors."""

from __future__ import annotations

import datetime as dt
import os
import stat
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from typer.testing import CliRunner

from kernel import protocol
from lugh_sdk import qemu, runtime, targets, tls
from lugh_sdk.cli import app
from lugh_sdk.errors import LughError, NotRunning

from conftest import Running, pids_alive, processes_of


@pytest.fixture
def certs(tmp_path):
    return tls.make_target_certs(tmp_path / "certs", "t1")


@pytest.fixture
def remote_kernel(home, certs):
    port = targets.free_port()
    address = f"tls+tcp://127.0.0.1:{port}"
    runtime.up(home, workload="none", kernel_args=["--listen", address, "--tls-dir", str(certs["ca.pem"].parent)])
    running = Running(home)
    pids = running.pids()
    try:
        yield address
    finally:
        running.client.close()
        runtime.down(home)
        assert pids_alive(pids) == [] and processes_of(home) == []


def _client(address, certs, cert="client.pem", key="client.key", ca="ca.pem"):
    d = certs["ca.pem"].parent
    return targets.RemoteClient("t1", address, d / ca, cert and d / cert, key and d / key, timeout=10)


def test_certs_are_p256_and_keys_private(certs):
    for name in ("ca.key", "server.key", "client.key"):
        assert stat.S_IMODE(os.stat(certs[name]).st_mode) == 0o600
        key = serialization.load_pem_private_key(certs[name].read_bytes(), None)
        assert key.curve.name == "secp256r1"
    server = x509.load_pem_x509_certificate(certs["server.pem"].read_bytes())
    ca = x509.load_pem_x509_certificate(certs["ca.pem"].read_bytes())
    server.verify_directly_issued_by(ca)


def test_valid_client_is_answered(remote_kernel, certs, home):
    with _client(remote_kernel, certs) as cli:
        st = cli.request(protocol.StatusReq())
        assert st["kernel"]["home"] == str(home)
        assert st["kernel"]["machine"]
        assert cli.request(protocol.TaskListReq())["tasks"] == []


def test_client_without_certificate_is_refused(remote_kernel, certs):
    with pytest.raises(LughError, match="mutual TLS handshake failed"):
        with _client(remote_kernel, certs, cert=None, key=None) as cli:
            cli.request(protocol.StatusReq())


def test_certificate_from_another_ca_is_refused(remote_kernel, certs, tmp_path):
    other = tls.make_target_certs(tmp_path / "other", "other")
    # locally: our check says so before any handshake
    cli = targets.RemoteClient("t1", remote_kernel, certs["ca.pem"], other["client.pem"], other["client.key"])
    with pytest.raises(LughError, match="not issued by the target's CA"):
        cli.request(protocol.StatusReq())
    # and the target itself refuses it (the handshake, without our local check)
    cli = targets.RemoteClient("t1", remote_kernel, other["ca.pem"], other["client.pem"], other["client.key"])
    with pytest.raises(LughError, match="mutual TLS handshake failed"):
        cli.request(protocol.StatusReq())


def test_expired_certificate_is_refused(remote_kernel, certs, tmp_path, monkeypatch):
    ca_key = serialization.load_pem_private_key(certs["ca.key"].read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(certs["ca.pem"].read_bytes())
    now = dt.datetime.now(dt.timezone.utc)
    key, cert = tls.issue(ca_key, ca_cert, "old", server=False, not_before=now - dt.timedelta(days=10),
                          not_after=now - dt.timedelta(days=1))
    tls._write_key(tmp_path / "old.key", key)
    tls._write_cert(tmp_path / "old.pem", cert)
    cli = targets.RemoteClient("t1", remote_kernel, certs["ca.pem"], tmp_path / "old.pem", tmp_path / "old.key")
    with pytest.raises(LughError, match="expired"):
        cli.request(protocol.StatusReq())
    # the target refuses it too, when our own check is skipped
    monkeypatch.setattr(targets, "check_own_certificate", lambda *a: None)
    with pytest.raises(LughError, match="mutual TLS handshake failed"):
        cli.request(protocol.StatusReq())


def test_unreachable_address(certs):
    port = targets.free_port()  # nothing listens there
    cli = targets.RemoteClient("t1", f"tls+tcp://127.0.0.1:{port}", certs["ca.pem"], certs["client.pem"],
                               certs["client.key"])
    with pytest.raises(NotRunning, match="unreachable"):
        cli.request(protocol.StatusReq())


def _lugh(home, *args):
    result = CliRunner().invoke(app, [*args], env={"LUGH_HOME": str(home)})
    return result


def test_cli_targets_and_errors(remote_kernel, certs, home):
    d = certs["ca.pem"].parent
    r = _lugh(home, "target", "add", "board", "--address", remote_kernel, "--ca", str(d / "ca.pem"),
              "--cert", str(d / "client.pem"), "--key", str(d / "client.key"))
    assert r.exit_code == 0, r.output
    r = _lugh(home, "target", "list")
    assert "board" in r.output and remote_kernel in r.output
    r = _lugh(home, "status", "--target", "board", "--json")
    assert r.exit_code == 0, r.output
    assert '"machine"' in r.output
    r = _lugh(home, "task", "add", "t", "--period", "50", "--target", "board")
    assert r.exit_code == 0, r.output
    r = _lugh(home, "task", "list", "--target", "board", "--json")
    assert '"t"' in r.output
    r = _lugh(home, "log", "--target", "board", "--json")
    assert r.exit_code == 0, r.output
    # errors: unknown target, duplicate, bad address
    with pytest.raises(LughError, match="unknown target 'nope'"):
        targets.client(home, "nope")
    with pytest.raises(LughError, match="already exists"):
        targets.add_remote(home, "board", remote_kernel, d / "ca.pem", d / "client.pem", d / "client.key")
    with pytest.raises(LughError, match="tls\\+tcp://HOST:PORT"):
        targets.add_remote(home, "b2", "tcp://127.0.0.1:1", d / "ca.pem", d / "client.pem", d / "client.key")
    r = _lugh(home, "target", "rm", "board")
    assert r.exit_code == 0, r.output
    assert "board" not in targets.load(home)


def test_certs_command(home, tmp_path):
    r = _lugh(home, "target", "certs", "b1", "--out", str(tmp_path / "c"))
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == sorted(tls.FILES)


def test_cli_errors_are_one_clear_line(home, certs, tmp_path, monkeypatch):
    """What a user sees from the `lugh` command: an error line and exit status 1, no traceback."""
    def fails(*args, says):
        r = subprocess.run([sys.executable, "-m", "lugh_sdk", *args], capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, LUGH_HOME=str(home)))
        assert r.returncode == 1, r
        assert says in r.stderr + r.stdout and "Traceback" not in r.stderr, r

    fails("status", "--target", "nope", says="unknown target 'nope'")
    d = certs["ca.pem"].parent
    port = targets.free_port()  # nothing listens there
    assert _lugh(home, "target", "add", "gone", "--address", f"tls+tcp://127.0.0.1:{port}", "--ca", str(d / "ca.pem"),
                 "--cert", str(d / "client.pem"), "--key", str(d / "client.key")).exit_code == 0
    fails("status", "--target", "gone", says="is unreachable")
    # a QEMU target whose files .ci/qemu-setup has not made: said before anything starts
    monkeypatch.setenv("LUGH_QEMU_CACHE", str(tmp_path / "empty-cache"))
    assert _lugh(home, "target", "add", "vm", "--qemu", "x86_64").exit_code == 0
    fails("up", "--target", "vm", says="run .ci/qemu-setup first")
    assert not qemu.running(home, "vm")
