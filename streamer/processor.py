"""The consumer behind the recording: decode → assemble → route → stage chain → outputs, for ``serve`` and ``replay``.

One :class:`StackProcessor` runs in one thread. It is fed messages in recording order (``handle``) and clock ticks
(``tick``); it has no socket and no clock of its own, so an offline replay of a recording produces exactly the volumes
the live run did. The parts, each in its module:

* :mod:`streamer.decoding` — total decoding and range checks: a malformed message is counted and logged, never raised;
* :mod:`streamer.router` — one run per open acquisition (its start, stage worker and outputs), bounded in number;
* :mod:`streamer.outputs` — an acquisition's outputs with one failure policy and done-confirmation;
* :mod:`streamer.ledger` — the resume ledger: ``done.log`` and ``quarantine.log`` beside the recording;
* :mod:`streamer.status` — the frozen :class:`~streamer.status.ProcessorStatus` that readers get.

Anything that fails while processing one stack or acquisition (other than the disk) is *quarantined*: counted,
reported with its reason and written to the ledger, so a restart and an offline replay skip it with the same reason.
A critical output failing on the disk raises :class:`CriticalOutputError`, which stops the run.

Resume after a crash: a stack is marked done when every critical output has durably written it (a callback from the
writer); on restart, records of done or quarantined stacks are skipped by header (their payloads are not even read).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from streamer.assembly import AssembledStack, StackAssembler, StackKey, StackOutOfRange, StackTooLarge
from streamer.decoding import decode_message, out_of_range, ranges
from streamer.ledger import ResumeLedger
from streamer.outputs import CriticalOutputError, OutputSet, VolumeRejected
from streamer.pipeline import PipelineError
from streamer.router import AcquisitionRouter, Run, SinkFactory, StageFactory
from streamer.sinks.base import SinkError, VolumeIndex
from streamer.sinks.factory import volume_meta
from streamer.sinks.npy_sink import NpyDirSink
from streamer.status import MAX_LISTED, ProcessorStatus, RunState, format_summary
from streamer.textlimits import clip
from streamer.wire import AcquisitionEnd, AcquisitionStart, Frame, Stack, WireError, decode_header

log = logging.getLogger(__name__)
summary_log = logging.getLogger("streamer.summary")

__all__ = ["CriticalOutputError", "NpyDirSink", "SinkFactory", "StackProcessor", "StageFactory", "WorkCheck"]

# (shape of a stack, its acquisition's start or None) → why it is too big to process, or None
WorkCheck = Callable[[tuple[int, ...], AcquisitionStart | None], str | None]


class StackProcessor:
    """Decode, assemble, process and output the messages of a recording, in order.

    Parameters
    ----------
    stage_factory
        Builds the stage chain of an acquisition from its ``AcquisitionStart`` (optics).
    sink_factory
        Opens the outputs of an acquisition once the first volume's geometry is known.
    metrics
        A :class:`streamer.metrics.Metrics` (counters, stage timings).
    timeout_s, max_open, max_stack_bytes, max_open_bytes
        Assembly: incomplete-stack timeout and memory bounds (see :class:`StackAssembler`).
    ledger
        The resume ledger (done and quarantined stacks); None keeps one in memory only.
    device
        Compute device of the stage workers.
    max_acquisitions, idle_s
        Acquisitions open at once, and the silence after which one is closed (see :class:`AcquisitionRouter`).
    work_check
        Refuses a stack whose processing would not fit the memory budget, before anything is allocated for it.
    worker_factory
        ``AcquisitionStart → worker`` with :class:`StageWorker`'s interface and a ``chain`` attribute, used instead of
        ``stage_factory`` (:class:`streamer.distributed.live.DaskStageWorker`); it may hand back an exception as a
        stack's result.
    """

    def __init__(
        self, stage_factory: StageFactory, sink_factory: SinkFactory, metrics: Any, *, timeout_s: float = 5.0,
        max_open: int = 64, ledger: ResumeLedger | None = None, device: str | None = None,
        process_incomplete: bool = False, max_stack_bytes: int = 8 << 30, max_acquisitions: int = 16,
        idle_s: float = 600.0, work_check: WorkCheck | None = None, max_open_bytes: int | None = None,
        done_log: str | os.PathLike[str] | None = None, worker_factory: Callable[[AcquisitionStart], Any] | None = None,
    ) -> None:
        self.metrics = metrics
        self.assembler = StackAssembler(timeout_s=timeout_s, max_open=max_open, max_stack_bytes=max_stack_bytes,
                                        max_open_bytes=max_open_bytes)
        self.router = AcquisitionRouter(stage_factory, sink_factory, device=device, observe=metrics.observe,
                                        max_open=max_acquisitions, idle_s=idle_s, worker_factory=worker_factory)
        if ledger is None:  # done_log: the older spelling, a path to done.log inside the recording folder
            ledger = ResumeLedger(Path(done_log).parent if done_log is not None else None)
        self.ledger = ledger
        self.process_incomplete = process_incomplete
        self.work_check = work_check
        self._lock = threading.Lock()  # writer threads report rejections and confirmations concurrently
        self.errors: Counter[str] = Counter()
        self.last_errors: deque[str] = deque(maxlen=20)
        self.incomplete: deque[dict[str, Any]] = deque(maxlen=MAX_LISTED)  # the latest; the total is counted
        self.incomplete_total = 0
        self.summaries: deque[dict[str, Any]] = deque(maxlen=MAX_LISTED)
        self.summaries_total = 0
        self.latencies: deque[float] = deque(maxlen=4096)  # last message received → volume output (s)
        self._reported_skips: set[str] = set()
        self._finished = False
        for name in ("messages_processed", "messages_rejected", "stacks_complete", "stacks_incomplete",
                     "volumes_output", "display_errors", "stage_errors", "quarantined", "quarantine_skipped",
                     "acquisitions_closed_idle", "acquisitions_closed_full"):
            metrics.declare(name)

    @property
    def done(self) -> set[StackKey]:
        return self.ledger.done

    # --- input ------------------------------------------------------------------------------------------------

    def handle(self, parts: Sequence[Any], *, record: int = -1, received_at: float | None = None) -> None:
        """Process one received message; bad input is counted, logged or quarantined, never raised.

        Raises
        ------
        CriticalOutputError
            Only when a critical output fails on the disk.
        """
        now = time.time() if received_at is None else received_at
        self._expire(now)
        try:
            header, array = decode_message(parts, strict=True)
        except WireError as err:
            self._reject(err, record)
            return
        why = self.ledger.skip_reason(record=record, acquisition=header.acquisition_id,
                                      key=StackKey(header.acquisition_id, header.timepoint, header.channel)
                                      if isinstance(header, (Frame, Stack)) else None)
        if why is not None and why != "done":
            self._skip_quarantined(f"record {record}", why)
            return
        self.metrics.inc("messages_processed")
        try:
            self._dispatch(header, array, now, record)
        except CriticalOutputError:
            raise
        except WireError as err:
            self._reject(err, record)
        except MemoryError:  # a plausible-looking stack that still does not fit: reject it, keep serving
            self._reject(StackTooLarge("not enough memory to assemble this stack"), record)
        except Exception as err:  # anything else: this message is quarantined, the service goes on
            self._quarantine(f"record {record}: {type(err).__name__}: {err}", record=record)

    def _dispatch(self, header: Any, array: np.ndarray | None, now: float, record: int) -> None:
        if isinstance(header, Frame):
            self._check_work((header.z_count, *header.shape), header.acquisition_id, header.label())
            ready = self.assembler.add_frame(header, array, now=now, record=record)
        elif isinstance(header, Stack):
            ready = [self.assembler.add_stack(header, array, now=now, record=record)]
        elif isinstance(header, AcquisitionStart):
            self.router.remember(header)
            ready = []
        else:
            assert isinstance(header, AcquisitionEnd)
            ready = self.assembler.end(header.acquisition_id, "acquisition ended before this stack was whole")
        for st in ready:
            self._process_safely(st)
        if isinstance(header, AcquisitionEnd):
            self._finish_acquisition(header.acquisition_id, header)

    def _check_work(self, shape: tuple[int, ...], acq: str, label: str) -> None:
        if self.work_check is None:
            return
        why = self.work_check(tuple(shape), self.router.start_of(acq))
        if why is not None:
            raise StackTooLarge(f"{acq} {label}: {why}")

    def skip_if_done(self, head: bytes, record: int = -1) -> bool:
        """For resume: True if this record is already output or quarantined (so its payload need not be read)."""
        if not self.ledger.done and not self.ledger.n_quarantined:
            return False
        try:
            h = decode_header(head)
        except Exception:  # WireError, or worse: the decoder reports it when the record is handled
            if record in self.ledger.records:
                self._skip_quarantined(f"record {record}", self.ledger.records[record])
                return True
            return False
        key = StackKey(h.acquisition_id, h.timepoint, h.channel) if isinstance(h, (Frame, Stack)) else None
        why = self.ledger.skip_reason(record=record, key=key,
                                      acquisition=h.acquisition_id if key is None else None)
        if why is None:
            return False
        if key is None and why == "done":
            return False
        if why != "done":
            self._skip_quarantined(f"record {record}", why)
        return True

    def tick(self, now: float | None = None) -> None:
        """Flag stacks whose planes stopped arriving; close idle acquisitions; collect finished GPU work."""
        now = time.time() if now is None else now
        self._expire(now)
        for acq in self.router.idle(now):
            self.metrics.inc("acquisitions_closed_idle")
            log.warning("acquisition %s: nothing received for %g s; closing its outputs (a later message reopens "
                        "them)", acq, self.router.idle_s)
            self._finish_acquisition(acq, None, reason="idle")
        for run in list(self.router.runs.values()):
            if run.worker is not None:
                for token, volume in self._collect(run, block=False):
                    self._deliver_safely(token, volume)

    def _collect(self, run: Run, block: bool) -> list[tuple[Any, Any]]:
        """Finished work of a run's worker; a worker failing here (e.g. a device error while copying results back)
        loses what it held: those stacks are counted and will be redone on restart, the stream goes on."""
        try:
            return run.worker.drain() if block else run.worker.poll()
        except Exception as err:
            self._stage_error(f"collecting the results of {run.acquisition_id} failed: {type(err).__name__}: {err}")
            run.worker = None  # rebuilt for the next stack
            return []

    def _expire(self, now: float) -> None:
        for st in self.assembler.expire(now):
            self._process_safely(st)

    # --- reporting ----------------------------------------------------------------------------------------------

    def _note(self, msg: str) -> str:
        msg = clip(msg)
        with self._lock:
            self.last_errors.append(msg)
        return msg

    def _reject(self, err: WireError, record: int) -> None:
        kind = type(err).__name__
        with self._lock:
            self.errors[kind] += 1
            n = self.errors[kind]
        self.metrics.inc("messages_rejected", labels={"error": kind})
        self.metrics.inc("messages_rejected")
        msg = self._note(f"record {record}: {kind}: {err}")
        # One line per error type while they are rare, then every 1000th: a flood must not flood the log.
        if n <= 10 or n % 1000 == 0:
            log.warning("rejected message (%s of this kind so far) %s", n, msg)

    def _quarantine(self, reason: str, *, record: int = -1, stack: StackKey | None = None,
                    acquisition: str | None = None) -> None:
        self.metrics.inc("quarantined")
        with self._lock:
            self.errors["Quarantined"] += 1
        msg = self._note(f"quarantined: {reason}")
        log.error("%s", msg)
        self.ledger.quarantine(reason, record=record, stack=stack, acquisition=acquisition)

    def _skip_quarantined(self, what: str, why: str) -> None:
        self.metrics.inc("quarantine_skipped")
        if why not in self._reported_skips and len(self._reported_skips) < 1000:
            self._reported_skips.add(why)
            log.warning("%s skipped: quarantined by an earlier run (%s)", what, why)

    def _stage_error(self, msg: str) -> str:
        self.metrics.inc("stage_errors")
        msg = self._note(msg)
        log.error("%s", msg)
        return msg

    # --- processing -------------------------------------------------------------------------------------------

    def _process_safely(self, st: AssembledStack) -> None:
        self._quarantine_failure(st, self._process, st)

    def _deliver_safely(self, st: AssembledStack, volume: np.ndarray) -> None:
        self._quarantine_failure(st, self._deliver, st, volume)

    def _quarantine_failure(self, st: AssembledStack, step: Callable[..., None], *args: Any) -> None:
        """Run one stack's step; anything but a disk failure of a critical output quarantines that stack only."""
        try:
            step(*args)
        except CriticalOutputError:
            raise
        except VolumeRejected as err:
            self._quarantine(str(err), stack=st.key)
        except Exception as err:
            self._quarantine(f"{st.key.label()}: {type(err).__name__}: {err}", stack=st.key)
            self._skip(st, f"quarantined: {type(err).__name__}: {clip(str(err))}", quiet=True)

    def _process(self, st: AssembledStack) -> None:
        why = out_of_range(st.key, self.router.start_of(st.key.acquisition_id))
        if why is not None:
            # rejected before any output sees it: a critical writer refusing it would stop the whole service
            self._reject(StackOutOfRange(why), st.records[1])
            self.ledger.mark_done(st.key, False)
            return
        if st.complete:
            self.metrics.inc("stacks_complete")
        else:
            self.metrics.inc("stacks_incomplete")
            missing = ranges(st.missing_idx)
            info = {"stack": clip(st.key.label(), 200), "missing_planes": st.missing_idx[:64].tolist(),
                    "n_missing": int(st.missing_idx.size), "missing": missing, "reason": clip(st.reason, 200),
                    "records": list(st.records)}
            with self._lock:
                self.incomplete.append(info)
                self.incomplete_total += 1
                n = self.incomplete_total
            if n <= 20 or n % 1000 == 0:
                log.warning("stack %s incomplete (%s): missing planes %s (%d so far)", info["stack"], st.reason,
                            missing, n)
            if not self.process_incomplete:
                self._skip(st, f"incomplete: {st.reason}; missing planes {missing}", quiet=True)
                return
        run = self._open_run(st.key.acquisition_id, st.received_at)
        if run.stages_error is not None:
            self._skip(st, run.stages_error, quiet=True)
            return
        if self.work_check is not None:
            why = self.work_check(tuple(st.data.shape), run.start)
            if why is not None:
                self._reject(StackTooLarge(f"{st.key.label()}: {why}"), st.records[1])
                self._skip(st, f"refused: {why}", quiet=True)
                return
        try:
            worker = self.router.worker(run, st.key, st.data)
        except Exception as err:  # missing weights, unusable optics...: say so for every stack, keep recording
            msg = self._stage_error(
                f"cannot build the reconstruction for {st.key.acquisition_id}: {type(err).__name__}: {err}")
            self._skip(st, msg, quiet=True)
            return
        try:
            finished = worker.submit(st.data, st)
        except PipelineError as err:  # one bad stack must not stop the stream: quarantined, said which, go on
            self.metrics.inc("stage_errors")
            self._quarantine(str(err), stack=st.key)
            self._skip(st, f"processing failed: {clip(str(err))}", quiet=True)
            return
        for token, volume in finished:
            self._deliver_safely(token, volume)

    def _open_run(self, acq: str, now: float) -> Run:
        run, evict = self.router.open(acq, now)
        for old in evict:
            self.metrics.inc("acquisitions_closed_full")
            log.warning("more than %d acquisitions open: closing %s (idle longest; a later message reopens it)",
                        self.router.max_open, old)
            self._finish_acquisition(old, None, reason="too many open")
        return run

    def _outputs_for(self, run: Run, key: StackKey, shape: tuple[int, ...], dtype: str) -> OutputSet:
        if run.outputs is None:
            meta = volume_meta(run.chain, run.start, key.acquisition_id, shape, dtype)
            try:
                sinks = self.router.sink_factory(meta)
            except (OSError, SinkError) as err:
                raise CriticalOutputError(f"cannot open the outputs of {key.acquisition_id}: {clip(str(err))}") \
                    from err
            except Exception as err:  # e.g. metadata the writers cannot take: this acquisition only
                msg = f"cannot open the outputs of {key.acquisition_id}: {type(err).__name__}: {clip(str(err))}"
                run.stages_error = msg
                self._quarantine(msg, acquisition=key.acquisition_id)
                raise VolumeRejected(msg) from err
            out = run.outputs = OutputSet(meta, sinks, on_done=self.ledger.mark_done,
                                          on_rejected=self._writer_rejected, metrics=self.metrics)
            try:
                out.open()
            except VolumeRejected as err:
                out.close_quietly()
                run.outputs = None
                run.stages_error = f"outputs refused this acquisition: {err}"
                self._quarantine(str(err), acquisition=key.acquisition_id)
                raise
        return run.outputs

    def _writer_rejected(self, key: StackKey, reason: str) -> None:
        """A writer thread refused one volume (not a disk error): quarantine that stack."""
        self._quarantine(reason, stack=key)

    def _deliver(self, st: AssembledStack, volume: np.ndarray | BaseException) -> None:
        run_now = self.router.get(st.key.acquisition_id)
        fitter = getattr(run_now.chain, "fitter", None) if run_now is not None else None
        placement = fitter.pop() if fitter is not None else None  # one per volume the chain made, in order
        if isinstance(volume, BaseException):  # a remote worker's failure on this stack: a stage error, as here
            self.metrics.inc("stage_errors")
            self._quarantine(str(volume), stack=st.key)
            self._skip(st, f"processing failed: {clip(str(volume))}", quiet=True)
            return
        if volume.ndim != 3:  # the outputs cannot even be described by it: a stage error, not a service failure
            msg = self._stage_error(f"stack {st.key.label()}: the reconstruction returned a {volume.ndim}D array "
                                    f"{'×'.join(map(str, volume.shape))}, not a (z, y, x) volume")
            self._skip(st, msg)
            return
        run = self._open_run(st.key.acquisition_id, st.received_at)
        if run.stages_error is not None:
            self._skip(st, run.stages_error, quiet=True)
            return
        out = self._outputs_for(run, st.key, volume.shape, volume.dtype.name)
        if tuple(volume.shape) != tuple(out.meta.shape) or volume.dtype != np.dtype(out.meta.dtype):
            # e.g. a sender that changed the frame size mid-acquisition: this stack is refused, the output goes on
            msg = self._stage_error(
                f"stack {st.key.label()}: volume is {'×'.join(map(str, volume.shape))} {volume.dtype}, but this "
                f"acquisition's output was set up for {'×'.join(map(str, out.meta.shape))} {out.meta.dtype}")
            self._skip(st, msg)
            return
        if placement is not None and out.meta.placements is not None:
            out.meta.placements.record(VolumeIndex(st.key.timepoint, st.key.channel), placement.as_dict())
        out.append(volume, st.key)
        self.metrics.inc("volumes_output")
        if st.received_at:
            self.latencies.append(time.time() - st.received_at)

    def _skip(self, st: AssembledStack, reason: str, quiet: bool = False) -> None:
        # the geometry of the fused volume is not known before the first one; a skip before it needs no output
        run = self.router.get(st.key.acquisition_id)
        if run is None or run.outputs is None:
            self.ledger.mark_done(st.key, False)
            return
        run.outputs.skip(st.key, clip(reason))

    def _finish_acquisition(self, acq: str, end: AcquisitionEnd | None, reason: str = "ended") -> None:
        run = self.router.get(acq)
        if run is not None and run.worker is not None:
            for token, volume in self._collect(run, block=True):
                self._deliver_safely(token, volume)
        run = self.router.pop(acq)
        if run is not None and run.outputs is not None:
            try:
                run.outputs.close()
            except VolumeRejected as err:
                self._quarantine(str(err), acquisition=acq)
        if reason != "ended" and run is None:
            return
        summary = self.summary(acq, end)
        summary["closed"] = reason
        with self._lock:
            self.summaries.append(summary)
            self.summaries_total += 1
        log.debug("acquisition %s finished: %s", clip(acq, 140), json.dumps(summary))
        n = self.summaries_total
        if run is not None or end is not None and (n <= 100 or n % 1000 == 0):  # a flood of ends: not a flood of lines
            # its own logger, which the CLI shows at normal verbosity (see streamer.cli)
            summary_log.info("%s", format_summary(summary))

    # --- status ---------------------------------------------------------------------------------------------------

    def summary(self, acq: str | None = None, end: AcquisitionEnd | None = None) -> dict[str, Any]:
        """End-of-acquisition report (bounded): stacks, incomplete ones, rejects, quarantined, stage latency."""
        snap = self.metrics.snapshot()
        lat = np.asarray(self.latencies) * 1e3
        with self._lock:
            incomplete = [i for i in list(self.incomplete) if acq is None or i["stack"].startswith(acq + " ")]
            by_error = dict(self.errors)
            total_incomplete = self.incomplete_total
        return {
            "acquisition_id": acq,
            "sender_messages": end.n_messages if end else None,
            "counters": snap["counters"],
            "stages": snap["stages"],
            "incomplete_stacks": incomplete[-MAX_LISTED:],
            "incomplete_total": total_incomplete,
            "rejected_by_error": by_error,
            "quarantined": self.ledger.quarantined(MAX_LISTED),
            "quarantined_total": self.ledger.n_quarantined,
            "latency_ms": {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99))}
            if lat.size else {},
        }

    def status(self) -> ProcessorStatus:
        """A consistent, bounded snapshot for the service's status reply, ``rllsm status`` and the demo."""
        runs = list(self.router.runs.items())
        drops: dict[str, int] = {}
        for acq, run in runs[-MAX_LISTED:]:
            if run.outputs is not None:
                drops.update({clip(k, 200): v for k, v in run.outputs.drops(acq).items()})
        with self._lock:
            errors, last = dict(self.errors), tuple(self.last_errors)
            incomplete, n_inc = tuple(self.incomplete), self.incomplete_total
            summaries, n_sum = tuple(self.summaries), self.summaries_total
        state = RunState.finished if self._finished else (RunState.running if runs else RunState.idle)
        return ProcessorStatus(
            state=state, errors_by_type=errors, last_errors=last, incomplete_stacks=incomplete,
            incomplete_total=n_inc, quarantined=tuple(self.ledger.quarantined(MAX_LISTED)),
            quarantined_total=self.ledger.n_quarantined, open_stacks=self.assembler.n_open,
            open_acquisitions=tuple(clip(a, 140) for a, _ in runs[-MAX_LISTED:]),
            gpu_in_flight=self.router.in_flight, output_drops=drops, done_stacks=len(self.ledger.done),
            summaries=summaries, summaries_total=n_sum,
        )

    def finish(self, reason: str = "service stopped") -> None:
        """Flush open stacks (flagged incomplete), drain the workers, close every output and the ledger."""
        for st in self.assembler.flush(reason):
            self._process_safely(st)
        for acq in list(self.router.runs):
            self._finish_acquisition(acq, None)
        self._finished = True
        self.ledger.close()

    def close_outputs_after_error(self) -> None:
        """After a critical failure: close what can be closed, ignoring further errors."""
        for run in list(self.router.runs.values()):
            if run.outputs is not None:
                run.outputs.close_quietly()
        self.router.runs.clear()
        self.ledger.close()
