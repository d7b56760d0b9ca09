"""Send frames from the acquisition side to the service without ever stalling the microscope.

:class:`StreamSender` is a ZMQ PUSH socket speaking :mod:`streamer.wire`. Every send is non-blocking: when the service
is down, slow, or its queue is full, the frame is dropped, counted, and a warning is logged once per outage — the
acquisition continues. Pixels are handed to ZMQ as a buffer (``copy=False``), so the only copy of a frame is the one
the camera driver already made.

``ZMQ_IMMEDIATE`` is set so that, with no service connected, frames are refused at once instead of piling up in a
queue for a peer that may never come.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any, Literal

import numpy as np
import zmq
from pydantic import Field

from engines.errors import RllsmRuntimeError
from engines.support import StrictModel
from streamer.wire import AcquisitionEnd, AcquisitionStart, encode, pixels_header

log = logging.getLogger(__name__)
SENDER_CONFIG_VERSION = 1


class SenderError(RllsmRuntimeError):
    """The sender cannot be created (bad endpoint); sending itself never raises."""


class SenderConfig(StrictModel):
    """Where frames go and how much may queue before they are dropped."""

    version: Literal[1] = SENDER_CONFIG_VERSION
    endpoint: str = Field("tcp://127.0.0.1:5555", pattern=r"^(tcp|ipc|inproc)://\S+$",
                          description="The service's ingest endpoint.")
    sndhwm: int = Field(64, ge=1, le=1_000_000, description="Messages queued in ZMQ before sends are dropped.")
    checksum: bool = Field(False, description="Add a CRC-32 of every frame (costs ~1 ms per 8 MB frame).")
    warn_every_s: float = Field(10.0, ge=0.0, description="At most one 'frames dropped' warning per this many s.")


def new_acquisition_id(prefix: str = "acq") -> str:
    """A unique, wire-valid acquisition identifier: ``<prefix>-YYYYmmdd-HHMMSS-<6 hex>``."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


class StreamSender:
    """Non-blocking PUSH of wire messages; counts what it sent and what it dropped.

    Parameters
    ----------
    config
        Endpoint, high-water mark, checksum.
    acquisition_id
        Identifier used on every message (default: a new unique one).
    metrics
        Optional :class:`~streamer.metrics.Metrics`: counters ``sender_messages_sent``, ``sender_messages_dropped``.
    """

    def __init__(self, config: SenderConfig | None = None, *, acquisition_id: str | None = None,
                 context: zmq.Context | None = None, metrics: Any | None = None) -> None:
        self.config = config or SenderConfig()
        self.acquisition_id = acquisition_id or new_acquisition_id()
        self.metrics = metrics
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PUSH)
        self._sock.setsockopt(zmq.SNDHWM, self.config.sndhwm)
        self._sock.setsockopt(zmq.IMMEDIATE, 1)
        self._sock.setsockopt(zmq.LINGER, 2000)  # give queued frames 2 s to leave at close, then give up
        try:
            self._sock.connect(self.config.endpoint)
        except zmq.ZMQError as err:
            self._sock.close(0)
            raise SenderError(f"cannot connect to the service at {self.config.endpoint}: {err}") from None
        self._lock = threading.Lock()
        self._seq = 0
        self.sent = 0
        self.dropped = 0
        self.bytes_sent = 0
        self.started = False
        self._outage_since: float | None = None
        self._last_warn = -float("inf")
        if metrics is not None:
            metrics.declare("sender_messages_dropped")
            metrics.declare("sender_messages_sent")

    @property
    def endpoint(self) -> str:
        return self.config.endpoint

    @property
    def closed(self) -> bool:
        return self._sock.closed

    def _send(self, parts: list[Any], what: str, nbytes: int = 0) -> bool:
        with self._lock:
            if self._sock.closed:  # a frame after close() is a drop like any other: counted and said
                self.dropped += 1
                self._note_drop(f"{what} (sender closed)")
                return False
            try:
                self._sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                self.dropped += 1
                self._note_drop(what)
                return False
            except zmq.ZMQError as err:  # never let a transport error reach the acquisition thread
                self.dropped += 1
                self._note_drop(f"{what} ({err})")
                return False
            self.sent += 1
            self.bytes_sent += nbytes
            if self._outage_since is not None:
                log.warning("service at %s reachable again after %.1f s; %d messages dropped so far",
                            self.endpoint, time.monotonic() - self._outage_since, self.dropped)
                self._outage_since = None
        if self.metrics is not None:
            self.metrics.inc("sender_messages_sent")
            self.metrics.add_throughput("sender", 1, nbytes)
        return True

    def _next_seq(self) -> int:
        # a dropped message still consumes its number: the receiver sees the gap, and n_messages at the end
        # tells it how many it should have had
        with self._lock:
            seq = self._seq
            self._seq += 1
            return seq

    def _note_drop(self, what: str) -> None:
        now = time.monotonic()
        if self._outage_since is None:
            self._outage_since = now
        if now - self._last_warn >= self.config.warn_every_s:
            self._last_warn = now
            log.warning("service at %s is not taking frames (down or too slow): dropped %s; %d dropped so far, "
                        "the acquisition continues", self.endpoint, what, self.dropped)
        if self.metrics is not None:
            self.metrics.inc("sender_messages_dropped")

    def start(self, **fields: Any) -> bool:
        """Send :class:`~streamer.wire.AcquisitionStart` (fields as in the wire model); True if it left.

        Until it succeeds, :attr:`started` stays False so a caller can retry it before the next frame.
        """
        msg = AcquisitionStart(acquisition_id=self.acquisition_id, seq=self._next_seq(), **fields)
        ok = self._send(encode(msg), "acquisition start")
        self.started = self.started or ok
        return ok

    def send_frame(self, frame: np.ndarray, *, timepoint: int, z_index: int, z_count: int, channel: int = 0,
                   metadata: dict[str, Any] | None = None) -> bool:
        """Send one 2D camera frame; returns False (and counts) if it was dropped. Never raises for transport."""
        frame = frame if frame.flags.c_contiguous else np.ascontiguousarray(frame)
        head = pixels_header(frame, acquisition_id=self.acquisition_id, seq=self._next_seq(), timepoint=timepoint,
                             channel=channel, z_index=z_index, z_count=z_count,
                             with_checksum=self.config.checksum, metadata=metadata)
        return self._send(encode(head, frame), head.label(), frame.nbytes)

    def send_stack(self, stack: np.ndarray, *, timepoint: int, channel: int = 0) -> bool:
        """Send one whole ``(z, y, x)`` stack; False if dropped."""
        stack = stack if stack.flags.c_contiguous else np.ascontiguousarray(stack)
        head = pixels_header(stack, acquisition_id=self.acquisition_id, seq=self._next_seq(), timepoint=timepoint,
                             channel=channel, with_checksum=self.config.checksum)
        return self._send(encode(head, stack), head.label(), stack.nbytes)

    def end(self, reason: Literal["complete", "aborted", "error"] = "complete") -> bool:
        """Send :class:`~streamer.wire.AcquisitionEnd` with the count of messages sent before it."""
        seq = self._next_seq()
        msg = AcquisitionEnd(acquisition_id=self.acquisition_id, seq=seq, n_messages=seq, reason=reason)
        return self._send(encode(msg), "acquisition end")

    def stats(self) -> dict[str, Any]:
        return {"acquisition_id": self.acquisition_id, "sent": self.sent, "dropped": self.dropped,
                "bytes_sent": self.bytes_sent, "started": self.started}

    def close(self, linger_s: float = 2.0) -> None:
        """Close the socket; queued messages get ``linger_s`` seconds to leave."""
        with self._lock:
            if not self._sock.closed:
                self._sock.close(int(linger_s * 1000))

    def __enter__(self) -> StreamSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
