"""What every output of the service is: a :class:`Sink` with ``setup / append / skip / close``.

A sink receives fused volumes ``(z, y, x)`` in the order the pipeline finishes them. The two rules every sink keeps:

* a volume that is not stored is *skipped* with a reason and counted, never silently lost;
* a sink reports its own failure as a :class:`SinkError` subclass whose text a microscopist can act on
  ("OME-Zarr writer: disk full while writing t=12 c=0 to /data/run.zarr").

Sinks themselves are synchronous and single-threaded; :class:`~streamer.sinks.threaded.ThreadedSink` puts any of them
behind a bounded queue and a writer thread so the acquisition never waits on a disk.

**Done confirmation (exactly once after a kill).** The service marks a stack done in its resume ledger only when
every critical output holds it. A sink *may* offer ``add_done_listener(fn)`` (see :class:`ConfirmingSink`):
``fn(index: VolumeIndex, stored: bool)`` is then called — from any thread — after the volume (``stored=True``) or its
skip (``False``) is durably written, i.e. would survive a kill -9 of the process right after the call. A sink without
it is taken to have finished when ``append``/``skip`` returns. ``ThreadedSink`` implements it for the sink it wraps
(after the inner call returns, in the writer thread) and forwards it to an inner sink that offers it itself (e.g. one
that buffers chunks and knows when they are flushed). A volume that fails is never confirmed: it is redone on restart.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from engines.errors import RllsmRuntimeError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from engines.config import OpticsConfig
    from streamer.wire import AcquisitionStart


# --- errors -----------------------------------------------------------------------------------------------------


class SinkError(RllsmRuntimeError):
    """An output could not do its job; the text says which output, what and where."""


class SinkSetupError(SinkError):
    """The output cannot be created (unwritable folder, existing dataset, bad settings)."""


class SinkWriteError(SinkError):
    """Writing a volume failed (disk full, folder removed, permission lost)."""

    def __init__(self, message: str, *, index: VolumeIndex | None = None, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.index = index
        self.cause = cause


class SinkStateError(SinkError):
    """The sink was used out of order (append before setup, after close) or given a volume it was not set up for."""


class SinkFailed(SinkError):
    """A critical sink stopped after an earlier error; ``__cause__`` is that error."""


def describe_os_error(err: OSError) -> str:
    """Say what an OS error means for an acquisition ("disk full", "no permission")."""
    what = {
        errno.ENOSPC: "disk full",
        errno.EDQUOT: "disk quota exceeded",
        errno.EACCES: "no permission",
        errno.EPERM: "no permission",
        errno.EROFS: "read-only file system",
        errno.ENOENT: "folder no longer exists",
        errno.EIO: "input/output error (failing disk or lost network share?)",
        errno.EFBIG: "file larger than this system or its limits allow",
    }.get(err.errno or -1, err.strerror or "")
    if not what:
        # writers report a short write without an errno; on a local disk that is a full disk
        what = "disk full or file size limit reached (short write)" if "written" in str(err) else type(err).__name__
    return f"{what} ({err})"


# --- what a sink is told -----------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class VolumeIndex:
    """Where a volume goes: its timepoint and channel within the acquisition."""

    timepoint: int
    channel: int = 0

    def __post_init__(self) -> None:
        if self.timepoint < 0 or self.channel < 0:
            raise SinkStateError(f"volume index t={self.timepoint} c={self.channel}: must not be negative")

    def label(self) -> str:
        return f"t={self.timepoint} c={self.channel}"


@dataclass(frozen=True)
class VolumeMeta:
    """Everything a sink needs before the first volume: geometry, pixel type, physical sizes, provenance.

    Parameters
    ----------
    acquisition_id
        Identifier of the acquisition (from the wire's ``AcquisitionStart``).
    shape
        ``(z, y, x)`` of every fused volume.
    dtype
        numpy dtype name of the volumes (e.g. ``"float32"`` or ``"uint16"``).
    voxel_size_um
        ``(z, y, x)`` voxel size in micrometres of the *fused* volume.
    channels
        Channel names (excitation wavelengths by convention), one per channel index.
    n_timepoints
        Planned timepoints, or None when open-ended (outputs then grow along t).
    time_interval_s
        Time between volumes if known; written as the t scale.
    optics
        The acquisition's optics, stored beside the data for provenance.
    metadata
        Free-form JSON-able microscope metadata (stored as-is).
    provenance
        How the volumes were made (mode, model files with their SHA-256, backend and precision, software version,
        optics, grid), as the stage chain declares it; stored in the dataset attributes.
    placements
        Per-volume record of how each fused volume was placed into the acquisition's grid (split position, padding),
        filled by the processor as volumes come and read by the sinks when they write that volume.
    """

    acquisition_id: str
    shape: tuple[int, int, int]
    dtype: str
    voxel_size_um: tuple[float, float, float]
    channels: tuple[str, ...] = ("488",)
    n_timepoints: int | None = None
    time_interval_s: float | None = None
    optics: OpticsConfig | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    provenance: Mapping[str, Any] = field(default_factory=dict)
    placements: PlacementTable | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or any(int(s) < 1 for s in self.shape):
            raise SinkSetupError(f"volume shape must be 3 positive sizes (z, y, x), got {self.shape}")
        if len(self.voxel_size_um) != 3 or any(not (float(v) > 0) for v in self.voxel_size_um):
            raise SinkSetupError(f"voxel size must be 3 positive numbers in µm (z, y, x), got {self.voxel_size_um}")
        try:
            np.dtype(self.dtype)
        except TypeError:
            raise SinkSetupError(f"unknown pixel type {self.dtype!r}") from None
        if not self.channels:
            raise SinkSetupError("at least one channel name is needed")
        if self.n_timepoints is not None and self.n_timepoints < 1:
            raise SinkSetupError(f"n_timepoints must be ≥ 1 or None, got {self.n_timepoints}")

    @property
    def nbytes(self) -> int:
        """Bytes of one volume."""
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    @classmethod
    def from_start(
        cls, start: AcquisitionStart, *, shape: tuple[int, int, int], dtype: str,
        voxel_size_um: tuple[float, float, float] | None = None, time_interval_s: float | None = None,
        provenance: Mapping[str, Any] | None = None, placements: PlacementTable | None = None,
    ) -> VolumeMeta:
        """Build from the wire's ``AcquisitionStart`` and the fused volume's geometry.

        ``voxel_size_um`` is what the stage chain declares for its output grid (the fused grid is isotropic). Without
        it — a chain that only deskews — the deskewed geometry is assumed: z spacing ``stage_step·sin(skew angle)``,
        lateral spacing the camera pixel size in the sample.
        """
        o = start.optics
        vox = voxel_size_um or (o.deskewed_pixel_z_um, o.pixel_size_um, o.pixel_size_um)
        return cls(
            acquisition_id=start.acquisition_id, shape=tuple(int(s) for s in shape), dtype=str(np.dtype(dtype)),
            voxel_size_um=tuple(float(v) for v in vox), channels=tuple(start.channels),
            n_timepoints=start.n_timepoints, time_interval_s=time_interval_s, optics=o, metadata=dict(start.metadata),
            provenance=dict(provenance or {}), placements=placements,
        )


class PlacementTable:
    """Thread-safe ``VolumeIndex → dict`` of per-volume records (how each volume was placed into the grid).

    Written by the processor before it hands a volume over, read by a writer thread when it stores that volume.
    Bounded: beyond ``max_rows`` the oldest rows are forgotten (writers read a row within a few volumes).
    """

    def __init__(self, max_rows: int = 4096) -> None:
        self._lock = threading.Lock()
        self._rows: dict[VolumeIndex, dict[str, Any]] = {}
        self.max_rows = max_rows

    def record(self, index: VolumeIndex, row: Mapping[str, Any]) -> None:
        with self._lock:
            self._rows.pop(index, None)
            self._rows[index] = dict(row)
            while len(self._rows) > self.max_rows:
                del self._rows[next(iter(self._rows))]

    def get(self, index: VolumeIndex) -> dict[str, Any] | None:
        with self._lock:
            row = self._rows.get(index)
            return None if row is None else dict(row)

    def __len__(self) -> int:
        with self._lock:
            return len(self._rows)


def check_volume(meta: VolumeMeta | None, volume: np.ndarray, index: VolumeIndex, sink: str) -> None:
    """Raise :class:`SinkStateError` unless ``volume`` matches what the sink was set up for."""
    if meta is None:
        raise SinkStateError(f"{sink}: append({index.label()}) before setup()")
    if tuple(volume.shape) != tuple(meta.shape) or volume.dtype != np.dtype(meta.dtype):
        raise SinkStateError(
            f"{sink}: volume {index.label()} is {'×'.join(map(str, volume.shape))} {volume.dtype}, but the output was "
            f"set up for {'×'.join(map(str, meta.shape))} {meta.dtype}"
        )
    if index.channel >= len(meta.channels):
        raise SinkStateError(f"{sink}: volume {index.label()}: channel {index.channel} not in {list(meta.channels)}")
    if meta.n_timepoints is not None and index.timepoint >= meta.n_timepoints:
        raise SinkStateError(
            f"{sink}: volume {index.label()}: timepoint beyond the {meta.n_timepoints} planned for this acquisition"
        )


@dataclass
class SinkStats:
    """What a sink did; ``skipped`` maps each skipped index to its reason."""

    written: int = 0
    bytes_written: int = 0
    skipped: dict[VolumeIndex, str] = field(default_factory=dict)
    dropped_queue_full: int = 0
    errors: int = 0
    last_error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "written": self.written, "bytes_written": self.bytes_written, "skipped": len(self.skipped),
            "dropped_queue_full": self.dropped_queue_full, "errors": self.errors, "last_error": self.last_error,
        }


# --- the protocol -------------------------------------------------------------------------------------------------


@runtime_checkable
class Sink(Protocol):
    """An output of fused volumes. Calls come from one thread, in this order: setup, (append | skip)*, close."""

    name: str
    stats: SinkStats

    def setup(self, meta: VolumeMeta) -> None:
        """Create the output; raise :class:`SinkSetupError` if it cannot be."""

    def append(self, volume: np.ndarray, index: VolumeIndex) -> None:
        """Store one fused ``(z, y, x)`` volume; the sink may keep a reference, the caller must not modify it."""

    def skip(self, index: VolumeIndex, reason: str) -> None:
        """Record that the volume at ``index`` will never come, and why."""

    def close(self) -> None:
        """Finish the output (flush, final metadata); idempotent."""


@runtime_checkable
class ConfirmingSink(Sink, Protocol):
    """A :class:`Sink` that says when each volume is durably written (see the module docstring)."""

    def add_done_listener(self, fn: Callable[[VolumeIndex, bool], None]) -> None:
        """Call ``fn(index, stored)`` after the volume at ``index`` (or its skip) is durably written."""


DoneListener = Callable[[VolumeIndex, bool], None]


class DoneListeners:
    """The ``add_done_listener`` half of :class:`ConfirmingSink`, for sinks that know when their own writes are durable.

    The sink sets ``self._listeners = []`` and ``self.name`` and calls ``self._done(index, stored)`` once a volume (or
    its skip) is on disk.
    """

    name: str
    _listeners: list[DoneListener]

    def add_done_listener(self, fn: DoneListener) -> None:
        """``fn(index, stored)`` once a volume (stored=True) or its skip (False) is durably written."""
        self._listeners.append(fn)

    def _done(self, index: VolumeIndex, stored: bool) -> None:
        for fn in self._listeners:
            try:
                fn(index, stored)
            except Exception:  # a listener's bug must not turn a written volume into a write error
                log.exception("%s: done listener raised for %s", self.name, index.label())
