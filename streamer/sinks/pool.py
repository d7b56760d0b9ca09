"""A fixed set of writer threads shared by every :class:`~streamer.sinks.threaded.ThreadedSink` given it.

Without a pool each threaded sink has its own writer thread, so a service with many open acquisitions had as many
threads. With one, the thread count is fixed whatever arrives: a sink with queued work is scheduled on the pool
(at most once at a time, so its volumes are still written in order, by one thread at a time) and gives its thread
back after a few items, so a busy sink cannot starve the others.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

log = logging.getLogger(__name__)
_STOP = object()


class WriterPool:
    """``n`` daemon threads running the drains of the sinks submitted to it.

    Parameters
    ----------
    n
        Threads (fixed; started at construction).
    name
        Thread name prefix (shown by debuggers and ``/proc``).
    """

    def __init__(self, n: int = 4, name: str = "writer") -> None:
        if n < 1:
            raise ValueError(f"a writer pool needs at least one thread, got {n}")
        self.n = int(n)
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True) for i in range(self.n)]
        self._closed = False
        for t in self._threads:
            t.start()

    def submit(self, sink: Any) -> None:
        """Run ``sink._drain()`` on a pool thread (the sink makes sure it is submitted at most once at a time)."""
        if self._closed:
            raise RuntimeError("writer pool is closed")
        self._q.put(sink)

    def _run(self) -> None:
        while True:
            sink = self._q.get()
            if sink is _STOP:
                return
            try:
                sink._drain()
            except Exception:  # the sink's own bug: said, and the thread serves the next sink
                log.exception("writer pool: a sink's drain raised")

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop the threads once the work submitted so far is done."""
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._q.put(_STOP)
        for t in self._threads:
            t.join(timeout)
