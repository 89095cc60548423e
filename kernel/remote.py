"""The control channel over the network: NNG ``tls+tcp`` with mutual TLS.

``python -m kernel --listen tls+tcp://HOST:PORT --tls-dir DIR`` serves the same
requests as the local control socket (:class:`kernel.control.ControlServer`, same
handlers, same schema checks) on a second Rep0 socket, with the server certificate
``DIR/server.pem`` (+ ``server.key``), and requires a client certificate signed by the
CA in ``DIR/ca.pem``: a peer without one fails the TLS handshake and never reaches a
handler. Certificates are ECDSA P-256 (:mod:`lugh_sdk.tls`).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pynng

from kernel import protocol
from kernel.control import THREADS, ControlServer

READY_LINE = "lugh-kernel-ready"


def server_tls(tls_dir: Path):
    from lugh_sdk.tls import tls_config

    for name in ("ca.pem", "server.pem", "server.key"):
        if not (tls_dir / name).is_file():
            raise SystemExit(f"--tls-dir {tls_dir}: {name} is missing (make them with `lugh target certs`)")
    return tls_config("server", tls_dir / "ca.pem", tls_dir / "server.pem", tls_dir / "server.key")


class RemoteControlServer(ControlServer):
    """The control channel on ``tls+tcp://``: mutual TLS, then the local handlers."""

    def __init__(self, kernel, address: str, tls_dir: Path):
        if not address.startswith("tls+tcp://"):
            raise SystemExit(f"--listen {address}: only tls+tcp://HOST:PORT is served (mutual TLS)")
        self.kernel = kernel
        self.address = address
        self.sock = pynng.Rep0(tls_config=server_tls(Path(tls_dir)))
        self.sock.recv_max_size = protocol.MAX_MESSAGE_BYTES
        self.sock.send_timeout = 2000
        self.sock.listen(address)
        # a QEMU target's host dials only after this line: QEMU's port forward accepts TCP
        # before the guest listens, and NNG's TLS dial then waits without a timeout
        print(f"{READY_LINE} {address}", flush=True)
        self.sock.recv_timeout = 200
        self.closing = False
        self.threads = [threading.Thread(target=self._serve, name=f"remote-control-{i}", daemon=True)
                        for i in range(THREADS)]
        for t in self.threads:
            t.start()
