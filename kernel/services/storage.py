"""Storage service: a transactional key-value store hosted as a storage plugin.

Group commit: puts that arrive together are applied in one ``storage_commit`` call,
one fsync for all of them, and each is acknowledged only after that call returns
(durable before acknowledged). The service stream position is committed in the same
transaction under a reserved key, so after a crash the service knows exactly which
kernel messages it has applied, and the kernel replays the rest: exactly once.
"""

from __future__ import annotations

from kernel import protocol
from kernel.protocol import Lane, RESERVED_KEY_PREFIX
from kernel.services.loop import report_error

POSITION_KEY = RESERVED_KEY_PREFIX + "applied_seq"


class Server:
    def __init__(self, hook, stream, args):
        self.hook = hook
        self.stream = stream
        args.data_dir.mkdir(parents=True, exist_ok=True)
        hook.storage_open(path=str(args.data_dir))
        position = hook.storage_get(key=POSITION_KEY)
        stream.applied = stream.acked = int(position or 0)
        stream.durable_acks = True
        self.batch: list[protocol.KvPut] = []

    def handle(self, msg):
        if isinstance(msg, protocol.KvPut):
            self.batch.append(msg)
            return None
        if isinstance(msg, protocol.KvGet):
            try:
                value = self.hook.storage_get(key=msg.key)
                return protocol.KvResult(req=msg.req, origin=msg.origin, value=value)
            except Exception as exc:
                self.stream.errors += 1
                return protocol.KvResult(req=msg.req, origin=msg.origin, ok=False, error=str(exc))
        return None

    @property
    def batch_full(self) -> bool:
        return len(self.batch) >= 256

    def flush(self):
        if not self.batch:
            return ()
        batch, self.batch = self.batch, []
        writes = [w for put in batch for w in put.writes]
        writes.append((POSITION_KEY, str(self.stream.applied).encode()))
        try:
            seq = self.hook.storage_commit(writes=writes)
        except Exception as exc:
            # Nothing was applied and nothing is acknowledged: each client is told why
            # (e.g. disk full) and decides; a failed commit is never retried behind its back.
            self.stream.errors += 1
            report_error("commit", exc)
            return [(protocol.KvResult(req=p.req, origin=p.origin, ok=False, error=str(exc)), Lane.LOW)
                    for p in batch]
        self.stream.acked = self.stream.applied
        return [(protocol.KvResult(req=p.req, origin=p.origin, commit=seq), Lane.LOW) for p in batch]

    def close(self):
        self.hook.storage_close()
