"""One :class:`Run` per open acquisition, built from factories (like event-model's ``RunRouter``).

The router owns each acquisition's start message, stage worker and :class:`~streamer.outputs.OutputSet`, and keeps
their number bounded: at most ``max_open`` acquisitions are open (opening one more closes the one idle longest), and
an acquisition that received nothing for ``idle_s`` is closed by the processor's clock tick. A later message of a
closed acquisition reopens it (its start is remembered in a bounded table), so nothing is lost, only resumed.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamer.assembly import StackKey
from streamer.outputs import OutputSet
from streamer.pipeline import Stage, StageWorker
from streamer.sinks.base import Sink, VolumeMeta
from streamer.wire import AcquisitionStart

log = logging.getLogger(__name__)

SinkFactory = Callable[[VolumeMeta], Sequence[tuple[Sink, bool]]]  # → (sink, critical) pairs
StageFactory = Callable[[AcquisitionStart], Sequence[Stage]]


@dataclass
class Run:
    """The live state of one acquisition."""

    acquisition_id: str
    start: AcquisitionStart | None
    last_active: float
    worker: StageWorker | None = None
    outputs: OutputSet | None = None
    stages_error: str | None = None  # the stages cannot be built: every stack is skipped with this reason
    chain: Any = None  # the stage chain as built: what it declares about its output (grid, fitter, provenance)


class AcquisitionRouter:
    """Open runs by acquisition id, bounded in number and closed when idle.

    Parameters
    ----------
    max_open
        Acquisitions open at once (each may hold a stage worker and writer threads).
    idle_s
        An open acquisition that received nothing for this long is reported by :meth:`idle`.
    remember_starts
        Start messages kept to reopen a closed acquisition with its optics.
    """

    def __init__(self, stage_factory: StageFactory, sink_factory: SinkFactory, *, device: str | None = None,
                 observe: Callable[[str, float], None] | None = None, max_open: int = 16, idle_s: float = 600.0,
                 remember_starts: int = 256, worker_factory: Callable[[AcquisitionStart], Any] | None = None) -> None:
        self.stage_factory = stage_factory
        self.worker_factory = worker_factory  # e.g. a Dask cluster's worker (streamer.distributed.live)
        self.sink_factory = sink_factory
        self.device = device
        self.observe = observe
        self.max_open = max(1, int(max_open))
        self.idle_s = float(idle_s)
        self.remember_starts = max(1, int(remember_starts))
        self.runs: OrderedDict[str, Run] = OrderedDict()  # least recently active first
        self.starts: OrderedDict[str, AcquisitionStart] = OrderedDict()

    # --- starts ---------------------------------------------------------------------------------------------------

    def remember(self, start: AcquisitionStart) -> None:
        if start.acquisition_id in self.starts:
            log.info("acquisition %s started again (restart or replay); keeping its outputs", start.acquisition_id)
        self.starts[start.acquisition_id] = start
        self.starts.move_to_end(start.acquisition_id)
        while len(self.starts) > self.remember_starts:
            self.starts.popitem(last=False)  # an open run keeps its own copy in Run.start
        run = self.runs.get(start.acquisition_id)
        if run is not None and run.start is None:
            run.start = start

    def start_of(self, acquisition_id: str) -> AcquisitionStart | None:
        run = self.runs.get(acquisition_id)
        if run is not None and run.start is not None:
            return run.start
        return self.starts.get(acquisition_id)

    # --- runs -----------------------------------------------------------------------------------------------------

    def get(self, acquisition_id: str) -> Run | None:
        return self.runs.get(acquisition_id)

    def open(self, acquisition_id: str, now: float) -> tuple[Run, list[str]]:
        """The run of ``acquisition_id`` (opened if needed) and the ids the caller must close to stay in bounds."""
        run = self.runs.get(acquisition_id)
        evict: list[str] = []
        if run is None:
            # the ones to close first; the caller closes them (draining their work) before using the new run
            evict = list(self.runs)[: max(0, len(self.runs) - self.max_open + 1)]
            run = self.runs[acquisition_id] = Run(acquisition_id, self.start_of(acquisition_id), now)
        run.last_active = max(run.last_active, now)
        self.runs.move_to_end(acquisition_id)
        return run, evict

    def default_start(self, key: StackKey, data: np.ndarray) -> AcquisitionStart:
        """Frames without a start message: default optics, said once."""
        log.warning("acquisition %s: no acquisition_start received; using default optics", key.acquisition_id)
        s = AcquisitionStart(acquisition_id=key.acquisition_id, seq=0, z_count=data.shape[0],
                             frame_shape=data.shape[1:], dtype=data.dtype.name)
        self.remember(s)
        return s

    def worker(self, run: Run, key: StackKey, data: np.ndarray) -> StageWorker:
        """The run's stage worker, built on first use (raises whatever the stage factory raises)."""
        if run.worker is None:
            if run.start is None:
                run.start = self.default_start(key, data)
            if self.worker_factory is not None:  # the chain runs elsewhere; ``chain`` says what it declares
                run.worker = self.worker_factory(run.start)
                run.chain = run.worker.chain
            else:
                run.chain = self.stage_factory(run.start)
                run.worker = StageWorker(run.chain, device=self.device, observe=self.observe)
        return run.worker

    def idle(self, now: float) -> list[str]:
        """Open acquisitions that received nothing for ``idle_s``."""
        return [a for a, r in self.runs.items() if now - r.last_active >= self.idle_s]

    def pop(self, acquisition_id: str) -> Run | None:
        return self.runs.pop(acquisition_id, None)

    @property
    def in_flight(self) -> int:
        return sum(r.worker.in_flight for r in list(self.runs.values()) if r.worker is not None)
