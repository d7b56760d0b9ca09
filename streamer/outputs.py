"""The outputs of one acquisition as one :class:`OutputSet`, with one failure policy and done-confirmation.

Failure policy, in one place:

* a *critical* output (the disk writer) failing on the disk (``OSError``, :class:`~streamer.sinks.base.SinkError`)
  raises :class:`CriticalOutputError`: the service stops cleanly, the recording stays whole;
* a critical output refusing *this* volume for any other reason (a bug or a value it cannot encode) raises
  :class:`VolumeRejected`: that stack is quarantined and the stream goes on;
* a non-critical output (the display) failing is counted and logged; the stream goes on.

Exactly once: a stack is confirmed (``on_done(key, stored)``) only when every critical output says it durably holds
the volume or its skip: sinks offering ``add_done_listener`` (see :mod:`streamer.sinks.base`) confirm from their
writer thread; a plain synchronous sink has finished when its call returns.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from engines.errors import RllsmRuntimeError
from streamer.assembly import StackKey
from streamer.sinks.base import Sink, SinkError, SinkStateError, VolumeIndex, VolumeMeta
from streamer.textlimits import clip

log = logging.getLogger(__name__)


class CriticalOutputError(RllsmRuntimeError):
    """A critical output (recording, disk writer) failed; the run stops cleanly, the recording stays intact."""


class VolumeRejected(RllsmRuntimeError):
    """A critical output refused one volume (or one acquisition's setup) for a reason other than the disk."""


def _is_disk_error(err: BaseException) -> bool:
    # SinkStateError: this volume does not fit what the output was set up for, not a failing disk
    return isinstance(err, (OSError, SinkError)) and not isinstance(err, SinkStateError)


class OutputSet:
    """Every output of one acquisition.

    Parameters
    ----------
    meta
        The geometry and metadata the outputs are set up with.
    sinks
        ``(sink, critical)`` pairs.
    on_done
        ``on_done(key, stored)``: the stack is durably output (or its skip recorded) by every critical output;
        called from this thread or from a writer thread.
    on_rejected
        ``on_rejected(key, reason)``: a critical writer thread refused a volume (not a disk error).
    metrics
        Counters ``display_errors``.
    """

    def __init__(
        self, meta: VolumeMeta, sinks: Sequence[tuple[Sink, bool]], *, on_done: Callable[[StackKey, bool], None],
        on_rejected: Callable[[StackKey, str], None] | None = None, metrics: Any = None,
    ) -> None:
        self.meta = meta
        self.sinks = list(sinks)
        self.on_done = on_done
        self.on_rejected = on_rejected
        self.metrics = metrics
        self._lock = threading.Lock()
        self._pending: dict[VolumeIndex, list[Any]] = {}  # index → [key, stored, confirmations still awaited]
        self._listening: set[int] = set()  # ids of critical sinks that confirm through a listener
        self.handed = 0
        for sink, critical in self.sinks:
            if not critical:
                continue
            add = getattr(sink, "add_done_listener", None)
            if callable(add):
                add(self._confirm)
                self._listening.add(id(sink))
            add_rej = getattr(sink, "add_reject_listener", None)
            if callable(add_rej):
                add_rej(self._rejected)

    @property
    def n_critical(self) -> int:
        return sum(1 for _, c in self.sinks if c)

    def open(self) -> None:
        """Set every output up (raises :class:`CriticalOutputError` / :class:`VolumeRejected` for critical ones)."""
        for sink, critical in self.sinks:
            self._guard(sink, critical, "setup", lambda s=sink: s.setup(self.meta))

    def _guard(self, sink: Sink, critical: bool, what: str, call: Callable[[], Any]) -> bool:
        try:
            call()
            return True
        except Exception as err:
            if critical and _is_disk_error(err):
                raise CriticalOutputError(f"output '{sink.name}' failed at {what}: {clip(str(err))}") from err
            if critical:
                raise VolumeRejected(f"output '{sink.name}' refused {what}: {type(err).__name__}: "
                                     f"{clip(str(err))}") from err
            if self.metrics is not None:
                self.metrics.inc("display_errors")
            log.warning("output '%s' %s failed (non-critical, skipped): %s", sink.name, what, clip(str(err)))
            return False

    def _hand(self, key: StackKey, stored: bool, call: Callable[[Sink], Any], what: str) -> None:
        index = VolumeIndex(key.timepoint, key.channel)
        n = self.n_critical
        with self._lock:
            self.handed += 1
            if n:
                self._pending[index] = [key, stored, n]
        if not n:
            self.on_done(key, stored)
        for sink, critical in self.sinks:
            ok = self._guard(sink, critical, f"{what} {index.label()}", lambda s=sink: call(s))
            if ok and critical and id(sink) not in self._listening:
                self._confirm(index, stored)  # a synchronous sink has finished when its call returns

    def append(self, volume: np.ndarray, key: StackKey) -> None:
        index = VolumeIndex(key.timepoint, key.channel)
        self._hand(key, True, lambda s: s.append(volume, index), "append")

    def skip(self, key: StackKey, reason: str) -> None:
        index = VolumeIndex(key.timepoint, key.channel)
        self._hand(key, False, lambda s: s.skip(index, reason), "skip")

    def _confirm(self, index: VolumeIndex, stored: bool) -> None:
        with self._lock:
            entry = self._pending.get(index)
            if entry is None:
                return
            entry[2] -= 1
            if entry[2] > 0:
                return
            del self._pending[index]
        self.on_done(entry[0], entry[1])

    def _rejected(self, index: VolumeIndex, reason: str) -> None:
        with self._lock:
            entry = self._pending.pop(index, None)
        if entry is not None and self.on_rejected is not None:
            self.on_rejected(entry[0], reason)

    @property
    def unconfirmed(self) -> int:
        with self._lock:
            return len(self._pending)

    def close(self) -> None:
        for sink, critical in self.sinks:
            self._guard(sink, critical, "close", sink.close)

    def close_quietly(self) -> None:
        """After a critical failure: close what can be closed, ignoring further errors."""
        for sink, _ in self.sinks:
            try:
                sink.close()
            except Exception as err:  # already failing; say so and go on closing the rest
                log.warning("closing output '%s' after an error: %s", sink.name, clip(str(err)))

    def drops(self, acquisition_id: str) -> dict[str, int]:
        return {f"{acquisition_id}/{sink.name}": sink.stats.dropped_queue_full for sink, _ in self.sinks}
