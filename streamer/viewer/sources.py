"""Where frames come from: the service's display stream, or an OME-Zarr dataset that may still be written. No GUI.

Both sources answer :meth:`poll` with the newest frame of each channel that arrived since the last call — latest wins,
as on the stream itself: a viewer that falls behind skips to the newest volume and counts what it skipped, it never
queues. The voxel size is read from the data's own metadata (the display header; NGFF ``coordinateTransformations``)
so the viewer shows whatever the writer declared.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from streamer.display import DisplayClient, DisplayError, DisplayMessage
from streamer.sinks.volume_log import LOG_NAME
from streamer.viewer.model import MIP_AXES, Frame, ViewerError, frame_from_volume

log = logging.getLogger(__name__)


class StreamSource:
    """Frames from a display stream (:class:`~streamer.display.DisplayPublisher`): each volume with its published MIPs.

    Parameters
    ----------
    endpoint
        The service's display endpoint (``rllsm serve --display``).
    mip_wait_s
        How long to wait for the MIPs of a volume that arrived without them before computing them here (they travel
        as separate messages right behind it; a slow viewer may have lost them to latest-wins).
    """

    def __init__(self, endpoint: str, *, mip_wait_s: float = 0.25, context: zmq.Context | None = None) -> None:
        try:
            self.client = DisplayClient(endpoint, kinds=("volume", "mip"), context=context)
        except DisplayError as err:
            raise ViewerError(str(err)) from None
        self.endpoint = endpoint
        self.mip_wait_s = mip_wait_s
        self.volumes_received = 0
        self.volumes_skipped = 0  # received but replaced by a newer volume of the same channel before being shown
        self.volumes_missed = 0  # published but never received (gaps in the publisher's volume seq)
        self.mips_computed = 0  # volumes whose MIPs had to be computed here
        self._last_seq: int | None = None
        self._mips: dict[tuple[str, int, int], dict[str, DisplayMessage]] = {}

    @property
    def dropped(self) -> int:
        """Published volumes this viewer will never show: missed on the wire plus skipped for a newer one."""
        return self.volumes_missed + self.volumes_skipped

    def _take(self, msg: DisplayMessage, volumes: dict[int, DisplayMessage]) -> None:
        h = msg.header
        if h.kind == "volume":
            if self._last_seq is not None and h.seq > self._last_seq + 1:
                self.volumes_missed += h.seq - self._last_seq - 1
            self._last_seq = h.seq  # a restarted service starts again at 0: no gap counted
            self.volumes_received += 1
            if h.channel in volumes:
                self.volumes_skipped += 1
            volumes[h.channel] = msg
        elif h.axis is not None:
            key = (h.acquisition_id, h.timepoint, h.channel)
            self._mips.setdefault(key, {})[h.axis] = msg
            while len(self._mips) > 16:  # MIPs whose volume was superseded: forget the oldest
                self._mips.pop(next(iter(self._mips)))

    def _complete(self, vol: DisplayMessage) -> bool:
        h = vol.header
        return len(self._mips.get((h.acquisition_id, h.timepoint, h.channel), {})) == len(MIP_AXES)

    def poll(self, timeout: float | None = 0.1) -> list[Frame]:
        """Wait up to ``timeout`` s for a volume, take everything queued, return the newest frame of each channel."""
        volumes: dict[int, DisplayMessage] = {}
        deadline = None if timeout is None else time.monotonic() + timeout
        while not volumes:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            msg = self.client.recv(left)
            if msg is None:
                return []
            self._take(msg, volumes)
        # drain what is queued, then give the newest volumes' MIPs (right behind them) a moment to arrive
        mip_deadline = time.monotonic() + self.mip_wait_s
        while True:
            waiting = not all(self._complete(v) for v in volumes.values())
            left = max(0.0, mip_deadline - time.monotonic()) if waiting else 0.0
            msg = self.client.recv(left)
            if msg is None:
                break
            self._take(msg, volumes)
        return [self._frame(v) for _, v in sorted(volumes.items())]

    def _frame(self, vol: DisplayMessage) -> Frame:
        h = vol.header
        key = (h.acquisition_id, h.timepoint, h.channel)
        got = self._mips.pop(key, {})
        common: dict[str, Any] = dict(acquisition_id=h.acquisition_id, timepoint=h.timepoint, channel=h.channel,
                                      voxel_size_um=h.voxel_size_um, made_at=h.sent_at, source="stream")
        if len(got) == len(MIP_AXES):
            return Frame(vol.array, {ax: m.array for ax, m in got.items()}, **common)
        self.mips_computed += 1
        return frame_from_volume(vol.array, **common)

    def close(self) -> None:
        self.client.close()


# --- OME-Zarr -----------------------------------------------------------------------------------------------------

_TO_UM = {"micrometer": 1.0, "nanometer": 1e-3, "millimeter": 1e3, "centimeter": 1e4, "meter": 1e6,
          "angstrom": 1e-4, "picometer": 1e-6}


def ngff_voxel_size_um(ome: Mapping[str, Any], dataset: int = 0) -> tuple[tuple[str, ...], tuple[float, ...] | None,
                                                                         str]:
    """Axis names, the ``(z, y, x)`` voxel size in µm and the array path of an NGFF ``multiscales`` document.

    The scale is the product of the dataset's and the multiscale's ``scale`` transformations, converted from each
    axis' declared unit; None when a spatial axis carries no known length unit.

    Raises
    ------
    ViewerError
        If the document has no multiscales, no z/y/x axes, or a scale that does not match the axes.
    """
    ms = ome.get("multiscales") or []
    if not ms:
        raise ViewerError("no NGFF multiscales in the dataset's attributes (is it an OME-Zarr image?)")
    m = ms[0]
    axes = m.get("axes") or []
    names = tuple(a["name"] if isinstance(a, dict) else str(a) for a in axes)
    if names[-3:] != ("z", "y", "x"):
        raise ViewerError(f"the viewer needs the last three axes to be z, y, x; this dataset has {list(names)}")
    datasets = m.get("datasets") or []
    if len(datasets) <= dataset:
        raise ViewerError(f"NGFF multiscales lists {len(datasets)} datasets, no level {dataset}")
    scale = np.ones(len(names))
    for transforms in (datasets[dataset].get("coordinateTransformations") or [],
                       m.get("coordinateTransformations") or []):
        for t in transforms:
            if t.get("type") == "scale" and "scale" in t:
                s = np.asarray(t["scale"], dtype=float)
                if s.shape != scale.shape:
                    raise ViewerError(f"NGFF scale {list(s)} has {s.size} values for {len(names)} axes {list(names)}")
                scale = scale * s
    factors = []
    for a in axes[-3:]:
        unit = a.get("unit") if isinstance(a, dict) else None
        factors.append(_TO_UM.get(unit) if unit else None)
    if any(f is None for f in factors):
        vox = None
    else:
        vox = tuple(float(s * f) for s, f in zip(scale[-3:], factors))  # type: ignore[operator]
        if not all(math.isfinite(v) and v > 0 for v in vox):
            raise ViewerError(f"NGFF scale gives a voxel size of {vox} µm; it must be positive")
    return names, vox, str(datasets[dataset]["path"])


class DatasetSource:
    """Frames from an OME-Zarr dataset (NGFF 0.5, Zarr v3, on a local disk) while it is being written.

    A timepoint is shown once it is whole. Our writer says so itself: its volume table (``0/rllsm_volumes.jsonl``,
    :mod:`streamer.sinks.volume_log`) gets a line once a volume's chunks are written, read here incrementally (and
    ``attributes.rllsm.stored``, the summary, for datasets written before the table existed). For other writers the
    chunk files tell: all of a timepoint's
    chunks are there, or a later timepoint has started (writers go in order), or its chunks did not change for
    ``settle_s`` (chunks equal to the fill value are never written, so a count alone cannot tell), or the dataset
    is marked complete. A dataset that does not exist yet (our writer creates it under ``<name>.partial`` and
    renames it after the first volume) is waited for.
    """

    def __init__(self, path: str | Path, *, settle_s: float = 0.5) -> None:
        self.path = Path(path)
        self.settle_s = settle_s
        self.axes: tuple[str, ...] = ()
        self.voxel_size_um: tuple[float, ...] | None = None
        self.array_path = "0"
        self.acquisition_id = self.path.name
        self._opened = False
        self._shown: dict[int, tuple[int, int, float]] = {}  # channel -> (t, chunk files, newest mtime) shown
        self._seen: dict[tuple[int, int], tuple[int, float, float]] = {}  # (t, c) -> (files, mtime, first seen)
        self.frames_read = 0
        self._log_pos = 0  # bytes of the volume table already read
        self._logged: set[tuple[int, int]] = set()  # (t, c) the table says are stored
        if (self.path / "zarr.json").exists():
            self._open()

    def _open(self) -> None:
        try:
            group = json.loads((self.path / "zarr.json").read_text())
        except (OSError, ValueError) as err:
            raise ViewerError(f"cannot read {self.path / 'zarr.json'}: {err}") from None
        attrs = group.get("attributes", {})
        ome = attrs.get("ome", attrs)  # NGFF 0.5 nests under "ome"; 0.4 put multiscales at the top
        self.axes, self.voxel_size_um, self.array_path = ngff_voxel_size_um(ome)
        self.acquisition_id = str((attrs.get("rllsm") or {}).get("acquisition_id")
                                  or ome["multiscales"][0].get("name") or self.path.name)
        self._opened = True

    def _array_meta(self) -> dict[str, Any]:
        meta = json.loads((self.path / self.array_path / "zarr.json").read_text())
        if meta.get("zarr_format") != 3:
            raise ViewerError(f"{self.path}: only Zarr v3 arrays are followed live (found zarr_format "
                              f"{meta.get('zarr_format')})")
        return meta

    def _chunks_by_index(self, meta: dict[str, Any]) -> dict[tuple[int, ...], tuple[int, float]]:
        """Chunk files per leading (t, c) chunk index: (count, newest mtime). Only the default key encoding."""
        enc = meta.get("chunk_key_encoding", {})
        sep = (enc.get("configuration") or {}).get("separator", "/")
        if enc.get("name", "default") != "default" or sep != "/":
            raise ViewerError(f"{self.path}: chunk key encoding {enc} is not followed live (only 'default' with '/')")
        lead = len(self.axes) - 3
        root = self.path / self.array_path / "c"
        out: dict[tuple[int, ...], tuple[int, float]] = {}
        if not root.is_dir():
            return out
        for dirpath, _, files in os.walk(root):
            names = [f for f in files if not f.endswith(".partial")]
            if not names:
                continue
            rel = Path(dirpath).relative_to(root).parts
            if len(rel) < lead:
                continue
            try:
                key = tuple(int(p) for p in rel[:lead])
            except ValueError:
                continue
            n, mt = out.get(key, (0, 0.0))
            mtime = max(os.stat(os.path.join(dirpath, f)).st_mtime for f in names)
            out[key] = (n + len(names), max(mt, mtime))
        return out

    def poll(self, timeout: float | None = 0.1) -> list[Frame]:
        """Look for newly finished timepoints for up to ``timeout`` s; the newest of each channel, read whole."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            frames = self._poll_once()
            if frames or (deadline is not None and time.monotonic() >= deadline):
                return frames
            time.sleep(0.05 if deadline is None else min(0.05, max(0.0, deadline - time.monotonic())))

    def _read_volume_table(self) -> bool:
        """Take the table's new whole lines into ``_logged``; False when the dataset has no table."""
        path = self.path / LOG_NAME
        try:
            with open(path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size < self._log_pos:  # cut back (a torn line dropped at a restart): read it again
                    self._log_pos, self._logged = 0, set()
                fh.seek(self._log_pos)
                data = fh.read(size - self._log_pos)
        except FileNotFoundError:
            return False
        whole = data[: data.rfind(b"\n") + 1]  # a line still being appended waits for the next poll
        self._log_pos += len(whole)
        for line in whole.splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("stored") and isinstance(rec.get("t"), int) \
                    and isinstance(rec.get("c"), int):
                self._logged.add((rec["t"], rec["c"]))
        return True

    def _poll_once(self) -> list[Frame]:
        if not self._opened:
            if not (self.path / "zarr.json").exists():
                return []  # not created (or not yet renamed from .partial): wait
            self._open()
        try:
            meta = self._array_meta()
            group = json.loads((self.path / "zarr.json").read_text())
        except (OSError, ValueError):
            return []  # the writer is replacing zarr.json this instant: next poll
        ours = (group.get("attributes") or {}).get("rllsm") or {}
        complete = bool(ours.get("complete"))
        stored = {(int(t), int(c)) for t, c in ours["stored"]} if isinstance(ours.get("stored"), list) else None
        if self._read_volume_table():  # the per-volume truth; the attributes' list is a summary that lags
            stored = (stored or set()) | self._logged
        shape = tuple(meta["shape"])
        grid = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        per_volume = int(np.prod([-(-s // c) for s, c in zip(shape[-3:], grid[-3:])]))
        chunks = self._chunks_by_index(meta)
        has_t = "t" in self.axes[:-3]
        has_c = "c" in self.axes[:-3]
        t_chunk = grid[self.axes.index("t")] if has_t else 1
        now = time.time()
        newest: dict[int, tuple[int, int, float]] = {}
        latest_t = max((k[0] for k in chunks), default=-1) if has_t else 0
        for key, (n, mtime) in sorted(chunks.items()):
            t = key[0] * t_chunk if has_t else 0
            c = key[self.axes.index("c")] if has_c else 0
            first = self._seen.get((t, c))
            if first is None or first[:2] != (n, mtime):
                self._seen[(t, c)] = (n, mtime, now)
                first = self._seen[(t, c)]
            if stored is not None:  # the writer lists what it finished: nothing to guess
                settled = (t, c) in stored
            else:
                settled = n >= per_volume * max(1, t_chunk) or complete or (has_t and key[0] < latest_t) \
                    or now - first[2] >= self.settle_s
            if settled and (c not in newest or t >= newest[c][0]):
                newest[c] = (t, n, mtime)
        frames = []
        for c, (t, n, mtime) in sorted(newest.items()):
            if self._shown.get(c) == (t, n, mtime):
                continue
            frame = self._read(t, c, mtime)
            if frame is not None:
                self._shown[c] = (t, n, mtime)
                frames.append(frame)
        return frames

    def _read(self, t: int, c: int, mtime: float) -> Frame | None:
        import zarr

        try:
            arr = zarr.open_array(store=str(self.path / self.array_path), mode="r")
            index = tuple([t] if "t" in self.axes[:-3] else []) + tuple([c] if "c" in self.axes[:-3] else [])
            volume = np.asarray(arr[index])
        except Exception as err:  # a chunk replaced while read, an array resized: the next poll reads it again
            log.debug("reading t=%d c=%d of %s failed this time: %s", t, c, self.path, err)
            return None
        self.frames_read += 1
        return frame_from_volume(volume, acquisition_id=self.acquisition_id, timepoint=t, channel=c,
                                 voxel_size_um=self.voxel_size_um, made_at=mtime, source="dataset")

    @property
    def dropped(self) -> int:
        return 0  # nothing is lost on disk: the viewer only skips to the newest timepoint

    def close(self) -> None:
        pass


def open_source(target: Any, **kw: Any) -> StreamSource | DatasetSource:
    """The source for a resolved :class:`~streamer.viewer.model.Target`."""
    if target.kind == "stream":
        return StreamSource(target.endpoint, **kw)
    return DatasetSource(target.path, **kw)
