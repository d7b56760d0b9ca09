"""``rllsm serve``: ZMQ ingest → recording → processing → outputs, with a control socket for ``rllsm status``.

Threads and the policy between them:

* **ingest** (PULL): receives each multipart message and appends it to the recording *before anything else*; only
  then is it counted as received. It never waits for processing: it hands the message to a bounded in-memory cache
  and, if the cache is full, simply does not cache it (``messages_spilled``) — the processor reads it back from the
  recording later. So the raw path never drops, ingest runs at disk speed, and processing lags and catches up.
* **processor**: walks the recording in order (cache first, disk otherwise) through a
  :class:`~streamer.processor.StackProcessor`. A critical output failing stops the service cleanly.
* **control** (REP): answers ``status``, ``summary`` and ``stop`` as JSON.

Restarting on the same recording resumes: a torn tail is cut, stacks already output are skipped, every other
recorded stack is processed.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Literal

import zmq
from pydantic import Field, model_validator

from engines.backends.select import BackendConfig
from engines.sources import ReconSources
from engines.errors import RllsmRuntimeError
from engines.support import MemoryBudgetMiB, StrictModel, bytes_to_mib, mib_to_bytes
from streamer.metrics import Metrics, MetricsError
from streamer.pipeline import PipelineMode, Stage, build_stages
from streamer.decoding import make_work_check
from streamer.ledger import ResumeLedger
from streamer.processor import CriticalOutputError, SinkFactory, StackProcessor, StageFactory
from streamer.status import MAX_LISTED
from streamer.textlimits import clip
from streamer.recording import RecordingError, RecordingWriter
from streamer.security import CurveServer, SecurityError, check_bind, check_local_bind, secure_server_socket

log = logging.getLogger(__name__)
SERVICE_CONFIG_VERSION = 1
# A batch is recorded with one writev: up to _BATCH messages, but not beyond _BATCH_BYTES, because a big frame is
# best written right after it arrived, while it is still in the CPU cache (measured: batching 512 KB frames by 4 or
# 16 made the service 2× slower on the 2-core benchmark machine); small messages gain from fewer system calls.
_BATCH = 16
_BATCH_BYTES = 256 << 10


class ServiceError(RllsmRuntimeError):
    """The service cannot start or had to stop; the text says why."""


class ServiceConfig(StrictModel):
    """Everything ``rllsm serve`` needs; every field has a CLI flag of the same name."""

    version: Literal[1] = SERVICE_CONFIG_VERSION
    ingest: str = Field("tcp://127.0.0.1:5555", description="Where the PULL socket binds (port 0: a free one).")
    control: str = Field("tcp://127.0.0.1:5557", description="Where the REP status/control socket binds.")
    recording: Path = Field(description="Recording folder; every received message is appended here first.")
    output: Path | None = Field(None, description="Folder for the fused volumes (None: record and report only).")
    output_format: Literal["zarr", "npy", "tiff"] = "zarr"
    display: str | None = Field(None, description="Display PUB endpoint (e.g. tcp://127.0.0.1:5556); None: off.")
    mode: PipelineMode = PipelineMode.classical
    device: str | None = Field(None, description="cpu, cuda, cuda:1; default: CUDA if torch sees one.")
    weights: Path | None = Field(None, description="Network weights folder for mode 'full' (default: demo weights).")
    sources: ReconSources = Field(default_factory=ReconSources,
                                  description="Model files as for `rllsm reconstruct`: VSI-SR checkpoint, OTF folder, "
                                  "RL-DFN weights, measured PSFs (and/or a weights folder).")
    fused_depth: int | None = Field(None, ge=1, le=100_000,
                                    description="Planes of the fused output grid (default: fixed from the optics and "
                                    "the first stack; later stacks are placed into it, anchored on the mirror).")
    backend: BackendConfig = Field(default_factory=BackendConfig,
                                   description="What runs the networks in mode 'full' (torch, onnxruntime, tensorrt).")
    stack_timeout_s: float = Field(5.0, gt=0, le=3600, description="Flag a stack incomplete after this silence.")
    max_open_stacks: int = Field(64, ge=1, le=100_000)
    max_stack_gb: float = Field(8.0, gt=0, le=4096, description="Largest stack accepted; bigger ones are rejected.")
    cache_messages: int = Field(256, ge=1, le=1_000_000, description="Messages kept in memory for the processor.")
    cache_mb: float = Field(64.0, gt=0, le=1 << 20,
                            description="Bytes of messages kept in memory for the processor (the rest is read back "
                            "from the recording).")
    max_message_mb: float = Field(2048.0, gt=0, le=1 << 22,
                                  description="Largest message part accepted; a bigger one is refused by ZMQ before "
                                  "it is allocated (the sender is disconnected).")
    memory_budget_mib: MemoryBudgetMiB | None = Field(
        None, description="Memory one stack's reconstruction may use, in MiB (2**20 bytes): a stack needing more is "
        "refused before anything is allocated, and RL-DFN tiles are sized to fit it (default: the larger of 8 GiB "
        "and half the RAM for refusing, the device's free memory for tiles).")

    @model_validator(mode="before")
    @classmethod
    def _budget_in_gb(cls, data: Any) -> Any:
        """Configs written before the one unit (MiB) said ``memory_budget_gb`` (GB = 1e9 bytes): converted, warned."""
        if isinstance(data, dict) and "memory_budget_gb" in data and "memory_budget_mib" not in data:
            import warnings

            data = dict(data)
            gb = data.pop("memory_budget_gb")
            if gb is not None:
                try:
                    data["memory_budget_mib"] = bytes_to_mib(float(gb) * 1e9)
                except (TypeError, ValueError):
                    data["memory_budget_mib"] = gb  # let the field's own validation name the bad value
                warnings.warn("ServiceConfig.memory_budget_gb is deprecated; use memory_budget_mib (MiB)",
                              FutureWarning, stacklevel=2)
        return data
    max_acquisitions: int = Field(16, ge=1, le=4096, description="Acquisitions open at once (outputs, workers).")
    writer_threads: int = Field(4, ge=1, le=64, description="Threads writing the outputs of every acquisition (a "
                                "fixed pool, plus one for the display).")
    acquisition_idle_s: float = Field(600.0, gt=0, le=1e7,
                                      description="Close an acquisition's outputs after this silence (reopened by "
                                      "its next message).")
    rcvhwm: int = Field(1000, ge=1, le=1_000_000, description="ZMQ receive high-water mark of the ingest socket.")
    fsync_every: int = Field(0, ge=0, description="fsync the recording every N messages (0: never).")
    keys: Path | None = Field(None, description="CURVE key folder (see `rllsm serve --gen-keys`).")
    process_incomplete: bool = Field(False, description="Reconstruct incomplete stacks (zero-filled) too.")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Prometheus /metrics port; None: off.")
    scheduler: str | None = Field(None, description="Dask scheduler to reconstruct on (docs/distributed.md); None: "
                                  "in this process.")
    max_in_flight: int = Field(4, ge=1, le=10_000, description="With a scheduler: stacks out on the cluster at most.")


class Service:
    """The live service; :meth:`start` returns once the sockets are bound, :meth:`stop` ends it cleanly.

    Parameters
    ----------
    config
        Endpoints, folders and policies.
    stage_factory
        ``start → stages``; default :func:`streamer.pipeline.build_stages` with ``config.mode``.
    sink_factory
        ``VolumeMeta → [(sink, critical)]``; default from ``config.output``/``output_format``/``display``.
    context
        ZMQ context (default: a new one, terminated at stop).
    """

    def __init__(
        self, config: ServiceConfig, *, stage_factory: StageFactory | None = None,
        sink_factory: SinkFactory | None = None, context: zmq.Context | None = None,
    ) -> None:
        self.config = config
        self.metrics = Metrics()
        self._own_ctx = context is None
        self.ctx = context or zmq.Context()
        self.default_stages_fn = self._default_stages
        self.stage_factory = stage_factory or self.default_stages_fn
        self.sink_factory = sink_factory or self.default_sinks
        self.error: BaseException | None = None
        self.stopped = threading.Event()
        self._stop = threading.Event()
        self._ingest_done = threading.Event()  # the ingest thread has recorded and published its last message
        self._cond = threading.Condition()
        self._cache: deque[tuple[int, list[Any], float, int]] = deque()
        self._cache_bytes = 0
        self._cursor = 0  # next record the processor handles
        self._stamp: float | None = None  # arrival time of the oldest message received but not yet handed over
        self._published = 0  # records [0, _published) are written and may be processed
        self._threads: list[threading.Thread] = []
        self._curve: CurveServer | None = None
        self._display_pub: Any = None
        self.recording: RecordingWriter | None = None
        self.processor: StackProcessor | None = None
        self.ingest_endpoint = self.control_endpoint = self.display_endpoint = ""
        self.final_summary: dict[str, Any] | None = None
        self._pools: dict[str, Any] = {}  # shared writer threads, created with the first output
        self.datasets: dict[str, str] = {}  # acquisition id -> OME-Zarr/OME-TIFF path, for viewers (status)
        for c in ("messages_received", "bytes_received", "messages_spilled"):
            self.metrics.declare(c)

    # --- defaults -------------------------------------------------------------------------------------------------

    def _default_stages(self, start: Any) -> list[Stage]:
        weights = str(self.config.weights) if self.config.weights is not None else None
        return build_stages(self.config.mode, start.optics, device=self.config.device, weights=weights,
                            backend=self.config.backend, sources=self.config.sources,
                            fused_depth=self.config.fused_depth, memory_budget_mib=self.config.memory_budget_mib)

    def _pool(self, name: str, n: int) -> Any:
        from streamer.sinks.pool import WriterPool

        if name not in self._pools:
            self._pools[name] = WriterPool(n, f"rllsm-{name}")
        return self._pools[name]

    def default_sinks(self, meta: Any) -> list[tuple[Any, bool]]:
        from streamer.sinks import ThreadedSink
        from streamer.sinks.factory import disk_outputs

        cfg = self.config
        # one place opens the disk outputs for serve, replay and demo (a restart resumes the same dataset); their
        # writers share a fixed pool of threads, however many acquisitions are open
        out = disk_outputs(cfg.output_format, cfg.output, meta, threaded=True, metrics=self.metrics,
                           pool=self._pool("writer", cfg.writer_threads))
        if cfg.output is not None and cfg.output_format != "npy":  # named in status, for viewers to follow
            from streamer.sinks.factory import output_path

            self.datasets.pop(meta.acquisition_id, None)  # most recent last: viewers follow the last one
            self.datasets[meta.acquisition_id] = str(output_path(cfg.output_format, cfg.output, meta.acquisition_id))
            while len(self.datasets) > MAX_LISTED:  # the status reply stays bounded, however many acquisitions
                self.datasets.pop(next(iter(self.datasets)))
        if self._display_pub is not None:
            from streamer.display import DisplaySink

            out.append((ThreadedSink(DisplaySink(self._display_pub), queue_size=1, on_full="drop_oldest",
                                     critical=False, metrics=self.metrics, pool=self._pool("display", 1)), False))
        return out

    # --- lifecycle ------------------------------------------------------------------------------------------------

    def start(self) -> Service:
        """Open the recording (repairing a torn tail), bind the sockets, start the threads."""
        cfg = self.config
        check_bind(cfg.ingest, cfg.keys)
        # The control socket can stop the service and is not encrypted: it never leaves this machine.
        check_local_bind(cfg.control, "control (--control)", cfg.keys)
        if cfg.display is not None:  # the display stream is not encrypted either
            check_local_bind(cfg.display, "display (--display)", cfg.keys)
        reconstructing = cfg.mode in (PipelineMode.full, PipelineMode.sr_rl, PipelineMode.classical)
        if reconstructing and self.stage_factory == self.default_stages_fn:
            try:
                import engines.reconstruct  # noqa: F401  (fail at start, not at the first stack)
            except ImportError as err:
                raise ServiceError(f"mode '{cfg.mode}' needs engines.reconstruct: {err}") from None
        self._dask, workers = None, None
        if cfg.scheduler is not None and cfg.mode is not PipelineMode.none:  # the chain runs on the cluster
            from streamer.distributed.live import connect_live

            self._dask, workers = connect_live(cfg, self.metrics, self._close_resources)
        try:
            self.recording = RecordingWriter(cfg.recording, fsync_every=cfg.fsync_every)
        except RecordingError as err:
            self._close_resources()
            raise ServiceError(str(err)) from None
        self.metrics.set_gauge("recording_recovered_bytes", self.recording.recovered_bytes)
        budget = memory_budget_bytes(cfg.memory_budget_mib)
        try:
            ledger = ResumeLedger(cfg.recording)
        except OSError as err:
            self._close_resources()
            raise ServiceError(f"cannot open the resume ledger in {cfg.recording}: {err}") from None
        self.processor = StackProcessor(
            self.stage_factory, self.sink_factory, self.metrics, timeout_s=cfg.stack_timeout_s,
            max_open=cfg.max_open_stacks, ledger=ledger, device=cfg.device,
            process_incomplete=cfg.process_incomplete, max_stack_bytes=min(int(cfg.max_stack_gb * 1e9), budget),
            max_open_bytes=budget,
            max_acquisitions=cfg.max_acquisitions, idle_s=cfg.acquisition_idle_s,
            work_check=make_work_check(cfg.mode, budget), worker_factory=workers,
        )
        self._resume_from = self._published = len(self.recording)
        pull = self.ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.RCVHWM, cfg.rcvhwm)
        pull.setsockopt(zmq.MAXMSGSIZE, int(cfg.max_message_mb * (1 << 20)))
        pull.setsockopt(zmq.LINGER, 0)
        rep = self.ctx.socket(zmq.REP)
        rep.setsockopt(zmq.LINGER, 0)
        try:
            if cfg.keys is not None:
                self._curve = secure_server_socket(self.ctx, pull, cfg.keys)
            pull.bind(cfg.ingest)
            rep.bind(cfg.control)
        except (zmq.ZMQError, SecurityError) as err:
            self._abort_start(pull, rep)
            if isinstance(err, SecurityError):
                raise
            raise ServiceError(f"cannot listen on {cfg.ingest} / {cfg.control}: {err}") from None
        if cfg.display is not None:
            from streamer.display import DisplayConfig, DisplayError, DisplayPublisher

            try:  # bound at start (not at the first volume) so viewers can subscribe before data arrive
                self._display_pub = DisplayPublisher(DisplayConfig(endpoint=cfg.display), context=self.ctx,
                                                     metrics=self.metrics)
            except DisplayError as err:
                self._abort_start(pull, rep)
                raise ServiceError(str(err)) from None
            self.display_endpoint = self._display_pub.endpoint
        self.ingest_endpoint = pull.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.control_endpoint = rep.getsockopt(zmq.LAST_ENDPOINT).decode()
        if cfg.metrics_port is not None:
            try:
                self.metrics.serve_http(cfg.metrics_port)
            except MetricsError:
                self._abort_start(pull, rep)
                raise
        for name, target, arg in (("ingest", self._ingest, pull), ("processor", self._process_loop, None),
                                  ("control", self._control, rep)):
            t = threading.Thread(target=target, args=(arg,) if arg is not None else (), name=f"rllsm-{name}",
                                 daemon=True)
            t.start()
            self._threads.append(t)
        log.info("serving: ingest %s, control %s, recording %s (%d records already there)",
                 self.ingest_endpoint, self.control_endpoint, cfg.recording, self._resume_from)
        return self

    def _abort_start(self, pull: zmq.Socket, rep: zmq.Socket) -> None:
        """A start that failed after the recording was opened: release everything it took, so that the caller (or a
        test) can start again on the same recording and ports."""
        pull.close(0)
        rep.close(0)
        if self.processor is not None:  # no thread ran: only its done.log handle is open
            self.processor.close_outputs_after_error()
        self._close_resources()

    def _fail(self, err: BaseException) -> None:
        if self.error is None:
            self.error = err
            log.error("stopping: %s", err)
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def stop(self, timeout: float | None = None) -> dict[str, Any]:
        """Stop receiving, finish processing what was received, close outputs; returns the final summary.

        Waits for the processor to work through its backlog (``timeout`` None: however long that takes; the
        recording is complete either way, and a restart would resume).
        """
        if self.stopped.is_set():
            return self.final_summary or {}
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout)
        self._close_resources()
        self.stopped.set()
        return self.final_summary or {}

    def _close_resources(self) -> None:
        for pool in self._pools.values():  # the processor closed every output: the writers have nothing left
            pool.close()
        self._pools.clear()
        if getattr(self, "_dask", None) is not None:
            self._dask.close()
            self._dask = None
        if self._curve is not None:
            self._curve.close()
            self._curve = None
        if self._display_pub is not None:
            self._display_pub.close()
            self._display_pub = None
        if self.recording is not None:
            self.recording.close()
        self.metrics.close()
        if self._own_ctx:
            self.ctx.term()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the service stops (a ``stop`` request or a critical error); True if it did."""
        if not self._stop.wait(timeout):
            return False
        self.stop()
        return True

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- threads --------------------------------------------------------------------------------------------------

    def _ingest(self, sock: zmq.Socket) -> None:
        rec = self.recording
        assert rec is not None
        cache_max = self.config.cache_messages
        cache_max_bytes = int(self.config.cache_mb * (1 << 20))
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if not poller.poll(100):
                    continue
                # Drain what is there without polling again (the poll costs more than a receive at high rates).
                # Messages are recorded in batches of up to _BATCH: one writev for their data and one write for
                # their index entries; only then are they counted and handed to the processor, with one lock and
                # one wake-up per batch (per message, the hand-off cost the ingest thread the GIL at high rates).
                n = nbytes = spilled = 0
                try:
                    for _ in range(256):  # then poll again, so that a stop request is seen
                        batch: list[list[Any]] = []
                        times: list[float] = []
                        size = 0
                        while len(batch) < _BATCH and size < _BATCH_BYTES:
                            try:
                                parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                            except zmq.Again:
                                break
                            now = time.time()
                            if self._stamp is None:  # see _clock: no stack may time out "before" these are processed
                                self._stamp = now
                            batch.append(parts)
                            times.append(now)
                            size += sum(len(p) for p in parts)
                        if not batch:
                            break
                        first = rec.append_many(batch, times)
                        n += len(batch)
                        nbytes += size
                        with self._cond:
                            # bounded by count and by bytes: what does not fit is read back from the recording
                            for k, parts in enumerate(batch):
                                nb = sum(len(p) for p in parts)
                                if len(self._cache) >= cache_max or self._cache_bytes + nb > cache_max_bytes:
                                    spilled += 1
                                    continue
                                self._cache.append((first + k, parts, times[k], nb))
                                self._cache_bytes += nb
                            self._published = first + len(batch)
                            self._stamp = None
                            self._cond.notify()
                        if len(batch) < _BATCH and size < _BATCH_BYTES:  # drained
                            break
                except RecordingError as err:
                    self.metrics.inc("recording_errors")
                    self._fail(CriticalOutputError(str(err)))
                    return
                finally:
                    if n:
                        self.metrics.inc("messages_received", n)
                        self.metrics.inc("bytes_received", nbytes)
                        self.metrics.add_throughput("ingest", n, nbytes)
                    if spilled:
                        self.metrics.inc("messages_spilled", spilled)
                    with self._cond:
                        self._cond.notify()
        except Exception as err:  # a bug here must stop the service loudly, not hang it
            log.exception("ingest thread failed")
            self._fail(err)
        finally:
            sock.close(0)
            self._ingest_done.set()
            with self._cond:
                self._cond.notify_all()

    def _next(self) -> tuple[list[Any], float] | None:
        """The record at the cursor: from the cache if it is there, else from the recording."""
        rec = self.recording
        assert rec is not None
        with self._cond:
            while self._cache and self._cache[0][0] < self._cursor:
                self._cache_bytes -= self._cache.popleft()[3]
            if self._cache and self._cache[0][0] == self._cursor:
                _, parts, t, nb = self._cache.popleft()
                self._cache_bytes -= nb
                return parts, t
            if self._cursor >= self._published:
                return None
        return rec.read(self._cursor), rec.entry(self._cursor).received_at

    def _clock(self) -> float:
        """Now, but never later than the arrival of a message received and not yet handed to the processor.

        Timeouts are decided on arrival times, so that an offline replay (which only knows arrival times) flags
        exactly the stacks the live run flagged.
        """
        now = time.time()
        stamp = self._stamp
        return now if stamp is None else min(now, stamp)

    def _process_loop(self) -> None:
        proc, rec = self.processor, self.recording
        assert proc is not None and rec is not None
        handled_since_trim, last_trim = False, 0.0
        try:
            while True:
                if self._cursor < self._resume_from and (proc.ledger.done or proc.ledger.n_quarantined):
                    if proc.skip_if_done(rec.header(self._cursor), record=self._cursor):
                        self._cursor += 1
                        continue
                # Read before _next(): once ingest is done, every record it will ever publish is visible to _next(),
                # so a stop never leaves the last batch recorded but unprocessed.
                received_all = self._stop.is_set() and self._ingest_done.is_set()
                item = self._next()
                if item is None:
                    if received_all:
                        break
                    now = self._clock()
                    if self._cursor >= self._published:  # re-checked after reading the clock: see _clock
                        proc.tick(now)
                    if handled_since_trim and time.monotonic() - last_trim > 1.0:  # idle: hand freed memory back
                        trim_heap()
                        handled_since_trim, last_trim = False, time.monotonic()
                    with self._cond:
                        if self._cursor >= self._published and not self._ingest_done.is_set():
                            self._cond.wait(0.05)
                    continue
                parts, t = item
                proc.handle(parts, record=self._cursor, received_at=t)
                handled_since_trim = True
                self._cursor += 1
                self.metrics.set_gauge("processing_backlog", len(rec) - self._cursor)
            proc.finish()
        except CriticalOutputError as err:
            proc.close_outputs_after_error()
            self._fail(err)
        except Exception as err:
            log.exception("processor thread failed")
            proc.close_outputs_after_error()
            self._fail(err)
        finally:
            self.final_summary = proc.summary()
            self.final_summary["stopped_by_error"] = clip(str(self.error)) if self.error else None
            try:
                (self.config.recording / "summary.json").write_text(json.dumps(self.final_summary, indent=1) + "\n")
            except OSError as err:
                log.warning("cannot write the summary: %s", err)

    def _control(self, sock: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        next_refresh = 0.0
        try:
            while not self.stopped.is_set():
                if self._curve is not None and time.monotonic() >= next_refresh:
                    next_refresh = time.monotonic() + 1.0  # the allow-list folder is checked once a second
                    try:
                        self._curve.refresh()
                    except Exception as err:  # an unreadable key: keep the previous list, say why
                        log.warning("CURVE allow-list not reloaded: %s", clip(str(err)))
                if not poller.poll(100):
                    if self._stop.is_set() and all(not t.is_alive() for t in self._threads[:2]):
                        break
                    continue
                try:
                    req = json.loads(sock.recv())
                    cmd = req.get("cmd") if isinstance(req, dict) else None
                except (ValueError, RecursionError):  # not JSON, or absurdly nested: answered, never fatal
                    cmd = None
                except zmq.ZMQError:
                    continue
                if cmd in ("status", "summary"):
                    try:
                        if cmd == "status":
                            reply = self.status()
                        else:
                            reply = self.final_summary or (self.processor.summary() if self.processor else {})
                    except Exception as err:  # a read racing the processor must not kill the control thread
                        reply = {"ok": False, "error": f"{cmd} unavailable this instant ({clip(str(err))}); ask again"}
                elif cmd == "stop":
                    reply = {"ok": True, "stopping": True}
                    self._stop.set()
                else:
                    reply = {"ok": False, "error": "unknown request; send {\"cmd\": \"status\"|\"summary\"|\"stop\"}"}
                sock.send(json.dumps(reply, default=str).encode())
        finally:
            sock.close(0)

    # --- status ---------------------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Queue depths, per-stage p50/p99, throughput, drops, errors and quarantined items, as plain JSON.

        Read from the processor's frozen :class:`~streamer.status.ProcessorStatus`; every list is bounded, so the
        reply stays small whatever was received.
        """
        snap = self.metrics.snapshot()
        proc, rec = self.processor, self.recording
        n = len(rec) if rec is not None else 0
        with self._cond:
            cache, cache_bytes = len(self._cache), self._cache_bytes
        ps = proc.status() if proc is not None else None
        snap["queues"] = {
            "recorded": n, "processed": self._cursor, "backlog": n - self._cursor, "cache": cache,
            "cache_bytes": cache_bytes, "open_stacks": ps.open_stacks if ps else 0,
            "open_acquisitions": len(ps.open_acquisitions) if ps else 0,
            "gpu_in_flight": ps.gpu_in_flight if ps else 0,
        }
        if ps is not None:
            snap["errors"] = {"by_type": ps.errors_by_type, "last": list(ps.last_errors)}
            snap["incomplete_stacks"] = list(ps.incomplete_stacks)
            snap["incomplete_total"] = ps.incomplete_total
            snap["quarantined"] = list(ps.quarantined)
            snap["quarantined_total"] = ps.quarantined_total
            snap["output_drops"] = ps.output_drops
        snap["ingest"] = self.ingest_endpoint
        snap["display"] = self.display_endpoint or None
        snap["datasets"] = dict(self.datasets)
        snap["state"] = "error" if self.error else ("stopping" if self._stop.is_set() else "running")
        snap["error"] = clip(str(self.error)) if self.error else None
        return snap


def _libc() -> Any:
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def trim_heap() -> bool:
    """Give the heap's freed memory back to the OS now (glibc's ``malloc_trim``); False where not glibc.

    Big received messages that are rejected (or processed) leave their memory on the heap, which glibc rarely
    returns by itself: 40 junk 32 MB messages left ~400 MB resident. Pinning glibc's mmap threshold low instead
    would return it too, but makes every large array of the reconstruction a fresh mapping — measured 1.5–2× slower
    per stack — so the service trims when it is idle instead.
    """
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is None:
        return False
    trim(0)
    return True


def memory_budget_bytes(mib: float | None) -> int:
    """The memory one stack's reconstruction may use, in bytes: ``mib`` MiB, or the larger of 8 GiB and half the RAM."""
    if mib is not None:
        return mib_to_bytes(mib)
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        ram = 16 * 2**30
    return int(max(8 * 2**30, 0.5 * ram))


def request(endpoint: str, cmd: str, timeout_s: float = 5.0, context: zmq.Context | None = None) -> dict[str, Any]:
    """Send one control request (``status``, ``summary``, ``stop``) and return the reply.

    Raises
    ------
    ServiceError
        If no service answers within ``timeout_s``.
    """
    ctx = context or zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
    sock.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
    try:
        sock.connect(endpoint)
        sock.send(json.dumps({"cmd": cmd}).encode())
        return json.loads(sock.recv())
    except zmq.Again:
        raise ServiceError(f"no rllsm service answered on {endpoint} within {timeout_s:g} s (is it running?)") from None
    finally:
        sock.close(0)


def wait_for(predicate: Any, timeout_s: float = 10.0, interval_s: float = 0.01) -> bool:
    """Poll ``predicate()`` until it is true or ``timeout_s`` passes (for tests and scripts; no fixed sleeps)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return bool(predicate())


def environment_summary() -> dict[str, Any]:
    """The machine, for benchmark records."""
    import platform

    return {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}
