"""Replay a recording: re-send it to a service with its original timing, or process it in-process.

``replay_offline`` feeds the recorded messages, with their recorded arrival times, through the same
:class:`~streamer.processor.StackProcessor` the live service uses, so it writes bit-identical volumes for the same
engine and backend. ``replay_to`` re-sends them over a PUSH socket at the original pace, as fast as possible, or
at a multiple of the original speed.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import zmq

from engines.errors import RllsmRuntimeError
from streamer.metrics import Metrics
from streamer.pipeline import PipelineMode, build_stages
from streamer.ledger import ResumeLedger
from streamer.processor import SinkFactory, StackProcessor, StageFactory
from streamer.recording import RecordingReader

log = logging.getLogger(__name__)


class ReplayError(RllsmRuntimeError):
    """The replay cannot go on; the text says why."""


def parse_speed(text: str) -> float | None:
    """``original`` → 1.0, ``max`` → None (no pacing), a positive number → that factor."""
    if text == "original":
        return 1.0
    if text == "max":
        return None
    try:
        f = float(text)
    except ValueError:
        raise ReplayError(f"speed must be 'original', 'max' or a positive factor like 2 or 0.5, got {text!r}") from None
    if not f > 0:
        raise ReplayError(f"speed factor must be positive, got {text!r}")
    return f


def replay_to(
    recording: str | os.PathLike[str], endpoint: str, *, speed: float | None = 1.0, context: zmq.Context | None = None,
    client_keys: tuple[str, str] | None = None, timeout_s: float = 30.0,
) -> dict[str, Any]:
    """Send every recorded message to ``endpoint`` (PUSH), paced by the recorded arrival times.

    Parameters
    ----------
    speed
        1.0 replays at the original pace, 2.0 twice as fast, None as fast as the socket allows.
    client_keys
        ``(client .key_secret, server .key)`` for a CURVE-protected service.
    timeout_s
        Give up if the service does not accept a message for this long (it blocks rather than drops: a replay
        must be complete).

    Returns
    -------
    dict
        ``{"messages", "bytes", "seconds"}``.
    """
    ctx = context or zmq.Context.instance()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
    sock.setsockopt(zmq.LINGER, int(timeout_s * 1000))
    if client_keys is not None:
        from streamer.security import secure_client_socket

        secure_client_socket(sock, *client_keys)
    sock.connect(endpoint)
    n = nbytes = 0
    t_start = time.monotonic()
    try:
        with RecordingReader(recording) as rec:
            t0 = rec.entry(0).received_at if len(rec) else 0.0
            for i in range(len(rec)):
                if speed is not None:
                    due = t_start + (rec.entry(i).received_at - t0) / speed
                    delay = due - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                parts = rec.read(i)
                try:
                    sock.send_multipart(parts, copy=False)
                except zmq.Again:
                    raise ReplayError(
                        f"the service at {endpoint} accepted nothing for {timeout_s:g} s (message {i} of {len(rec)})"
                    ) from None
                n += 1
                nbytes += sum(len(p) for p in parts)
    finally:
        sock.close()
    return {"messages": n, "bytes": nbytes, "seconds": time.monotonic() - t_start}


def replay_offline(
    recording: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *,
    mode: PipelineMode | str = PipelineMode.classical, stage_factory: StageFactory | None = None,
    sink_factory: SinkFactory | None = None, device: str | None = None, timeout_s: float = 5.0,
    max_open: int = 64, process_incomplete: bool = False, weights: str | os.PathLike[str] | None = None,
    backend: Any = None, sources: Any = None, output_format: str = "npy", fused_depth: int | None = None,
    memory_budget_mib: float | None = None,
) -> dict[str, Any]:
    """Process a recording in this process, without sockets; returns the end-of-run summary.

    With the same stages and backend as the live run, the volumes equal the live ones bit for bit: the processor
    sees the same messages in the same order with the same recorded arrival times. Whatever the live run (or this
    replay) quarantined is skipped with its reason and listed in the summary; the replay goes on.  ``backend``
    (:class:`engines.backends.BackendConfig`) says what runs the networks in ``full`` mode; ``sources``
    (:class:`engines.sources.ReconSources`) names the model files as for ``rllsm reconstruct``.

    ``output_format`` (``zarr``, ``tiff`` or ``npy``) writes under ``out`` exactly as ``rllsm serve`` does (the same
    code opens the outputs, :func:`streamer.sinks.factory.disk_outputs`), so a replay into the folder of an
    interrupted live run completes its datasets instead of duplicating them.
    """
    metrics = Metrics()
    if stage_factory is None:
        w = str(weights) if weights is not None else None
        stage_factory = lambda start: build_stages(mode, start.optics, device=device, weights=w,  # noqa: E731
                                                   backend=backend, sources=sources, fused_depth=fused_depth,
                                                   memory_budget_mib=memory_budget_mib)
    if sink_factory is None:
        if out is None:
            raise ReplayError("offline replay needs --out DIR (or a sink factory)")
        from streamer.sinks.factory import FORMATS, disk_outputs

        if output_format not in FORMATS:
            raise ReplayError(f"output format must be one of {', '.join(FORMATS)}, got {output_format!r}")
        out_dir = Path(out)
        sink_factory = lambda meta: disk_outputs(output_format, out_dir, meta, threaded=False)  # noqa: E731
    # The live run's quarantine is honoured (same items skipped, same reasons); its ledger is read, never written.
    ledger = ResumeLedger(recording, write=False)
    proc = StackProcessor(stage_factory, sink_factory, metrics, timeout_s=timeout_s, max_open=max_open,
                          device=device, process_incomplete=process_incomplete, ledger=ledger)
    try:
        with RecordingReader(recording) as rec:
            if rec.torn_data_bytes or rec.torn_entry_bytes:
                log.warning("%s ends with a torn record (interrupted run); replaying the %d whole ones", recording,
                            len(rec))
            for i in range(len(rec)):
                proc.handle(rec.read(i), record=i, received_at=rec.entry(i).received_at)
        proc.finish("end of recording")
    except BaseException:
        # a failed output (or Ctrl-C) must still close the writers, so what was written stays readable
        proc.close_outputs_after_error()
        raise
    return proc.summary()
