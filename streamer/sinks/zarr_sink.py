"""Fused volumes appended along t to one OME-Zarr dataset (NGFF 0.5 on Zarr v3), written with zarr-python.

Layout: a group whose ``zarr.json`` carries ``attributes.ome`` (``version: "0.5"``, one ``multiscales`` entry with
axes t, c, z, y, x in seconds / micrometres and a scale transformation holding the voxel size, plus ``omero`` channel
names, colours and display windows), and one array ``0`` of shape ``(t, c, z, y, x)``. When the number of
timepoints is unknown the array grows along t as volumes arrive (a metadata-only resize in Zarr v3).

Volumes that never arrive are listed under ``attributes.rllsm.skipped`` with their reason; their chunks stay absent
(the fill value 0), so a viewer shows them as empty rather than as stale data.

Why this design (measured in docs/benchmarks/writers.md): zarr-python creates the group, the array and the NGFF 0.5
document (so we control the metadata and accept volumes that finish out of order, which the in-order streams of
ome-writers and acquire-zarr do not); the chunk data are written by tensorstore when it is installed (2.5× zarr-python
on the 2-core container, on par with ome-writers, which uses tensorstore too), else by zarr-python. The opt-in
``direct`` backend writes uncompressed slabs of whole planes with one ``write()`` each straight from the volume's
memory (a Zarr v3 chunk with only the bytes codec is exactly those bytes): >2 GB/s best there.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from streamer.sinks.base import (
    SinkSetupError,
    SinkStateError,
    SinkStats,
    SinkWriteError,
    VolumeIndex,
    VolumeMeta,
    check_volume,
    describe_os_error,
)
from streamer.sinks.config import OmeZarrConfig, ZarrCompression

log = logging.getLogger(__name__)
NGFF_VERSION = "0.5"
AXES = ("t", "c", "z", "y", "x")


def channel_color(name: str) -> str:
    """Display colour (RRGGBB) for a channel named by its excitation wavelength in nm; white if not a number."""
    try:
        nm = float(str(name).rstrip("nm").strip())
    except ValueError:
        return "FFFFFF"
    for limit, color in ((430, "8000FF"), (500, "00FFFF" if nm < 470 else "00FF00"), (570, "FFFF00"), (620, "FF8000")):
        if nm < limit:
            return color
    return "FF0000" if nm < 700 else "FF00FF"


def ngff_attributes(meta: VolumeMeta, *, dataset: str = "0", window: dict[int, tuple[float, float]] | None = None
                    ) -> dict[str, Any]:
    """The ``ome`` attribute document (NGFF 0.5) for a ``(t, c, z, y, x)`` dataset described by ``meta``.

    A pure function so that tests and other writers produce the very same metadata.
    """
    dz, dy, dx = (float(v) for v in meta.voxel_size_um)
    dt = float(meta.time_interval_s) if meta.time_interval_s else 1.0
    axes = [
        {"name": "t", "type": "time", "unit": "second"},
        {"name": "c", "type": "channel"},
        {"name": "z", "type": "space", "unit": "micrometer"},
        {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"},
    ]
    dtype = np.dtype(meta.dtype)
    if dtype.kind in "ui":
        lo, hi = float(np.iinfo(dtype).min), float(np.iinfo(dtype).max)
    else:
        lo, hi = 0.0, 1.0
    channels = []
    for i, name in enumerate(meta.channels):
        start, end = (window or {}).get(i, (lo, hi))
        channels.append({
            "label": str(name), "color": channel_color(name), "active": True,
            "window": {"min": lo if dtype.kind in "ui" else start, "max": hi if dtype.kind in "ui" else end,
                       "start": start, "end": end},
        })
    return {
        "version": NGFF_VERSION,
        "multiscales": [{
            "name": meta.acquisition_id,
            "axes": axes,
            "datasets": [{"path": dataset, "coordinateTransformations": [
                {"type": "scale", "scale": [dt, 1.0, dz, dy, dx]},
            ]}],
        }],
        "omero": {"channels": channels, "rdefs": {"model": "color" if len(channels) > 1 else "greyscale"}},
    }


def _codecs(cfg: OmeZarrConfig) -> Any:
    from zarr.codecs import BloscCodec, ZstdCodec

    if cfg.compression is ZarrCompression.none:
        return None
    if cfg.compression is ZarrCompression.lz4:
        return BloscCodec(cname="lz4", clevel=1, shuffle="bitshuffle")
    return ZstdCodec(level=1)


_TS_ERRNO = {"No space left": "disk full", "File too large": "file larger than this system or its limits allow",
             "Permission denied": "no permission", "No such file": "folder no longer exists",
             "Read-only file system": "read-only file system", "Disk quota": "disk quota exceeded"}


def describe_error(err: BaseException) -> str:
    """:func:`describe_os_error` for OSError; for tensorstore's ValueError, the same words found in its text."""
    if isinstance(err, OSError):
        return describe_os_error(err)
    text = str(err)
    for needle, what in _TS_ERRNO.items():
        if needle in text:
            return f"{what} ({text})"
    return text


def direct_chunks(shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """Chunks for the ``direct`` backend: slabs of whole planes, ≤ 16 planes and ≤ 64 MiB of uint16 per chunk."""
    z, y, x = shape
    cz = max(1, min(z, 16, (64 << 20) // max(1, 2 * y * x)))
    return (cz, y, x)


def default_chunks(shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """Chunks of ≤ 64×256×256: small enough for a viewer to fetch a plane, large enough to write fast."""
    z, y, x = shape
    return (min(z, 64), min(y, 256), min(x, 256))


class OmeZarrSink:
    """Synchronous OME-Zarr writer; put it behind :class:`~streamer.sinks.threaded.ThreadedSink` in the service.

    Parameters
    ----------
    config
        Where and how to write (see :class:`~streamer.sinks.config.OmeZarrConfig`).
    """

    def __init__(self, config: OmeZarrConfig) -> None:
        self.config = config
        self.name = "ome-zarr"
        self.stats = SinkStats()
        self.path = Path(config.path)
        self._meta: VolumeMeta | None = None
        self._group: Any = None
        self._array: Any = None
        self._n_t = 0
        self._last_t = -1
        self._closed = False
        self._ts: Any = None
        self._made: set[Path] = set()
        self._range: dict[int, tuple[float, float]] = {}

    def setup(self, meta: VolumeMeta) -> None:
        """Create the dataset and write its NGFF metadata.

        Raises
        ------
        SinkSetupError
            If the dataset exists (and ``overwrite`` is off) or its folder cannot be written.
        """
        import zarr

        if self._meta is not None:
            raise SinkStateError(f"{self.name}: setup() called twice")
        p = self.path
        if p.exists() and not self.config.overwrite:
            raise SinkSetupError(f"{self.name}: {p} already exists; choose another path or set overwrite")
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            if p.exists():
                shutil.rmtree(p)
            z, y, x = meta.shape
            n_t = meta.n_timepoints or 1
            direct = self.config.backend == "direct"
            chunks = self.config.chunk_zyx or (direct_chunks(meta.shape) if direct else default_chunks(meta.shape))
            chunks = tuple(min(c, s) for c, s in zip(chunks, meta.shape))
            if direct:
                self._check_direct(meta, chunks)
            self._chunks = chunks
            group = zarr.open_group(store=str(p), mode="w", zarr_format=3)
            kwargs: dict[str, Any] = dict(
                name="0", shape=(n_t, len(meta.channels), z, y, x), dtype=np.dtype(meta.dtype),
                fill_value=0, dimension_names=list(AXES), compressors=_codecs(self.config),
            )
            if self.config.shard:
                # one shard holds a whole volume; it must be a whole number of chunks, so it may overhang the edge
                shard = tuple(-(-s // c) * c for s, c in zip(meta.shape, chunks))
                kwargs.update(chunks=(1, 1, *chunks), shards=(1, 1, *shard))
            else:
                kwargs.update(chunks=(1, 1, *chunks))
            self._array = group.create_array(**kwargs)
            group.attrs.update({"ome": ngff_attributes(meta), "rllsm": self._provenance(meta)})
            self._ts = None if direct else (self._open_tensorstore(p / "0") if self._use_tensorstore() else None)
        except (OSError, ValueError) as err:
            raise SinkSetupError(f"{self.name}: cannot create {p}: {describe_error(err)}") from err
        self._group = group
        self._meta = meta
        self._n_t = n_t

    def _check_direct(self, meta: VolumeMeta, chunks: tuple[int, ...]) -> None:
        problems = []
        if self.config.compression is not ZarrCompression.none:
            problems.append(f"compression is {self.config.compression.value}")
        if self.config.shard:
            problems.append("shard is on")
        if tuple(chunks[1:]) != tuple(meta.shape[1:]):
            problems.append(f"chunks {chunks} do not span whole planes {meta.shape[1:]}")
        if problems:
            raise SinkSetupError(f"{self.name}: backend 'direct' writes each chunk as the volume's own bytes, which needs "
                                 f"no compression, no shards and chunks of whole planes; here {', '.join(problems)}")

    def _write_direct(self, volume: np.ndarray, index: VolumeIndex) -> None:
        # With the bytes codec alone a chunk file *is* the little-endian C-order bytes of the chunk; a z-slab of
        # whole planes is contiguous in the volume, so each chunk is one write() straight from the caller's memory.
        vol = np.ascontiguousarray(volume, dtype=volume.dtype.newbyteorder("<"))
        cz = self._chunks[0]
        folder = self.path / "0" / "c" / str(index.timepoint) / str(index.channel)
        for k, z0 in enumerate(range(0, vol.shape[0], cz)):
            slab = vol[z0:z0 + cz]
            if slab.shape[0] < cz:  # edge chunks are stored full size, padded with the fill value
                padded = np.zeros((cz, *vol.shape[1:]), vol.dtype)
                padded[: slab.shape[0]] = slab
                slab = padded
            target = folder / str(k) / "0" / "0"
            if target.parent not in self._made:  # mkdir is slow on overlay/network filesystems: once per folder
                target.parent.mkdir(parents=True, exist_ok=True)
                self._made.add(target.parent)
            tmp = target.with_name("0.partial")
            try:
                with open(tmp, "wb") as f:
                    f.write(memoryview(slab).cast("B"))
                os.replace(tmp, target)  # a reader never sees half a chunk
            except OSError:
                tmp.unlink(missing_ok=True)
                raise

    def _use_tensorstore(self) -> bool:
        if self.config.backend in ("zarr-python", "direct"):
            return False
        try:
            import tensorstore  # noqa: F401
        except ImportError:
            if self.config.backend == "tensorstore":
                raise SinkSetupError(f"{self.name}: backend 'tensorstore' asked for, but the tensorstore package is "
                                     "not installed (pip install tensorstore)") from None
            return False
        return True

    @staticmethod
    def _open_tensorstore(path: Path) -> Any:
        # zarr-python created the array (same metadata, codecs and shards either way); tensorstore only writes
        # chunks, in C++ threads without the GIL
        import tensorstore as ts

        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}
        return ts.open(spec, open=True, write=True).result()

    @property
    def backend(self) -> str:
        """The library that writes the chunks: ``"tensorstore"`` or ``"zarr-python"``."""
        if self.config.backend == "direct":
            return "direct"
        return "tensorstore" if self._ts is not None else "zarr-python"

    def _resize(self, n_t: int) -> None:
        if self._ts is not None:
            self._ts = self._ts.resize(exclusive_max=[n_t, None, None, None, None], resize_metadata_only=True,
                                       shrink_only=n_t < self._ts.shape[0], expand_only=n_t > self._ts.shape[0]
                                       ).result()
        else:
            self._array.resize((n_t, *self._array.shape[1:]))

    def _provenance(self, meta: VolumeMeta) -> dict[str, Any]:
        return {
            "acquisition_id": meta.acquisition_id,
            "optics": meta.optics.model_dump(mode="json") if meta.optics is not None else None,
            "metadata": json.loads(json.dumps(dict(meta.metadata), default=str)),
            "written": self.stats.written,
            "complete": self._closed,
            "skipped": {f"t={i.timepoint} c={i.channel}": r for i, r in sorted(self.stats.skipped.items())},
        }

    def append(self, volume: np.ndarray, index: VolumeIndex) -> None:
        """Write one volume at ``(t, c)``, growing the array along t if needed.

        Raises
        ------
        SinkWriteError
            Naming the volume and what the disk said (disk full, permission lost).
        """
        if self._closed:
            raise SinkStateError(f"{self.name}: append({index.label()}) after close()")
        check_volume(self._meta, volume, index, self.name)
        try:
            if index.timepoint >= self._n_t:
                # grow geometrically so an open-ended acquisition rewrites zarr.json O(log T) times, not T times
                self._n_t = max(index.timepoint + 1, 2 * self._n_t)
                self._resize(self._n_t)
            if self.config.backend == "direct":
                self._write_direct(volume, index)
            elif self._ts is not None:
                self._ts[index.timepoint, index.channel].write(volume).result()
            else:
                self._array[index.timepoint, index.channel] = volume
        except (OSError, ValueError) as err:  # tensorstore reports I/O failures as ValueError with the OS text
            self.stats.errors += 1
            msg = f"{self.name}: {describe_error(err)} while writing {index.label()} to {self.path}"
            self.stats.last_error = msg
            raise SinkWriteError(msg, index=index, cause=err) from err
        self._last_t = max(self._last_t, index.timepoint)
        # the display window only needs the range roughly: a 1/64 subsample costs 1/64 of two passes over the volume
        sample = volume[::4, ::4, ::4]
        lo, hi = float(sample.min()), float(sample.max())
        old = self._range.get(index.channel)
        self._range[index.channel] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))
        self.stats.written += 1
        self.stats.bytes_written += volume.nbytes

    def skip(self, index: VolumeIndex, reason: str) -> None:
        """Record a volume that will not come; listed in ``attributes.rllsm.skipped`` at close."""
        self.stats.skipped[index] = reason

    def close(self) -> None:
        """Trim the t axis to the last timepoint seen and write the final metadata (windows, skips)."""
        if self._closed or self._meta is None:
            self._closed = True
            return
        self._closed = True
        meta = self._meta
        try:
            last = max([self._last_t] + [i.timepoint for i in self.stats.skipped])
            if meta.n_timepoints is None and last + 1 != self._n_t:
                self._resize(max(last + 1, 1))
            self._group.attrs.update({"ome": ngff_attributes(meta, window=self._range), "rllsm": self._provenance(meta)})
        except (OSError, ValueError) as err:
            self.stats.errors += 1
            raise SinkWriteError(f"{self.name}: {describe_error(err)} while finishing {self.path}", cause=err) \
                from err
        log.info("%s: wrote %d volumes to %s (%d skipped)", self.name, self.stats.written, self.path,
                 len(self.stats.skipped))
