"""Live display stream: every fused volume and its three MIPs on a ZMQ PUB socket, latest wins.

Each message is ``[header JSON, payload]``; the header is a :class:`DisplayHeader` whose first field is ``kind``
(``"volume"`` or ``"mip"``), so a subscriber that only wants MIPs subscribes to the prefix ``{"kind":"mip"`` and the
large volumes are filtered out by the publisher before they cross the network.

Nothing here ever waits for a viewer. ``publish`` only puts each message into a "latest" slot (one per kind and MIP
axis) and returns; a sender thread moves slots to an XPUB socket with ``XPUB_NODROP``, so when a subscriber's queue
(``sndhwm`` messages) is full the send fails, the slot keeps waiting and is *replaced* by the next volume's message:
the newest always gets through, older ones are superseded. ``seq`` numbers each kind's messages at publish time, so
a subscriber counts exactly how many it missed (:attr:`DisplayClient.dropped`). ``ZMQ_CONFLATE`` would keep only the
newest message too, but it silently breaks multipart messages; and plain PUB drops the *newest* message when a queue
is full, which is the opposite of what a display needs. A subscriber slow on one kind paces that kind for every
subscriber of it (latest-wins at its rate) but never holds back the other kind — acceptable for the one or two
viewers of a microscope.

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
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zmq
from pydantic import Field, ValidationError

from engines.errors import RllsmRuntimeError
from engines.support import StrictModel
from streamer.sinks.base import SinkStats, VolumeIndex, VolumeMeta, check_volume
from streamer.sinks.config import DisplayConfig

log = logging.getLogger(__name__)
DISPLAY_VERSION = 1
MIP_AXES: tuple[Literal["z", "y", "x"], ...] = ("z", "y", "x")


class DisplayError(RllsmRuntimeError):
    """The display stream could not be opened, or a message on it is not a display message."""


class DisplayHeader(StrictModel):
    """Header of one display message. ``kind`` is first so that subscription prefixes can select it."""

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
        # XPUB with NODROP: a full subscriber pipe makes send() fail instead of silently dropping the *newest*
        # message (plain PUB's behaviour); the sender thread then retries with whatever is newest by then.
        self._sock = self._ctx.socket(zmq.XPUB)
        self._sock.setsockopt(zmq.SNDHWM, self.config.sndhwm)
        self._sock.setsockopt(zmq.XPUB_NODROP, 1)
        self._sock.setsockopt(zmq.LINGER, 0)
        try:
            self._sock.bind(self.config.endpoint)
        except zmq.ZMQError as err:
            self._sock.close(0)
            raise DisplayError(f"cannot publish the display stream on {self.config.endpoint}: {err}") from None
        self.endpoint: str = self._sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._seq = {"volume": 0, "mip": 0}
        self._cond = threading.Condition()
        # newest not-yet-sent message per (kind, axis): the latest-wins slots
        self._slots: dict[tuple[str, str | None], tuple[bytes, np.ndarray]] = {}
        self._closing = False
        self.sent = 0
        self.superseded = 0  # messages replaced by a newer one before a slow subscriber could take them
        if metrics is not None:
            metrics.declare("display_superseded")
            metrics.declare("display_messages_sent")
        self._thread = threading.Thread(target=self._run, name="display-publisher", daemon=True)
        self._thread.start()

    def publish(self, volume: np.ndarray, index: VolumeIndex, *, acquisition_id: str,
                voxel_size_um: Sequence[float] | None = None) -> int:
        """Queue ``volume`` and/or its MIPs (as configured) for sending; returns the number of messages queued.

        Never waits for subscribers: a message still waiting from an earlier call is replaced (latest wins) and
        counted in :attr:`superseded`.
        """
        t0 = time.perf_counter()
        parts: list[tuple[str, str | None, np.ndarray]] = []
        if self.config.send_volume:
            parts.append(("volume", None, np.ascontiguousarray(volume)))
        if self.config.send_mips:
            parts.extend(("mip", ax, arr) for ax, arr in mips(volume).items())
        vox = tuple(float(v) for v in voxel_size_um) if voxel_size_um is not None else None
        replaced = 0
        with self._cond:
            if self._closing:
                raise DisplayError("display publisher is closed")
            for kind, axis, arr in parts:
                head = DisplayHeader(
                    kind=kind, acquisition_id=acquisition_id, seq=self._seq[kind], timepoint=index.timepoint,
                    channel=index.channel, axis=axis, shape=arr.shape, dtype=arr.dtype.name, voxel_size_um=vox,
                )
                self._seq[kind] += 1
                replaced += (kind, axis) in self._slots
                self._slots[(kind, axis)] = (head.model_dump_json().encode(), arr)
            self.superseded += replaced
            self._cond.notify_all()
        if self.metrics is not None:
            self.metrics.observe("display_publish", time.perf_counter() - t0)
            if replaced:
                self.metrics.inc("display_superseded", replaced)
        return len(parts)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued message left (False on timeout, e.g. a subscriber that stopped reading)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._slots or self._closing, timeout)

    def _run(self) -> None:
        backoff = 0.0005
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._slots) or self._closing)
                if self._closing:
                    return
                pending = list(self._slots.items())
            progressed = False
            # try every slot: a viewer that is slow on whole volumes must not hold back MIPs for the others
            for key, (head, arr) in pending:
                try:
                    self._sock.send_multipart([head, memoryview(arr).cast("B")], flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    continue
                except zmq.ZMQError:
                    if self._closing:
                        return
                    raise
                progressed = True
                with self._cond:
                    if self._slots.get(key, (None,))[0] is head:
                        del self._slots[key]
                    self.sent += 1
                    self._cond.notify_all()
                if self.metrics is not None:
                    self.metrics.inc("display_messages_sent")
            self._drain_subscriptions()
            if progressed:
                backoff = 0.0005
            else:
                # every waiting message meets a full subscriber queue: wait a little, or until a newer one comes
                with self._cond:
                    self._cond.wait(backoff)
                backoff = min(backoff * 2, 0.05)

    def _drain_subscriptions(self) -> None:
        # XPUB hands subscription messages to the application; read them so they do not pile up
        try:
            while self._sock.poll(0, zmq.POLLIN):
                self._sock.recv(zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(5)
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
            array = np.frombuffer(buf, dtype=header.dtype).reshape(header.shape)
        except (ValueError, TypeError, ValidationError, DisplayError) as err:
            # TypeError: a dtype numpy does not know; ValueError: also one it cannot read from bytes (object)
            self.invalid += 1
            log.warning("ignoring a malformed display message: %s", err)
            return None
        last = self._last_seq.get(header.kind)
        if last is not None and header.seq > last + 1:
            self.dropped += header.seq - last - 1
        self._last_seq[header.kind] = header.seq
        self.received += 1
        return DisplayMessage(header, array)

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

    def latest_mips(self, timeout: float | None = None) -> dict[str, DisplayMessage] | None:
        """The three MIPs (keyed ``"z"``, ``"y"``, ``"x"``) of the newest volume whose MIPs all arrived.

        Waits up to ``timeout`` seconds; returns None if no complete set arrived. Needs a ``"mip"`` subscription.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        partial: dict[tuple[str, int, int], dict[str, DisplayMessage]] = {}
        best: dict[str, DisplayMessage] | None = None
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            # once a complete set is in hand, only take what is already queued (it may hold a newer set)
            msg = self.recv(0 if best is not None else left)
            if msg is None:
                return best
            if msg.kind != "mip" or msg.header.axis is None:
                continue
            key = (msg.header.acquisition_id, msg.header.timepoint, msg.header.channel)
            group = partial.setdefault(key, {})
            group[msg.header.axis] = msg
            if len(group) == len(MIP_AXES):
                if best is not None:
                    self.superseded += len(MIP_AXES)
                best = partial.pop(key)

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


# --- a PNG writer for MIPs: the smallest useful viewer ------------------------------------------------------------


def mip_to_png(msg: DisplayMessage, out_dir: str | Path) -> Path:
    """Write one MIP as an 8-bit PNG (contrast from the 0.1–99.9 percentiles, isotropic pixels); returns its path.

    The ``y`` and ``x`` MIPs have z as rows; z spacing usually differs from the lateral one, so rows are rescaled by
    ``voxel_z / voxel_lateral`` to show the sample's true proportions.
    """
    from PIL import Image

    h = msg.header
    if h.kind != "mip" or h.axis is None:
        raise DisplayError(f"only MIPs are written as PNG, got a {h.kind}")
    img = np.asarray(msg.array, dtype=np.float32)
    lo, hi = np.percentile(img, (0.1, 99.9))
    scaled = np.clip((img - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    pic = Image.fromarray((scaled * 255 + 0.5).astype(np.uint8))
    if h.axis != "z" and h.voxel_size_um is not None:
        dz, _, dx = h.voxel_size_um
        rows = max(1, round(img.shape[0] * dz / dx))
        pic = pic.resize((img.shape[1], rows), Image.Resampling.BILINEAR)
    out = Path(out_dir) / f"{h.acquisition_id}_t{h.timepoint:05d}_c{h.channel}_mip{h.axis}.png"
    tmp = out.with_name(out.name + ".partial")
    pic.save(tmp, format="PNG")
    tmp.replace(out)  # a viewer polling the folder never opens half a PNG
    return out


def watch(endpoint: str, out_dir: str | Path, *, count: int | None = None, timeout: float | None = None,
          context: zmq.Context | None = None) -> list[Path]:
    """Subscribe to MIPs at ``endpoint`` and write each as a PNG under ``out_dir``.

    Parameters
    ----------
    count
        Stop after this many PNGs (None: run until interrupted).
    timeout
        Give up if no MIP arrives for this many seconds (raises :class:`DisplayError`); None waits forever.
    """
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DisplayError(f"cannot create output folder {out}: {err.strerror or err}") from None
    written: list[Path] = []
    with DisplayClient(endpoint, kinds=("mip",), context=context) as client:
        while count is None or len(written) < count:
            msg = client.recv(timeout)
            if msg is None:
                raise DisplayError(f"no MIP arrived from {endpoint} within {timeout} s "
                                   f"({len(written)} written; is the service running and publishing there?)")
            written.append(mip_to_png(msg, out))
            log.info("wrote %s", written[-1])
        if client.dropped:
            log.warning("missed %d MIPs published while writing (the display stream keeps only the newest)",
                        client.dropped)
    return written
