"""The consumer behind the recording: decode → assemble → stage chain → sinks, shared by ``serve`` and ``replay``.

One :class:`StackProcessor` runs in one thread. It is fed messages in recording order (``handle``) and clock ticks
(``tick``); it has no socket and no clock of its own, so an offline replay of a recording produces exactly the volumes
the live run did. Every rejected message is counted by error type and logged (rate-limited), never raised: the
service never crashes on input. A *critical* sink failing raises :class:`CriticalOutputError`, which stops the run.

Resume after a crash: each stack whose outputs are written is appended to ``done.log``; on restart, records of stacks
in that log are skipped by header (their payloads are not even read) and every other stack is processed again.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streamer.assembly import AssembledStack, StackAssembler, StackKey, StackOutOfRange, StackTooLarge
from streamer.pipeline import PipelineError, Stage, StageWorker
from streamer.sinks.base import Sink, SinkError, SinkStats, VolumeIndex, VolumeMeta
from streamer.wire import AcquisitionEnd, AcquisitionStart, Frame, Stack, WireError, decode, decode_header

log = logging.getLogger(__name__)

SinkFactory = Callable[[VolumeMeta], Sequence[tuple[Sink, bool]]]  # → (sink, critical) pairs
StageFactory = Callable[[AcquisitionStart], Sequence[Stage]]


class CriticalOutputError(RuntimeError):
    """A critical output (recording, disk writer) failed; the run stops cleanly, the recording stays intact."""


class NpyDirSink:
    """Each volume as ``DIR/<acquisition>/t00000_c0.npy`` (written under a temporary name, then renamed).

    The simplest resumable output: a restarted service rewrites exactly the files that are missing, and tests
    compare live and replayed outputs file by file.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.name = "npy"
        self.stats = SinkStats()
        self._dir: Path | None = None

    def setup(self, meta: VolumeMeta) -> None:
        self._dir = self.directory / meta.acquisition_id
        self._dir.mkdir(parents=True, exist_ok=True)

    def _path(self, index: VolumeIndex, suffix: str) -> Path:
        assert self._dir is not None
        return self._dir / f"t{index.timepoint:05d}_c{index.channel}{suffix}"

    def append(self, volume: np.ndarray, index: VolumeIndex) -> None:
        path = self._path(index, ".npy")
        tmp = path.with_suffix(".npy.tmp")
        with open(tmp, "wb") as fh:
            np.save(fh, volume)
        os.replace(tmp, path)
        self.stats.written += 1
        self.stats.bytes_written += volume.nbytes

    def skip(self, index: VolumeIndex, reason: str) -> None:
        self._path(index, ".skipped.txt").write_text(reason + "\n")
        self.stats.skipped[index] = reason

    def close(self) -> None:
        self._dir = None


@dataclass
class _Outputs:
    meta: VolumeMeta
    sinks: list[tuple[Sink, bool]]
    handed: int = 0  # volumes (or skips) handed to the sinks
    waiting: deque[tuple[int, StackKey, bool]] = field(default_factory=deque)  # (handed no., key, complete)


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
    timeout_s, max_open
        Assembly: incomplete-stack timeout and memory bound (see :class:`StackAssembler`).
    done_log
        File recording which stacks are fully output (for resume); None disables resume.
    device
        Compute device of the stage worker.
    worker_factory
        ``AcquisitionStart → worker`` with :class:`StageWorker`'s interface, used instead of ``stage_factory`` (e.g.
        :class:`streamer.distributed.live.DaskStageWorker`); it may hand back an exception as a stack's result.
    """

    def __init__(
        self, stage_factory: StageFactory, sink_factory: SinkFactory, metrics: Any, *, timeout_s: float = 5.0,
        max_open: int = 64, done_log: str | os.PathLike[str] | None = None, device: str | None = None,
        process_incomplete: bool = False, max_stack_bytes: int = 8 << 30,
        worker_factory: Callable[[AcquisitionStart], Any] | None = None,
    ) -> None:
        self.stage_factory = stage_factory
        self.worker_factory = worker_factory
        self.sink_factory = sink_factory
        self.metrics = metrics
        self.assembler = StackAssembler(timeout_s=timeout_s, max_open=max_open, max_stack_bytes=max_stack_bytes)
        self.device = device
        self.process_incomplete = process_incomplete
        self.starts: dict[str, AcquisitionStart] = {}
        self.workers: dict[str, StageWorker] = {}
        self.outputs: dict[str, _Outputs] = {}
        self.errors: Counter[str] = Counter()
        self.last_errors: deque[str] = deque(maxlen=20)
        self.incomplete: deque[dict[str, Any]] = deque(maxlen=100_000)  # bounded: a flood must not exhaust memory
        self.summaries: list[dict[str, Any]] = []
        self.done: set[StackKey] = set()
        self.latencies: deque[float] = deque(maxlen=4096)  # last message received → volume output (s)
        self._done_fh = None
        if done_log is not None:
            self.done = _read_done(Path(done_log))
            self._done_fh = open(done_log, "a", buffering=1)
        for name in ("messages_processed", "messages_rejected", "stacks_complete", "stacks_incomplete",
                     "volumes_output", "display_errors", "stage_errors"):
            metrics.declare(name)

    # --- input ------------------------------------------------------------------------------------------------

    def handle(self, parts: Sequence[Any], *, record: int = -1, received_at: float | None = None) -> None:
        """Process one received message; a malformed one is counted and logged, never raised."""
        now = time.time() if received_at is None else received_at
        self._expire(now)
        try:
            header, array = decode(parts, strict=True)
            self.metrics.inc("messages_processed")
            if isinstance(header, Frame):
                ready = self.assembler.add_frame(header, array, now=now, record=record)
            elif isinstance(header, Stack):
                ready = [self.assembler.add_stack(header, array, now=now, record=record)]
            elif isinstance(header, AcquisitionStart):
                self._start(header)
                ready = []
            else:
                assert isinstance(header, AcquisitionEnd)
                ready = self.assembler.end(header.acquisition_id, "acquisition ended before this stack was whole")
        except WireError as err:
            self._reject(err, record)
            return
        except MemoryError:  # a plausible-looking stack that still does not fit: reject it, keep serving
            self._reject(StackTooLarge("not enough memory to assemble this stack"), record)
            return
        for st in ready:
            self._process(st)
        if isinstance(header, AcquisitionEnd):
            self._finish_acquisition(header.acquisition_id, header)

    def skip_if_done(self, head: bytes) -> bool:
        """For resume: True if this record's stack is already output (so its payload need not be read)."""
        if not self.done:
            return False
        try:
            h = decode_header(head)
        except WireError:
            return False
        if isinstance(h, (Frame, Stack)):
            return StackKey(h.acquisition_id, h.timepoint, h.channel) in self.done
        return False

    def tick(self, now: float | None = None) -> None:
        """Flag stacks whose planes stopped arriving; collect finished GPU work."""
        self._expire(time.time() if now is None else now)
        for worker in list(self.workers.values()):
            for token, volume in worker.poll():
                self._deliver(token, volume)

    def _expire(self, now: float) -> None:
        for st in self.assembler.expire(now):
            self._process(st)

    def _reject(self, err: WireError, record: int) -> None:
        kind = type(err).__name__
        self.errors[kind] += 1
        self.metrics.inc("messages_rejected", labels={"error": kind})
        self.metrics.inc("messages_rejected")
        msg = f"record {record}: {kind}: {err}"
        self.last_errors.append(msg)
        n = self.errors[kind]
        # One line per error type while they are rare, then every 1000th: a flood must not flood the log.
        if n <= 10 or n % 1000 == 0:
            log.warning("rejected message (%s of this kind so far) %s", n, msg)

    def _start(self, start: AcquisitionStart) -> None:
        if start.acquisition_id in self.starts:
            log.info("acquisition %s started again (restart or replay); keeping its outputs", start.acquisition_id)
        self.starts[start.acquisition_id] = start

    def _start_of(self, key: StackKey, data: np.ndarray) -> AcquisitionStart:
        s = self.starts.get(key.acquisition_id)
        if s is None:  # frames without a start message: default optics, said once
            log.warning("acquisition %s: no acquisition_start received; using default optics", key.acquisition_id)
            s = AcquisitionStart(acquisition_id=key.acquisition_id, seq=0, z_count=data.shape[0],
                                 frame_shape=data.shape[1:], dtype=data.dtype.name)
            self.starts[key.acquisition_id] = s
        return s

    # --- processing -------------------------------------------------------------------------------------------

    def _out_of_range(self, key: StackKey) -> str | None:
        """Why a stack lies outside what its acquisition announced (the OME writers cannot place it), or None."""
        start = self.starts.get(key.acquisition_id)
        if start is None:
            return None
        n_c = len(start.channels)
        if key.channel >= n_c:
            return f"{key.label()}: channel {key.channel}, but the acquisition announced {n_c} channel{'s' * (n_c > 1)}"
        n_t = start.n_timepoints
        if n_t is not None and key.timepoint >= n_t:
            return (f"{key.label()}: timepoint {key.timepoint}, but the acquisition announced {n_t} "
                    f"timepoint{'s' * (n_t > 1)}")
        return None

    def _process(self, st: AssembledStack) -> None:
        why = self._out_of_range(st.key)
        if why is not None:
            # rejected before any output sees it: a critical writer refusing it would stop the whole service
            self._reject(StackOutOfRange(why), st.records[1])
            self._mark_done(st.key, False)
            return
        if st.complete:
            self.metrics.inc("stacks_complete")
        else:
            self.metrics.inc("stacks_incomplete")
            info = {"stack": st.key.label(), "missing_planes": list(st.missing), "reason": st.reason,
                    "records": list(st.records)}
            self.incomplete.append(info)
            log.warning("stack %s incomplete (%s): missing planes %s", st.key.label(), st.reason,
                        _ranges(st.missing))
            if not self.process_incomplete:
                self._skip(st, f"incomplete: {st.reason}; missing planes {_ranges(st.missing)}")
                return
        acq = st.key.acquisition_id
        worker = self.workers.get(acq)
        if worker is None:
            try:
                if self.worker_factory is not None:
                    self.workers[acq] = worker = self.worker_factory(self._start_of(st.key, st.data))
                else:
                    stages = self.stage_factory(self._start_of(st.key, st.data))
            except Exception as err:  # missing weights, unusable optics...: say so for every stack, keep recording
                self.metrics.inc("stage_errors")
                msg = f"cannot build the reconstruction for {acq}: {type(err).__name__}: {err}"
                self.last_errors.append(msg)
                log.error("%s", msg)
                self._skip(st, msg)
                return
            if worker is None:
                worker = self.workers[acq] = StageWorker(stages, device=self.device, observe=self.metrics.observe)
        try:
            finished = worker.submit(st.data, st)
        except PipelineError as err:  # one bad stack must not stop the stream: count it, say which, go on
            self.metrics.inc("stage_errors")
            self.last_errors.append(str(err))
            log.error("%s", err)
            self._skip(st, f"processing failed: {err}")
            return
        for token, volume in finished:
            self._deliver(token, volume)

    def _outputs_for(self, key: StackKey, shape: tuple[int, ...], dtype: str) -> _Outputs:
        out = self.outputs.get(key.acquisition_id)
        if out is None:
            start = self.starts.get(key.acquisition_id)
            meta = VolumeMeta.from_start(start, shape=tuple(shape), dtype=dtype) if start else VolumeMeta(
                key.acquisition_id, tuple(shape), dtype, (1.0, 1.0, 1.0))
            sinks = list(self.sink_factory(meta))
            for sink, critical in sinks:
                self._guard(sink, critical, "setup", lambda s=sink: s.setup(meta))
            out = self.outputs[key.acquisition_id] = _Outputs(meta, sinks)
        return out

    def _guard(self, sink: Sink, critical: bool, what: str, call: Callable[[], Any]) -> None:
        try:
            call()
        except (SinkError, OSError) as err:
            if critical:
                raise CriticalOutputError(f"output '{sink.name}' failed at {what}: {err}") from err
            self.metrics.inc("display_errors")
            log.warning("output '%s' %s failed (non-critical, skipped): %s", sink.name, what, err)

    def _deliver(self, st: AssembledStack, volume: np.ndarray | BaseException) -> None:
        if isinstance(volume, BaseException):  # a remote worker's failure on this stack: as a stage error here
            self.metrics.inc("stage_errors")
            self.last_errors.append(str(volume))
            log.error("%s", volume)
            self._skip(st, f"processing failed: {volume}")
            return
        if volume.ndim != 3:  # the outputs cannot even be described by it: a stage error, not a service failure
            self.metrics.inc("stage_errors")
            msg = (f"stack {st.key.label()}: the reconstruction returned a {volume.ndim}D array "
                   f"{'×'.join(map(str, volume.shape))}, not a (z, y, x) volume")
            self.last_errors.append(msg)
            log.error("%s", msg)
            self._skip(st, msg)
            return
        out = self._outputs_for(st.key, volume.shape, volume.dtype.name)
        index = VolumeIndex(st.key.timepoint, st.key.channel)
        if tuple(volume.shape) != tuple(out.meta.shape) or volume.dtype != np.dtype(out.meta.dtype):
            # e.g. a sender that changed the frame size mid-acquisition: this stack is refused, the output goes on
            self.metrics.inc("stage_errors")
            msg = (f"stack {st.key.label()}: volume is {'×'.join(map(str, volume.shape))} {volume.dtype}, but this "
                   f"acquisition's output was set up for {'×'.join(map(str, out.meta.shape))} {out.meta.dtype}")
            self.last_errors.append(msg)
            log.error("%s", msg)
            self._skip(st, msg)
            return
        for sink, critical in out.sinks:
            self._guard(sink, critical, f"append {index.label()}", lambda s=sink: s.append(volume, index))
        self.metrics.inc("volumes_output")
        if st.received_at:
            self.latencies.append(time.time() - st.received_at)
        self._handed(out, st.key, True)

    def _skip(self, st: AssembledStack, reason: str) -> None:
        # the geometry of the fused volume is not known before the first one; a skip before it needs no output
        out = self.outputs.get(st.key.acquisition_id)
        if out is None:
            self._mark_done(st.key, False)
            return
        index = VolumeIndex(st.key.timepoint, st.key.channel)
        for sink, critical in out.sinks:
            self._guard(sink, critical, f"skip {index.label()}", lambda s=sink: s.skip(index, reason))
        self._handed(out, st.key, False)

    def _handed(self, out: _Outputs, key: StackKey, complete: bool) -> None:
        out.handed += 1
        out.waiting.append((out.handed, key, complete))
        self._confirm(out)

    def _confirm(self, out: _Outputs) -> None:
        """Write done.log entries for stacks every critical sink has written (or recorded as skipped)."""
        criticals = [s for s, c in out.sinks if c]
        level = min((s.stats.written + len(s.stats.skipped) for s in criticals), default=out.handed)
        while out.waiting and out.waiting[0][0] <= level:
            _, key, complete = out.waiting.popleft()
            self._mark_done(key, complete)

    def _mark_done(self, key: StackKey, complete: bool) -> None:
        self.done.add(key)
        if self._done_fh is not None:
            self._done_fh.write(json.dumps([key.acquisition_id, key.timepoint, key.channel, complete]) + "\n")

    def _finish_acquisition(self, acq: str, end: AcquisitionEnd | None) -> None:
        worker = self.workers.pop(acq, None)
        if worker is not None:
            for token, volume in worker.drain():
                self._deliver(token, volume)
        out = self.outputs.pop(acq, None)
        if out is not None:
            for sink, critical in out.sinks:
                self._guard(sink, critical, "close", sink.close)
            self._confirm(out)
        self.summaries.append(self.summary(acq, end))
        log.info("acquisition %s finished: %s", acq, json.dumps(self.summaries[-1]))

    def summary(self, acq: str | None = None, end: AcquisitionEnd | None = None) -> dict[str, Any]:
        """End-of-acquisition report: stacks, incomplete ones with their missing planes, rejects, stage latency."""
        snap = self.metrics.snapshot()
        lat = np.asarray(self.latencies) * 1e3
        return {
            "acquisition_id": acq,
            "sender_messages": end.n_messages if end else None,
            "counters": snap["counters"],
            "stages": snap["stages"],
            # list() copies in one step: the control thread may ask while the processor appends
            "incomplete_stacks": [i for i in list(self.incomplete) if acq is None or i["stack"].startswith(acq + " ")],
            "rejected_by_error": dict(self.errors),
            "latency_ms": {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99))}
            if lat.size else {},
        }

    def finish(self, reason: str = "service stopped") -> None:
        """Flush open stacks (flagged incomplete), drain the workers, close every output."""
        for st in self.assembler.flush(reason):
            self._process(st)
        for acq in list(self.workers) + [a for a in self.outputs if a not in self.workers]:
            if acq in self.workers or acq in self.outputs:
                self._finish_acquisition(acq, None)
        if self._done_fh is not None:
            self._done_fh.close()
            self._done_fh = None

    def close_outputs_after_error(self) -> None:
        """After a critical failure: close what can be closed, ignoring further errors."""
        for out in self.outputs.values():
            for sink, _ in out.sinks:
                try:
                    sink.close()
                except Exception as err:  # already failing; say so and go on closing the rest
                    log.warning("closing output '%s' after an error: %s", sink.name, err)
        self.outputs.clear()
        if self._done_fh is not None:
            self._done_fh.close()
            self._done_fh = None


def _read_done(path: Path) -> set[StackKey]:
    done: set[StackKey] = set()
    if not path.exists():
        return done
    for line in path.read_text().splitlines():
        try:  # the last line may be torn by a kill; it is simply redone
            acq, t, c, _ = json.loads(line)
            done.add(StackKey(str(acq), int(t), int(c)))
        except (ValueError, TypeError):
            continue
    return done


def _ranges(zs: Sequence[int]) -> str:
    """[0,1,2,5,7,8] → '0-2,5,7-8' (readable lists of missing planes)."""
    out, i = [], 0
    zs = list(zs)
    while i < len(zs):
        j = i
        while j + 1 < len(zs) and zs[j + 1] == zs[j] + 1:
            j += 1
        out.append(str(zs[i]) if i == j else f"{zs[i]}-{zs[j]}")
        i = j + 1
    return ",".join(out)
