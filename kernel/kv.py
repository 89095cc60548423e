"""The kernel's own requests to the storage service, for the control channel (`lugh kv`)
and the live swap: each is one message on the HIGH lane (control traffic), answered by
a ``KvResult`` that the loop routes back here by its ``ctl:<req>`` origin.

Writes and administration (``KV_STREAMED``) go through the storage stream, so they are
ordered with every client's writes and replayed if the service restarts; reads go to
the running instance directly, and fail at once if it exits.

These functions run in a control thread, never on the loop thread.
"""

from __future__ import annotations

from concurrent.futures import Future

import msgspec

from kernel import protocol
from kernel.protocol import Lane

TIMEOUT = 30.0


class StorageUnavailable(ValueError):
    """The storage service cannot take the request now; the message says why."""


def request(kernel, msg, timeout: float = TIMEOUT) -> protocol.KvResult:
    """Send ``msg`` (its req and origin are set here) and wait for the result; raises
    StorageUnavailable, or ValueError with the storage's own error."""
    def send() -> Future:
        storage = kernel.services["storage"]
        refusal = kernel.sup.kv_refusal(storage, msg)  # safe mode: writes refused, reads while possible
        if refusal:
            raise StorageUnavailable(refusal)
        rid = kernel.next_req()
        msg2 = msgspec.structs.replace(msg, req=rid, origin=f"ctl:{rid}")
        fut: Future = Future()
        if isinstance(msg2, protocol.KV_STREAMED):
            kernel.requests[rid] = (fut, None)  # waits in the replay log while storage restarts
            kernel._stream("storage", msg2, Lane.HIGH)
        else:
            kernel.requests[rid] = (fut, None)  # parked while storage restarts; sent again if it dies first
            kernel.sup.forward(storage, msg2, Lane.HIGH)
        return fut

    fut = kernel.call(send).result(TIMEOUT)
    try:
        result = fut.result(timeout)
    except TimeoutError:
        raise StorageUnavailable(f"the storage service did not answer within {timeout:g} s") from None
    except RuntimeError as exc:  # the instance exited with the request
        raise StorageUnavailable(f"storage: {exc}") from None
    if not result.ok:
        raise ValueError(result.error)
    return result


def last_commit(kernel, timeout: float = 2.0) -> int | None:
    """The storage's last commit sequence number, or None if it cannot say now: the
    marker a swap or install journals before it begins, so `lugh kv rollback` can
    return the data to what it was before the operation."""
    try:
        return request(kernel, protocol.KvInfo(req=0, what="stats"), timeout).info.get("last_seq")
    except ValueError:
        return None
