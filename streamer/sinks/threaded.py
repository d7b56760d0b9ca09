"""Put any :class:`~streamer.sinks.base.Sink` behind a bounded queue and a writer thread.

Policy, stated once because it is the contract with the acquisition:

* ``append`` never waits for the disk. When the queue is full the volume is dropped (``on_full="drop"``: the new one;
  ``"drop_oldest"``: the oldest waiting one — latest wins, what a display wants), the drop is counted and the index is
  recorded as skipped with the reason, so the output says which timepoints are missing.
* A *critical* sink (the disk writer) stops at its first write error: the remaining queue is recorded as skipped,
  ``on_error`` is called from the writer thread at once, and the next ``append``/``close`` raises
  :class:`~streamer.sinks.base.SinkFailed` chained to the :class:`~streamer.sinks.base.SinkWriteError`.
* A non-critical sink (the display) counts the error, logs it once and carries on with the next volume.
* A critical sink refusing *one volume* for a reason that is not the disk (a value its format cannot encode, a
  volume that does not fit its setup, a bug) does not stop: the volume is recorded as skipped with the reason and
  every *reject listener* is told ``fn(index, reason)``, so the caller can quarantine that stack.
* Done listeners (``add_done_listener``, see :mod:`streamer.sinks.base`) are called from the writer thread once the
  inner sink has finished a volume (``stored=True``) or its skip (``False``); a sink that offers its own
  ``add_done_listener`` (it knows better when its data are durable) is asked to call them instead.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

import numpy as np

from streamer.sinks.base import (
    DoneListener,
    Sink,
    SinkError,
    SinkFailed,
    SinkStateError,
    SinkStats,
    SinkWriteError,
    VolumeIndex,
    VolumeMeta,
    check_volume,
)

log = logging.getLogger(__name__)

OnFull = Literal["drop", "drop_oldest", "block"]
_STOP = object()


class ThreadedSink:
    """Asynchronous wrapper: ``append`` enqueues, one writer thread calls the inner sink.

    Parameters
    ----------
    inner
        The synchronous sink doing the writing.
    queue_size
        Volumes that may wait; each holds a reference to its array, so memory ≤ ``queue_size`` × volume bytes.
    on_full
        What ``append`` does when the queue is full: ``"drop"`` the new volume, ``"drop_oldest"`` waiting one, or
        ``"block"`` (only for offline replays where losing data is worse than waiting).
    critical
        Stop at the first write error and report it (disk), or count and carry on (display).
    metrics
        Optional :class:`~streamer.metrics.Metrics`; gauges ``sink_queue_depth{sink=…}``, counters
        ``sink_volumes_written`` / ``sink_volumes_dropped`` / ``sink_errors`` and stage ``write_<name>``.
    on_error
        Called once, from the writer thread, with the error that stopped a critical sink.
    pool
        A shared :class:`~streamer.sinks.pool.WriterPool` to write on instead of a thread of its own (the service
        uses one, so its thread count does not grow with the number of open acquisitions).
    """

    def __init__(
        self, inner: Sink, *, queue_size: int = 4, on_full: OnFull = "drop", critical: bool = True,
        metrics: Any | None = None, on_error: Callable[[SinkError], None] | None = None, pool: Any | None = None,
    ) -> None:
        if queue_size < 1:
            raise SinkStateError(f"{inner.name}: queue_size must be ≥ 1, got {queue_size}")
        if on_full not in ("drop", "drop_oldest", "block"):
            raise SinkStateError(f"{inner.name}: on_full must be 'drop', 'drop_oldest' or 'block', got {on_full!r}")
        self.inner = inner
        self.name = inner.name
        self._stage = "write_" + "".join(ch if ch.isalnum() else "_" for ch in inner.name)
        self.on_full = on_full
        self.critical = critical
        self.metrics = metrics
        self.on_error = on_error
        self.queue_size = queue_size
        self._q: deque[tuple[Any, Any, Any]] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._meta: VolumeMeta | None = None
        self._closed = False
        self._error: SinkError | None = None  # the first error; it stops a critical sink
        self._errors = 0  # every call into the inner sink goes through this wrapper, so it sees every error
        self._last_error: str | None = None
        self._dropped = 0
        self._skips: dict[VolumeIndex, str] = {}
        self._skips_sent: set[VolumeIndex] = set()
        self._busy = False
        self.max_depth = 0
        self._done_listeners: list[DoneListener] = []
        self._reject_listeners: list[Callable[[VolumeIndex, str], None]] = []
        self._inner_confirms = False
        self.pool = pool
        self._started = False
        self._scheduled = False  # pool mode: a drain of this sink is queued or running
        self._finished = False  # the writer handled "stop"
        if metrics is not None:
            labels = {"sink": self.name}
            for c in ("sink_volumes_written", "sink_volumes_dropped", "sink_errors"):
                metrics.declare(c, labels=labels)
            metrics.set_gauge("sink_queue_depth", 0, labels=labels)

    @classmethod
    def for_disk(cls, inner: Sink, *, queue_size: int = 4, metrics: Any | None = None,
                 on_error: Callable[[SinkError], None] | None = None) -> ThreadedSink:
        """The disk policy: critical, drop the new volume when the queue is full (never block the acquisition)."""
        return cls(inner, queue_size=queue_size, on_full="drop", critical=True, metrics=metrics, on_error=on_error)

    @classmethod
    def for_display(cls, inner: Sink, *, queue_size: int = 1, metrics: Any | None = None) -> ThreadedSink:
        """The display policy: not critical, latest wins."""
        return cls(inner, queue_size=queue_size, on_full="drop_oldest", critical=False, metrics=metrics)

    # --- listeners ------------------------------------------------------------------------------------------------

    def add_done_listener(self, fn: DoneListener) -> None:
        """Call ``fn(index, stored)`` once a volume (True) or its skip (False) is written by the inner sink."""
        inner_add = getattr(self.inner, "add_done_listener", None)
        if callable(inner_add):
            inner_add(fn)
            self._inner_confirms = True
        else:
            self._done_listeners.append(fn)

    def add_reject_listener(self, fn: Callable[[VolumeIndex, str], None]) -> None:
        """Call ``fn(index, reason)`` when the inner sink refused one volume for a reason other than the disk."""
        self._reject_listeners.append(fn)

    def _notify(self, listeners: list[Any], *args: Any) -> None:
        for fn in listeners:
            try:
                fn(*args)
            except Exception:  # a listener's bug must not stop the writer
                log.exception("%s: listener raised", self.name)

    # --- caller side ----------------------------------------------------------------------------------------------

    @property
    def stats(self) -> SinkStats:
        """The inner sink's stats plus the drops and skips this wrapper made."""
        s = self.inner.stats
        with self._cond:
            skipped = {**s.skipped, **self._skips}
            return SinkStats(
                written=s.written, bytes_written=s.bytes_written, skipped=skipped,
                dropped_queue_full=self._dropped, errors=self._errors, last_error=self._last_error,
            )

    @property
    def error(self) -> SinkError | None:
        """The error that stopped this sink, if any."""
        return self._error

    @property
    def depth(self) -> int:
        with self._cond:
            return len(self._q)

    def setup(self, meta: VolumeMeta) -> None:
        """Set up the inner sink synchronously (so an unwritable output fails here), then start the writer."""
        if self._started:
            raise SinkStateError(f"{self.name}: setup() called twice")
        self.inner.setup(meta)
        self._meta = meta
        self._started = True
        if self.pool is None:
            self._thread = threading.Thread(target=self._run, name=f"sink-{self.name}", daemon=True)
            self._thread.start()
        else:
            with self._cond:
                self._kick()

    def _kick(self) -> None:
        """Pool mode, under the lock: schedule a drain if there is work and none is scheduled."""
        if self.pool is not None and self._started and self._q and not self._scheduled:
            self._scheduled = True
            self.pool.submit(self)

    def _raise_if_failed(self) -> None:
        if self._error is not None and self.critical:
            raise SinkFailed(f"{self.name} stopped after an error: {self._error}") from self._error

    def append(self, volume: np.ndarray, index: VolumeIndex) -> bool:
        """Queue ``volume`` for writing; returns False if it (or, latest-wins, an older one) was dropped.

        Raises
        ------
        SinkFailed
            If this critical sink already stopped on an error.
        SinkStateError
            If the volume does not match the setup, or the sink is closed.
        """
        self._raise_if_failed()
        if self._closed:
            raise SinkStateError(f"{self.name}: append({index.label()}) after close()")
        check_volume(self._meta, volume, index, self.name)
        return self._put(("append", volume, index), index)

    def skip(self, index: VolumeIndex, reason: str) -> None:
        """Forward a skip (queued in order with the volumes; recorded at once if the queue is full)."""
        self._raise_if_failed()
        if self._closed:
            raise SinkStateError(f"{self.name}: skip({index.label()}) after close()")
        with self._cond:
            if len(self._q) >= self.queue_size:
                self._skips[index] = reason
                return
            self._q.append(("skip", index, reason))
            self._cond.notify_all()
            self._kick()

    def _put(self, item: tuple[Any, Any, Any], index: VolumeIndex) -> bool:
        dropped: VolumeIndex | None = None
        with self._cond:
            if len(self._q) >= self.queue_size:
                if self.on_full == "block":
                    # only a critical sink stops on an error; a non-critical one keeps writing, so it keeps its bound
                    self._cond.wait_for(lambda: len(self._q) < self.queue_size
                                        or (self._error is not None and self.critical))
                    self._raise_if_failed()
                elif self.on_full == "drop":
                    dropped = index
                else:
                    old = self._q.popleft()
                    dropped = old[2] if old[0] == "append" else None
                    if old[0] == "skip":
                        self._skips[old[1]] = old[2]
            if dropped is not index:
                self._q.append(item)
            if dropped is not None:
                self._dropped += 1
                self._skips[dropped] = f"{self.name} queue full ({self.queue_size} volumes waiting)"
            depth = len(self._q)
            self.max_depth = max(self.max_depth, depth)
            self._cond.notify_all()
            self._kick()
        if self.metrics is not None:
            labels = {"sink": self.name}
            self.metrics.set_gauge("sink_queue_depth", depth, labels=labels)
            if dropped is not None:
                self.metrics.inc("sink_volumes_dropped", labels=labels)
        if dropped is not None:
            n = self._dropped
            # latest-wins drops are the design for a display; for a writer they mean the disk is too slow: say so,
            # but at 1, 10, 100, ... drops rather than once per volume
            decade = str(n).rstrip("0") == "1"
            level = logging.WARNING if decade and self.on_full != "drop_oldest" else logging.DEBUG
            log.log(level, "%s: queue full, dropped volume %s (%d dropped so far)", self.name, dropped.label(), n)
        return dropped is None

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued volume was handed to the inner sink; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: (not self._q and not self._busy) or not self._started, timeout)

    def close(self, timeout: float | None = None) -> SinkStats:
        """Write what is queued, close the inner sink and stop the thread.

        Raises
        ------
        SinkFailed
            If this critical sink stopped on an error (after closing what could be closed).
        """
        if not self._closed:
            self._closed = True
            with self._cond:
                self._q.append(("stop", None, None))
                self._cond.notify_all()
                self._kick()
            if self._thread is not None:
                self._thread.join(timeout)
                if self._thread.is_alive():
                    raise SinkWriteError(f"{self.name}: writer did not finish within {timeout} s")
            elif self._started:  # on the pool
                with self._cond:
                    if not self._cond.wait_for(lambda: self._finished, timeout):
                        raise SinkWriteError(f"{self.name}: writer did not finish within {timeout} s")
            else:
                self._close_inner()
        self._raise_if_failed()
        return self.stats

    # --- writer thread --------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while self._step(wait=True):
            pass

    def _drain(self) -> None:
        """Pool mode: handle a few queued items, then give the thread back (rescheduled if more are waiting)."""
        for _ in range(16):
            if not self._step(wait=False):
                return
        with self._cond:
            self._scheduled = False
            self._kick()

    def _step(self, wait: bool) -> bool:
        """Handle one queued item; False once stopped (or, not waiting, when the queue is empty)."""
        with self._cond:
            if wait:
                self._cond.wait_for(lambda: bool(self._q))
            elif not self._q:
                self._scheduled = False
                return False
            op, a, b = self._q.popleft()
            self._busy = op != "stop"
            depth = len(self._q)
            self._cond.notify_all()
        if self.metrics is not None:
            self.metrics.set_gauge("sink_queue_depth", depth, labels={"sink": self.name})
        if op == "stop":
            self._flush_skips()
            self._close_inner()
            with self._cond:
                self._busy = False
                self._finished = True
                self._cond.notify_all()
            return False
        if self._error is not None and self.critical:
            # stopped: everything still queued is recorded as lost, never silently
            if op == "append":
                with self._cond:
                    self._skips[b] = f"{self.name} stopped after an error"
        else:
            self._flush_skips()
            self._do(op, a, b)
        with self._cond:
            self._busy = False
            self._cond.notify_all()
        return True

    def _flush_skips(self) -> None:
        with self._cond:
            pending = dict(self._skips)
        for index, reason in pending.items():
            if index in self._skips_sent or (self._error is not None and self.critical):
                continue
            self._skips_sent.add(index)
            try:
                self.inner.skip(index, reason)
            except Exception as err:  # a skip that cannot be recorded is an error like a write
                self._fail(err, index)
            else:
                self._notify(self._done_listeners, index, False)

    def _do(self, op: str, a: Any, b: Any) -> None:
        try:
            if op == "append":
                if self.metrics is not None:
                    with self.metrics.stage_timer(self._stage):
                        self.inner.append(a, b)
                    self.metrics.inc("sink_volumes_written", labels={"sink": self.name})
                    self.metrics.add_throughput(self._stage, 1, a.nbytes)
                else:
                    self.inner.append(a, b)
            else:
                self.inner.skip(a, b)
        except Exception as err:
            self._fail(err, b if op == "append" else a)
            return
        self._notify(self._done_listeners, b if op == "append" else a, op == "append")

    def _fail(self, err: Exception, index: VolumeIndex | None) -> None:
        typed = err if isinstance(err, SinkError) else SinkWriteError(
            f"{self.name}: unexpected error writing {index.label() if index else ''}: {_short(err)}", index=index,
            cause=err,
        )
        if self.critical and index is not None and not _is_disk_error(err):
            self._reject(typed, index)
            return
        if self.metrics is not None:
            self.metrics.inc("sink_errors", labels={"sink": self.name})
        first = self._error is None
        with self._cond:
            self._errors += 1
            self._last_error = str(typed)
            if index is not None and index not in self._skips_sent:
                # the volume that failed is lost too: it is listed with the others, with the reason
                self._skips[index] = f"write failed: {typed}"
        if first:
            self._error = typed
        if self.critical:
            log.error("stopped writing: %s", typed)
            with self._cond:
                self._cond.notify_all()
            if first and self.on_error is not None:
                try:
                    self.on_error(typed)
                except Exception:  # the callback's own bug must not hide the write error
                    log.exception("%s: on_error callback raised", self.name)
        else:
            if first:
                log.warning("%s (further errors are counted, not logged)", typed)

    def _reject(self, typed: SinkError, index: VolumeIndex) -> None:
        """One volume refused (not the disk): recorded as skipped, listeners told, the writer goes on."""
        if self.metrics is not None:
            self.metrics.inc("sink_errors", labels={"sink": self.name})
        with self._cond:
            self._errors += 1
            self._last_error = str(typed)
            self._skips[index] = f"refused: {typed}"
        log.error("%s: refused %s (the writer goes on): %s", self.name, index.label(), typed)
        self._notify(self._reject_listeners, index, str(typed))

    def _close_inner(self) -> None:
        try:
            self.inner.close()
        except Exception as err:
            self._fail(err, None)


def _is_disk_error(err: BaseException) -> bool:
    """The disk (or the output's storage) failed, as opposed to one volume the writer could not take."""
    if isinstance(err, SinkStateError):
        return False
    # a SinkError raised by the inner sink is its own report of a storage failure, whatever caused it
    return isinstance(err, (OSError, SinkError))


def _short(err: BaseException, limit: int = 300) -> str:
    text = repr(err)
    return text if len(text) <= limit else text[:limit] + "…"
