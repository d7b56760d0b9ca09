"""The viewer's pure part: what to show, resolved from what arrived. No napari, no Qt, no sockets.

Every function takes frozen values and returns frozen values, so the GUI half only applies them and tests check them
without a screen: which target a command-line argument names, which layers a fused volume becomes and at which scale
(µm, read from the data's own metadata — the display header or the NGFF ``coordinateTransformations`` — never
recomputed here), the contrast with its lock, follow/pause, and the text lines shown for a frame and for a service.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from engines.errors import RllsmRuntimeError

DEFAULT_DISPLAY = "tcp://127.0.0.1:5556"
DEFAULT_CONTROL = "tcp://127.0.0.1:5557"
MIP_AXES = ("z", "y", "x")
# one colour per channel, cycled; the first is grey so a single-channel acquisition looks like every other viewer
CHANNEL_COLORMAPS = ("gray", "green", "magenta", "cyan", "yellow", "red", "blue")


class ViewerError(RllsmRuntimeError):
    """The viewer cannot do what was asked: an unknown target, no napari or OpenGL, nothing arriving in time."""


# --- what to open --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """What ``rllsm view`` follows: a display stream (``endpoint``) or an OME-Zarr dataset (``path``)."""

    kind: Literal["stream", "dataset"]
    endpoint: str | None = None
    path: Path | None = None

    def label(self) -> str:
        return self.endpoint if self.kind == "stream" else str(self.path)


_HOST_PORT = re.compile(r"^(?P<host>[A-Za-z0-9_.\-]+|\[[0-9A-Fa-f:]+\]):(?P<port>\d{1,5})$")


def resolve_target(text: str | None) -> Target:
    """Resolve the ``rllsm view`` argument: nothing (the local service's stream), an endpoint, ``HOST:PORT``, or a
    ``*.ome.zarr`` folder.

    Raises
    ------
    ViewerError
        Naming the argument and what it would need to be.
    """
    if text is None or not text.strip():
        return Target("stream", endpoint=DEFAULT_DISPLAY)
    text = text.strip()
    if text.startswith(("tcp://", "ipc://", "inproc://")):
        if text.startswith("tcp://") and not _HOST_PORT.match(text[len("tcp://"):]):
            raise ViewerError(f"display endpoint {text!r} needs a host and a port, e.g. tcp://127.0.0.1:5556")
        return Target("stream", endpoint=text)
    m = _HOST_PORT.match(text)
    if m and not Path(text).exists():
        if not 0 < int(m["port"]) < 65536:
            raise ViewerError(f"port {m['port']} in {text!r} is not between 1 and 65535")
        return Target("stream", endpoint=f"tcp://{text}")
    path = Path(text.rstrip("/"))
    if not path.exists() and path.with_name(path.name + ".partial").is_dir():
        return Target("dataset", path=path)  # being created: our writer renames it after its first volume
    if not path.exists():
        raise ViewerError(f"{text!r} is neither a display endpoint (tcp://HOST:PORT) nor an existing dataset folder")
    if not path.is_dir() or not (path / "zarr.json").is_file():
        raise ViewerError(f"{path} is not an OME-Zarr dataset (a folder with a zarr.json, as `rllsm serve --out` "
                          "writes)")
    return Target("dataset", path=path)


# --- one fused volume as it arrived --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """One fused volume with its three MIPs and where it came from.

    ``voxel_size_um`` is ``(z, y, x)`` as the data's metadata says, None when it says nothing. ``mips`` are keyed by
    the axis projected away (``"z"`` → ``(y, x)``). ``made_at`` is the wall-clock time the volume was published (the
    stream) or its last chunk written (a dataset), for the latency shown.
    """

    volume: np.ndarray
    mips: Mapping[str, np.ndarray]
    acquisition_id: str
    timepoint: int
    channel: int = 0
    voxel_size_um: tuple[float, float, float] | None = None
    made_at: float | None = None
    source: Literal["stream", "dataset"] = "stream"

    def __post_init__(self) -> None:
        if self.volume.ndim != 3:
            raise ViewerError(f"t={self.timepoint} c={self.channel}: a frame needs a (z, y, x) volume, got "
                              f"{self.volume.ndim}D {self.volume.shape}")
        z, y, x = self.volume.shape
        want = {"z": (y, x), "y": (z, x), "x": (z, y)}
        for ax in MIP_AXES:
            got = self.mips.get(ax)
            if got is None or got.shape != want[ax]:
                raise ViewerError(f"t={self.timepoint} c={self.channel}: MIP {ax} of a {self.volume.shape} volume must "
                                  f"be {want[ax]}, got {None if got is None else got.shape}")
        if self.voxel_size_um is not None and not all(math.isfinite(v) and v > 0 for v in self.voxel_size_um):
            raise ViewerError(f"t={self.timepoint}: voxel size {self.voxel_size_um} µm must be three positive numbers")

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.acquisition_id, self.timepoint, self.channel)


def frame_from_volume(volume: np.ndarray, **kw: Any) -> Frame:
    """A :class:`Frame` whose MIPs are computed here (when the source did not publish them)."""
    vol = np.asarray(volume)
    if vol.ndim != 3:
        raise ViewerError(f"a frame needs a (z, y, x) volume, got {vol.ndim}D {vol.shape}")
    return Frame(vol, {ax: vol.max(axis=i) for i, ax in enumerate(MIP_AXES)}, **kw)


# --- layers --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerSpec:
    """One napari image layer: always 3D ``(z, y, x)`` data, so MIPs sit as walls around the volume.

    ``data`` of a MIP is the received projection with a length-1 axis where the projected axis was; ``scale`` and
    ``translate`` are in ``unit`` (µm when the voxel size is known).
    """

    name: str
    role: Literal["volume", "mip"]
    axis: str | None
    channel: int
    data: np.ndarray
    scale: tuple[float, float, float]
    translate: tuple[float, float, float]
    contrast_limits: tuple[float, float]
    colormap: str
    unit: str
    rendering: str


def layer_name(role: str, channel: int, axis: str | None = None) -> str:
    return f"fused c{channel}" if role == "volume" else f"MIP {axis} c{channel}"


def resolve_layers(frame: Frame, contrast_limits: tuple[float, float], *, gap: float = 0.08) -> tuple[LayerSpec, ...]:
    """The four layers of ``frame``: the volume (rendered as a 3D MIP) and its three projections as walls.

    Each MIP lies on the far side of the axis it projects away, ``gap`` × the largest extent away from the volume,
    so that looking at the volume obliquely shows it with its three "shadows", all in physical units.
    """
    vox = frame.voxel_size_um
    scale = tuple(float(v) for v in vox) if vox is not None else (1.0, 1.0, 1.0)
    unit = "µm" if vox is not None else "voxel"
    extent = [n * s for n, s in zip(frame.volume.shape, scale)]
    offset = gap * max(extent)
    cmap = CHANNEL_COLORMAPS[frame.channel % len(CHANNEL_COLORMAPS)]
    common = dict(channel=frame.channel, scale=scale, contrast_limits=contrast_limits, colormap=cmap, unit=unit)
    specs = [LayerSpec(name=layer_name("volume", frame.channel), role="volume", axis=None, data=frame.volume,
                       translate=(0.0, 0.0, 0.0), rendering="mip", **common)]
    for i, ax in enumerate(MIP_AXES):
        data = np.expand_dims(frame.mips[ax], i)
        translate = [0.0, 0.0, 0.0]
        translate[i] = extent[i] + offset
        specs.append(LayerSpec(name=layer_name("mip", frame.channel, ax), role="mip", axis=ax, data=data,
                               translate=tuple(translate), rendering="mip", **common))
    return tuple(specs)


# --- contrast ------------------------------------------------------------------------------------------------------


def auto_contrast(image: np.ndarray, low: float = 0.1, high: float = 99.9) -> tuple[float, float]:
    """Contrast limits from the ``low``/``high`` percentiles of the finite values; never an empty range."""
    arr = np.asarray(image, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        return (0.0, 1.0)
    lo, hi = (float(v) for v in np.percentile(finite, (low, high)))
    if hi <= lo:  # a flat image: any non-empty window around its value
        hi = lo + max(1.0, abs(lo) * 1e-6)
    return (lo, hi)


@dataclass(frozen=True)
class ContrastState:
    """Contrast of one channel: follows each new volume until locked, then stays where it was (or was set)."""

    limits: tuple[float, float] | None = None
    locked: bool = False

    def update(self, frame: Frame) -> ContrastState:
        """The state after ``frame`` arrived: auto-contrast from its z MIP unless locked.

        The z MIP holds what the 3D MIP rendering shows (maxima along rays), so its percentiles suit every layer, and
        it is 1/z the work of the volume's.
        """
        if self.locked and self.limits is not None:
            return self
        return replace(self, limits=auto_contrast(frame.mips["z"]))

    def lock(self, limits: tuple[float, float] | None = None) -> ContrastState:
        """Lock at ``limits`` (e.g. what the user set with the slider), or at the current ones."""
        lim = self.limits if limits is None else (float(limits[0]), float(limits[1]))
        if lim is not None and not lim[1] > lim[0]:
            raise ViewerError(f"contrast limits {lim} must be increasing")
        return ContrastState(limits=lim, locked=True)

    def unlock(self) -> ContrastState:
        return replace(self, locked=False)


# --- follow / pause ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Follower:
    """Follow the latest frame, or pause on what is shown while newer frames keep arriving (held, latest wins)."""

    following: bool = True
    shown: tuple[str, int, int] | None = None
    pending: Frame | None = field(default=None, compare=False)
    received: int = 0
    held: int = 0  # frames that arrived while paused and were replaced by a newer one before being shown

    def offer(self, frame: Frame) -> tuple[Follower, Frame | None]:
        """A frame arrived: returns the new state and the frame to show now (None while paused)."""
        n = self.received + 1
        if self.following:
            return replace(self, shown=frame.key, pending=None, received=n), frame
        held = self.held + (self.pending is not None)
        return replace(self, pending=frame, received=n, held=held), None

    def pause(self) -> Follower:
        return replace(self, following=False)

    def resume(self) -> tuple[Follower, Frame | None]:
        """Follow again; returns the newest frame that arrived while paused (shown at once), if any."""
        frame = self.pending
        state = replace(self, following=True, pending=None)
        if frame is not None:
            state = replace(state, shown=frame.key)
        return state, frame

    def toggle(self) -> tuple[Follower, Frame | None]:
        return self.resume() if not self.following else (self.pause(), None)


def frame_text(frame: Frame, *, following: bool = True, dropped: int = 0, received: int | None = None,
               now: float | None = None, multiline: bool = False) -> str:
    """The line shown with the view: acquisition, t/c, shape and voxel size, latency, dropped, follow state.

    ``multiline`` puts what, where and how-live on three lines (for the canvas overlay).
    """
    now = time.time() if now is None else now
    z, y, x = frame.volume.shape
    vox = frame.voxel_size_um
    size = f"{z}×{y}×{x}" + (f" at {vox[0]:.3g}×{vox[1]:.3g}×{vox[2]:.3g} µm" if vox else " (voxel size unknown)")
    live = []
    if frame.made_at is not None:
        what = "latency" if frame.source == "stream" else "written"
        live.append(f"{what} {max(0.0, now - frame.made_at):.2f} s" + (" ago" if frame.source == "dataset" else ""))
    if received is not None:
        live.append(f"received {received}")
    live.append(f"dropped {dropped}")
    live.append("following" if following else "paused")
    groups = [[frame.acquisition_id, f"t={frame.timepoint} c={frame.channel}"], [size], live]
    if multiline:
        return "\n".join(" · ".join(g) for g in groups)
    return " · ".join(p for g in groups for p in g)


# --- a service's status, for the dock widget -------------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceStatusView:
    """What the dock widget shows of a service's ``status`` reply."""

    state: str
    error: str | None
    queue_depth: int
    queues: Mapping[str, Any]
    stages: tuple[tuple[str, float, float], ...]  # (stage, p50 ms, p99 ms)
    errors: int
    last_errors: tuple[str, ...]
    dropped: Mapping[str, float]
    display: str | None
    datasets: Mapping[str, str]
    volumes_output: int

    @property
    def current_dataset(self) -> str | None:
        """The dataset of the newest acquisition (the status lists them in the order they started)."""
        return list(self.datasets.values())[-1] if self.datasets else None

    def lines(self) -> list[str]:
        out = [f"state: {self.state}   volumes: {self.volumes_output}   queue depth: {self.queue_depth}"]
        if self.error:
            out.append(f"ERROR: {self.error}")
        out.append("queues: " + "  ".join(f"{k}={v}" for k, v in self.queues.items()))
        if self.stages:
            out.append(f"{'stage':<16} {'p50 ms':>9} {'p99 ms':>9}")
            out.extend(f"{name[:16]:<16} {p50:9.1f} {p99:9.1f}" for name, p50, p99 in self.stages)
        out.append(f"errors: {self.errors}" + "".join(f"\n  {e}" for e in self.last_errors[-3:]))
        out.append("dropped: " + ("  ".join(f"{k}={v:g}" for k, v in self.dropped.items()) or "none"))
        if self.current_dataset:
            out.append(f"dataset: {self.current_dataset}")
        return out


_DROP_COUNTERS = ("messages_rejected", "stacks_incomplete", "display_superseded", "frames_dropped", "display_errors")


def service_status_view(status: Mapping[str, Any]) -> ServiceStatusView:
    """Resolve a ``status`` reply (:meth:`streamer.service.Service.status`) into what the widget shows.

    Raises
    ------
    ViewerError
        If the reply is an error answer (``{"ok": false, ...}``) or not a status at all.
    """
    if status.get("ok") is False:
        raise ViewerError(f"the service answered: {status.get('error', 'an error without a message')}")
    if "queues" not in status or "counters" not in status:
        raise ViewerError(f"not a status reply (keys: {sorted(status)[:8]})")
    counters = status.get("counters", {})
    queues = dict(status.get("queues", {}))
    stages = tuple((name, float(st.get("p50_ms", float("nan"))), float(st.get("p99_ms", float("nan"))))
                   for name, st in status.get("stages", {}).items())
    errs = status.get("errors", {}) or {}
    n_err = int(sum(errs.get("by_type", {}).values())) + int(counters.get("stage_errors", 0))
    dropped = {k: float(counters[k]) for k in _DROP_COUNTERS if counters.get(k)}
    out_drops = sum(float(v) for v in (status.get("output_drops") or {}).values())
    if out_drops:
        dropped["output_queue_full"] = out_drops
    return ServiceStatusView(
        state=str(status.get("state", "unknown")), error=status.get("error"),
        queue_depth=int(queues.get("backlog", 0)), queues=queues, stages=stages, errors=n_err,
        last_errors=tuple(str(e) for e in errs.get("last", [])), dropped=dropped,
        display=status.get("display"), datasets=dict(status.get("datasets") or {}),
        volumes_output=int(counters.get("volumes_output", 0)),
    )
