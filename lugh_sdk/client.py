"""The client of a running kernel's control channel (what the CLI and tests use)."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pynng

from kernel import paths, protocol


from lugh_sdk.errors import LughError, NotRunning  # noqa: F401  (re-exported)


class KernelClient:
    def __init__(self, home: Path, timeout: float = 30.0):
        self.home = home
        run = home / "run"
        self.address = paths.control_address(run.resolve() if run.exists() else run)
        self.timeout = timeout
        self._sock = None

    def _socket(self) -> pynng.Req0:
        if self._sock is None:
            sock = pynng.Req0(recv_timeout=int(self.timeout * 1000), send_timeout=2000)
            sock.recv_max_size = protocol.MAX_MESSAGE_BYTES * 16
            try:
                sock.dial(self.address, block=True)
            except pynng.NNGException:
                sock.close()
                raise NotRunning(f"no kernel is running for {self.home} (start one with `lugh up`)") from None
            self._sock = sock
        return self._sock

    def request(self, req, timeout: float | None = None) -> dict:
        sock = self._socket()
        if timeout is not None:
            sock.recv_timeout = int(timeout * 1000)
        try:
            sock.send(protocol.encode(req))
            reply = protocol.decode_reply(sock.recv())
        except pynng.Timeout:
            self.close()
            raise LughError("the kernel did not answer in time") from None
        except pynng.NNGException as exc:
            self.close()
            raise NotRunning(f"lost the kernel at {self.address}: {exc}") from None
        except msgspec.MsgspecError as exc:
            raise LughError(f"the kernel sent a malformed reply: {exc}") from None
        if isinstance(reply, protocol.ErrorReply):
            raise LughError(reply.error)
        return reply.data

    def is_running(self) -> bool:
        try:
            self.request(protocol.StatusReq(), timeout=2.0)
            return True
        except LughError:
            return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def attach(client: KernelClient, name: str):
    """Attach to the kernel's lanes as an external client; returns a connected
    :class:`kernel.ipc.PeerLink` (close it, then ``detach``)."""
    from kernel.ipc import PeerLink

    grant = client.request(protocol.AttachReq(name=name))
    return PeerLink(Path(grant["run_dir"]), grant["peer"], grant["token"])


def detach(client: KernelClient, link) -> None:
    link.close()
    client.request(protocol.DetachReq(peer=link.peer))
