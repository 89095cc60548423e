"""The control channel: the CLI's requests to a running kernel.

A Rep0 socket at ``<run>/control`` (mode 0600, so only the kernel's owner can talk to
it), served by a few threads, each with its own NNG context, so that a long request (a
live swap) does not block `lugh status`. Requests and replies are schema-checked
(:mod:`kernel.protocol`); a bad request is answered with an error and counted.
Every handler hands its work to the kernel loop (``Kernel.call``) and waits.
"""

from __future__ import annotations

import threading
import time
import uuid

import msgspec
import pynng

from kernel import ipc, kv, paths, protocol
from kernel.journal import write_atomically
from kernel.swap import SwapError, run_swap
from kernel.plugin_store import PluginError

THREADS = 4
CALL_TIMEOUT = 30.0


class ControlServer:
    def __init__(self, kernel, run_dir):
        self.kernel = kernel
        self.sock = ipc.listen(pynng.Rep0, paths.control_address(run_dir))
        self.sock.recv_timeout = 200
        self.closing = False
        self.threads = [threading.Thread(target=self._serve, name=f"control-{i}", daemon=True) for i in range(THREADS)]
        for t in self.threads:
            t.start()

    def close(self) -> None:
        self.closing = True
        for t in self.threads:
            t.join(2)
        self.sock.close()

    def _serve(self) -> None:
        ctx = self.sock.new_context()
        while not self.closing:
            try:
                data = ctx.recv()
            except pynng.Timeout:
                continue
            except pynng.NNGException:
                return
            reply = self.answer(data)
            try:
                ctx.send(protocol.encode(reply))
            except pynng.NNGException:
                pass

    def answer(self, data: bytes):
        kernel = self.kernel
        try:
            req = protocol.decode_request(data)
        except msgspec.MsgspecError as exc:
            kernel.counters["bad_control_requests"] += 1
            return protocol.ErrorReply(error=f"malformed request: {exc}")
        try:
            return protocol.OkReply(data=self._dispatch(req))
        except (ValueError, KeyError, SwapError, PluginError, TimeoutError) as exc:
            return protocol.ErrorReply(error=_say(exc))
        except Exception as exc:
            kernel.counters["control_errors"] += 1
            return protocol.ErrorReply(error=f"internal error: {type(exc).__name__}: {exc}")

    def _dispatch(self, req) -> dict:
        kernel = self.kernel
        call = lambda fn, *a: kernel.call(fn, *a).result(CALL_TIMEOUT)
        if isinstance(req, protocol.StatusReq):
            return call(kernel.status)
        if isinstance(req, protocol.TaskListReq):
            return {"tasks": call(kernel.task_list), "recent": call(lambda: list(kernel.table.recent))}
        if isinstance(req, protocol.TaskAddReq):
            call(kernel.add_task, req.task)
            self._save_tasks()
            return {"added": req.task.name}
        if isinstance(req, protocol.TaskRemoveReq):
            dropped = call(kernel.remove_task, req.name)
            self._save_tasks()
            return {"removed": req.name, "queued_jobs_dropped": dropped}
        if isinstance(req, protocol.SwapReq):
            return run_swap(kernel, req.service, req.plugin, req.health_window_ms / 1000.0)
        if isinstance(req, protocol.LogReq):
            return {"records": kernel.journal.records(req.limit), "problems": kernel.journal.problems}
        if isinstance(req, protocol.PingServiceReq):
            return self._ping(req)
        if isinstance(req, (protocol.KvReq, protocol.KvScanReq, protocol.KvHistoryReq, protocol.KvStatsReq,
                            protocol.KvRollbackReq, protocol.KvCompactReq)):
            return self._kv(req)
        if isinstance(req, protocol.AttachReq):
            return call(kernel.attach_client, req.name)
        if isinstance(req, protocol.DetachReq):
            call(kernel.detach_client, req.peer).result(CALL_TIMEOUT)  # its endpoints gone, then the answer
            return {"detached": req.peer}
        if isinstance(req, protocol.FaultReq):  # `lugh chaos`
            return call(kernel.sup.inject, req.service, req.fault)
        if isinstance(req, protocol.ServiceRestartReq):  # `lugh restart`
            return call(kernel.sup.operator_restart, req.service)
        if isinstance(req, protocol.ShutdownReq):
            kernel.call(setattr, kernel, "stopping", True)
            return {"stopping": True}
        if isinstance(req, (protocol.InstallReq, protocol.UninstallReq, protocol.PluginListReq,
                            protocol.RollbackReq, protocol.ProgressReq)):
            from kernel import install  # verification and install run here, in this control thread

            return install.handle(kernel, req)
        raise ValueError(f"unsupported request {type(req).__name__}")

    def _save_tasks(self) -> None:
        kernel = self.kernel
        tasks = self.kernel.call(lambda: [r.task for r in kernel.table.tasks.values()]).result(CALL_TIMEOUT)
        write_atomically(kernel.home / "state" / "tasks.json", msgspec.json.encode(tasks))

    def _ping(self, req) -> dict:
        """Round trips kernel -> service -> kernel, timed inside the kernel loop (the
        next ping leaves as the loop handles the previous pong)."""
        kernel = self.kernel
        done = kernel.call(_ping_series, kernel, req.service, req.count, req.lane).result(CALL_TIMEOUT)
        rtts = sorted(done.result(CALL_TIMEOUT * 4))
        return {"service": req.service, "count": len(rtts), "lane": req.lane.name,
                "median_us": round(rtts[len(rtts) // 2] * 1e6, 1),
                "p99_us": round(rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))] * 1e6, 1),
                "mean_us": round(sum(rtts) / len(rtts) * 1e6, 1)}

    def _kv(self, req) -> dict:
        """`lugh kv`: one storage request each (kernel/kv.py)."""
        kernel = self.kernel
        if isinstance(req, protocol.KvReq):
            if req.put:
                if any(k.startswith(protocol.RESERVED_KEY_PREFIX) for k, _ in req.put):
                    raise ValueError("keys under .lugh/ are reserved")
                return {"commit": kv.request(kernel, protocol.KvPut(req=0, writes=req.put)).commit, "value": None}
            if req.get is not None:
                return {"commit": 0, "value": kv.request(kernel, protocol.KvGet(req=0, key=req.get)).value}
            raise ValueError("nothing to do: give put or get")
        if isinstance(req, protocol.KvScanReq):
            r = kv.request(kernel, protocol.KvScan(req=0, prefix=req.prefix, after=req.after, limit=req.limit))
            return {"items": [list(item) for item in r.items], "more": r.more, "after": r.info.get("after", "")}
        if isinstance(req, protocol.KvHistoryReq):
            what = "history" if req.key is None else "versions"
            return kv.request(kernel, protocol.KvInfo(req=0, what=what, key=req.key, limit=req.limit,
                                                      before=req.before)).info
        if isinstance(req, protocol.KvStatsReq):
            return kv.request(kernel, protocol.KvInfo(req=0, what="stats")).info
        if isinstance(req, protocol.KvCompactReq):
            return kv.request(kernel, protocol.KvAdmin(req=0, op="compact", keep=req.keep)).info
        # A rollback is journaled before it is asked for, and its outcome after; its
        # commit carries the operation id in its label (`lugh kv history`), which says
        # whether it took effect if the kernel stopped before the answer came.
        op = uuid.uuid4().hex[:12]
        kernel.journal.append("kvrollback.begin", id=op, to_seq=req.to_seq)
        try:
            r = kv.request(kernel, protocol.KvAdmin(req=0, op="rollback", to_seq=req.to_seq,
                                                    label=f"rollback to {req.to_seq} ({op})"), timeout=120)
        except ValueError as exc:
            kernel.journal.append("kvrollback.rollback", id=op, reason=str(exc))
            raise
        kernel.journal.append("kvrollback.commit", id=op, commit=r.commit, restored=r.info.get("restored", 0))
        return {"id": op, "commit": r.commit, "to": req.to_seq, "restored": r.info.get("restored", 0)}


def _ping_series(kernel, service_name: str, count: int, lane):
    from concurrent.futures import Future

    service = kernel.services.get(service_name)
    if service is None or service.active is None or not service.active.connected:
        raise ValueError(f"service {service_name!r} is not up")
    inst = service.active
    done: Future = Future()
    rtts: list[float] = []

    def next_ping():
        sent = time.perf_counter()
        fut = kernel.request(inst, protocol.Ping(req=0), lane)
        fut.add_done_callback(lambda f: on_pong(f, sent))

    def on_pong(f, sent):
        if f.exception() is not None:
            done.set_exception(f.exception())
            return
        rtts.append(time.perf_counter() - sent)
        if len(rtts) < count:
            next_ping()
        else:
            done.set_result(rtts)

    next_ping()
    return done


def _say(exc: Exception) -> str:
    if isinstance(exc, KeyError):
        return f"no such item: {exc.args[0]}"
    if isinstance(exc, TimeoutError):
        return "the kernel did not answer in time"
    return str(exc)
