"""Live display stream: every fused volume and its three MIPs on a ZMQ PUB socket, latest wins.

Each message is ``[header JSON, payload]``; the header is a :class:`DisplayHeader` whose first field is ``kind``
(``"volume"`` or ``"mip"``), so a subscriber that only wants MIPs subscribes to the prefix ``{"kind":"mip"`` and the
large volumes are filtered out by the publisher before they cross the network.

Nothing here ever waits for a viewer. The PUB socket keeps at most ``sndhwm`` messages per subscriber and drops the
rest for that subscriber only (ZMQ's PUB semantics); ``seq`` numbers each kind's messages, so a subscriber counts
exactly how many it missed (:attr:`DisplayClient.dropped`). A full multipart message is never half delivered.
``ZMQ_CONFLATE`` would keep only the newest message, but it silently breaks multipart messages, so latest-wins is a
small high-water mark on both sides plus draining to the newest on the client.

>>> with DisplayClient("tcp://127.0.0.1:5556", kinds=("mip",)) as c:   # doctest: +SKIP
...     msg = c.latest(timeout=5.0)
...     msg.header.axis, msg.array.shape
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import zmq
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from streamer.sinks.base import SinkStats, VolumeIndex, VolumeMeta, check_volume
from streamer.sinks.config import DisplayConfig

log = logging.getLogger(__name__)
DISPLAY_VERSION = 1
MIP_AXES: tuple[Literal["z", "y", "x"], ...] = ("z", "y", "x")


class DisplayError(RuntimeError):
    """The display stream could not be opened, or a message on it is not a display message."""


class DisplayHeader(BaseModel):
    """Header of one display message. ``kind`` is first so that subscription prefixes can select it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["volume", "mip"]
    version: Literal[1] = DISPLAY_VERSION
    acquisition_id: str
    seq: int = Field(ge=0, description="Counts this kind's messages from this publisher; gaps are drops.")
    timepoint: int = Field(ge=0)
    channel: int = Field(0, ge=0)
    axis: Literal["z", "y", "x"] | None = Field(None, description="For a MIP: the axis projected away.")
    shape: tuple[int, ...]
    dtype: str
    voxel_size_um: tuple[float, float, float] | None = Field(None, description="(z, y, x) of the volume.")
    sent_at: float = Field(default_factory=time.time)

    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def topic(kind: str) -> bytes:
    """Subscription prefix selecting one kind (the header JSON starts with it)."""
    return b'{"kind":"' + kind.encode() + b'"'


def mips(volume: np.ndarray) -> dict[str, np.ndarray]:
    """Maximum-intensity projections of a ``(z, y, x)`` volume, keyed by the axis projected away.

    ``"z"`` → ``(y, x)``, ``"y"`` → ``(z, x)``, ``"x"`` → ``(z, y)``.
    """
    if volume.ndim != 3:
        raise DisplayError(f"MIPs need a (z, y, x) volume, got {volume.ndim}D {volume.shape}")
    return {ax: np.ascontiguousarray(volume.max(axis=i)) for i, ax in enumerate(MIP_AXES)}


class DisplayPublisher:
    """Binds the PUB socket and publishes volumes and MIPs without ever blocking.

    Parameters
    ----------
    config
        Endpoint, what to send, and the per-subscriber high-water mark.
    context
        ZMQ context to use (default: the process-wide instance).
    metrics
        Optional :class:`~streamer.metrics.Metrics`: counters ``display_messages_sent{kind=…}``,
        ``display_send_dropped`` and stage ``display_publish``.
    """

    def __init__(self, config: DisplayConfig | None = None, *, context: zmq.Context | None = None,
                 metrics: Any | None = None) -> None:
        self.config = config or DisplayConfig()
        self.metrics = metrics
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.SNDHWM, self.config.sndhwm)
        self._sock.setsockopt(zmq.LINGER, 0)
        try:
            self._sock.bind(self.config.endpoint)
        except zmq.ZMQError as err:
            self._sock.close(0)
            raise DisplayError(f"cannot publish the display stream on {self.config.endpoint}: {err}") from None
        self.endpoint: str = self._sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._seq = {"volume": 0, "mip": 0}
        self._lock = threading.Lock()  # a PUB socket is not thread-safe; publish may be called from several threads
        self.sent = 0
        self.send_dropped = 0
        if metrics is not None:
            metrics.declare("display_send_dropped")

    def publish(self, volume: np.ndarray, index: VolumeIndex, *, acquisition_id: str,
                voxel_size_um: Sequence[float] | None = None) -> int:
        """Publish ``volume`` and/or its MIPs (as configured); returns the number of messages handed to ZMQ."""
        parts: list[tuple[str, str | None, np.ndarray]] = []
        if self.config.send_volume:
            parts.append(("volume", None, np.ascontiguousarray(volume)))
        if self.config.send_mips:
            parts.extend(("mip", ax, arr) for ax, arr in mips(volume).items())
        vox = tuple(float(v) for v in voxel_size_um) if voxel_size_um is not None else None
        n = 0
        t0 = time.perf_counter()
        with self._lock:
            for kind, axis, arr in parts:
                head = DisplayHeader(
                    kind=kind, acquisition_id=acquisition_id, seq=self._seq[kind], timepoint=index.timepoint,
                    channel=index.channel, axis=axis, shape=arr.shape, dtype=arr.dtype.name, voxel_size_um=vox,
                )
                self._seq[kind] += 1
                try:
                    self._sock.send_multipart([head.model_dump_json().encode(), memoryview(arr).cast("B")],
                                              flags=zmq.NOBLOCK, copy=False)
                    n += 1
                except zmq.Again:  # PUB drops per subscriber by itself; this only fires in exotic socket states
                    self.send_dropped += 1
                    if self.metrics is not None:
                        self.metrics.inc("display_send_dropped")
        self.sent += n
        if self.metrics is not None:
            self.metrics.observe("display_publish", time.perf_counter() - t0)
            self.metrics.inc("display_messages_sent", n)
        return n

    def close(self) -> None:
        with self._lock:
            if not self._sock.closed:
                self._sock.close(0)

    def __enter__(self) -> DisplayPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DisplaySink:
    """The publisher as a :class:`~streamer.sinks.base.Sink` (non-critical: wrap with ``critical=False``).

    The publisher outlives acquisitions, so viewers stay subscribed between them; closing the sink leaves it open.
    """

    def __init__(self, publisher: DisplayPublisher) -> None:
        self.publisher = publisher
        self.name = "display"
        self.stats = SinkStats()
        self._meta: VolumeMeta | None = None

    def setup(self, meta: VolumeMeta) -> None:
        self._meta = meta

    def append(self, volume: np.ndarray, index: VolumeIndex) -> None:
        check_volume(self._meta, volume, index, self.name)
        assert self._meta is not None
        self.publisher.publish(volume, index, acquisition_id=self._meta.acquisition_id,
                               voxel_size_um=self._meta.voxel_size_um)
        self.stats.written += 1
        self.stats.bytes_written += volume.nbytes

    def skip(self, index: VolumeIndex, reason: str) -> None:
        self.stats.skipped[index] = reason

    def close(self) -> None:
        self._meta = None


@dataclass(frozen=True)
class DisplayMessage:
    """One received display message: its header and a read-only array over the received bytes."""

    header: DisplayHeader
    array: np.ndarray

    @property
    def kind(self) -> str:
        return self.header.kind


class DisplayClient:
    """Subscribe to the display stream; for viewers (napari, ndv, a PNG writer).

    Parameters
    ----------
    endpoint
        The publisher's endpoint, e.g. ``tcp://127.0.0.1:5556``.
    kinds
        Which kinds to receive (``"mip"`` alone avoids transferring whole volumes).
    rcvhwm
        Messages the client buffers before ZMQ drops for it; small, because only the latest matters.
    """

    def __init__(self, endpoint: str = "tcp://127.0.0.1:5556", *, kinds: Sequence[str] = ("volume", "mip"),
                 rcvhwm: int = 4, context: zmq.Context | None = None) -> None:
        bad = [k for k in kinds if k not in ("volume", "mip")]
        if bad or not kinds:
            raise DisplayError(f"unknown display kinds {bad or list(kinds)}; use 'volume' and/or 'mip'")
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self._sock.setsockopt(zmq.LINGER, 0)
        for k in kinds:
            self._sock.setsockopt(zmq.SUBSCRIBE, topic(k))
        try:
            self._sock.connect(endpoint)
        except zmq.ZMQError as err:
            self._sock.close(0)
            raise DisplayError(f"cannot connect to the display stream at {endpoint}: {err}") from None
        self.endpoint = endpoint
        self.received = 0
        self.dropped = 0  # messages the publisher sent but this client never saw (gaps in seq)
        self.superseded = 0  # messages received but replaced by a newer one in latest()
        self.invalid = 0
        self._last_seq: dict[str, int] = {}

    def _decode(self, parts: list[zmq.Frame]) -> DisplayMessage | None:
        try:
            if len(parts) != 2:
                raise DisplayError(f"expected [header, payload], got {len(parts)} parts")
            header = DisplayHeader.model_validate(json.loads(parts[0].bytes))
            buf = parts[1].buffer
            if len(buf) != header.nbytes():
                raise DisplayError(f"{header.kind} t={header.timepoint}: header says {header.shape} {header.dtype}"
                                   f" = {header.nbytes()} bytes, payload has {len(buf)}")
        except (ValueError, ValidationError, DisplayError) as err:
            self.invalid += 1
            log.warning("ignoring a malformed display message: %s", err)
            return None
        last = self._last_seq.get(header.kind)
        if last is not None and header.seq > last + 1:
            self.dropped += header.seq - last - 1
        self._last_seq[header.kind] = header.seq
        self.received += 1
        return DisplayMessage(header, np.frombuffer(buf, dtype=header.dtype).reshape(header.shape))

    def recv(self, timeout: float | None = None) -> DisplayMessage | None:
        """The next message in order, or None after ``timeout`` seconds (None waits forever)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._sock.poll(None if left is None else int(left * 1000)):
                return None
            msg = self._decode(self._sock.recv_multipart(copy=False))
            if msg is not None:
                return msg

    def latest(self, timeout: float | None = None, *, kind: str | None = None) -> DisplayMessage | None:
        """Wait up to ``timeout`` s for a message, then drain what is queued and return the newest (of ``kind``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        newest: DisplayMessage | None = None
        while newest is None:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            msg = self.recv(left)
            if msg is None:
                return None
            if kind is None or msg.kind == kind:
                newest = msg
        while self._sock.poll(0):
            msg = self._decode(self._sock.recv_multipart(copy=False))
            if msg is not None and (kind is None or msg.kind == kind):
                self.superseded += 1
                newest = msg
        return newest

    def __iter__(self) -> Iterator[DisplayMessage]:
        while True:
            msg = self.recv()
            if msg is not None:
                yield msg

    def close(self) -> None:
        if not self._sock.closed:
            self._sock.close(0)

    def __enter__(self) -> DisplayClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
