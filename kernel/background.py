"""Work the kernel loop hands off so that it never waits for it: one thread per kind of
work, running what it is given in order. The owner calls ``stop``: what is queued still
runs, then the thread is joined.

Used for the supervision journal (an fsync per record) and for closing a departed
peer's sockets (``nng_close`` waits for its pipes and aio: 0.3-2 ms for three sockets,
which the loop should not spend in the middle of a recovery).
"""

from __future__ import annotations

import queue
import sys
import threading
from concurrent.futures import Future


class Background:
    def __init__(self, name: str):
        self.name = name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def run(self, fn, *args, **kwargs) -> Future:
        """``fn(*args, **kwargs)`` on the background thread, after what was given before.
        The future is done when it has run (for a caller that must know, never the loop)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()
        done: Future = Future()
        self._queue.put((done, fn, args, kwargs))
        return done

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            done, fn, args, kwargs = item
            try:
                done.set_result(fn(*args, **kwargs))
            except Exception as exc:  # reported, never fatal: the loop does not wait for it
                print(f"kernel: {self.name}: {exc!r}", file=sys.stderr)
                done.set_exception(exc)

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None
