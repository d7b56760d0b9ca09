"""Open an acquisition's disk output in one place, for ``serve``, ``replay --offline`` and ``demo`` alike.

Where each format writes, under the output folder ``OUT``:

* ``zarr`` — ``OUT/<acquisition>.ome.zarr`` (NGFF 0.5); a restarted run *resumes* this same dataset;
* ``tiff`` — ``OUT/<acquisition>/<acquisition>_t00000_c0.ome.tif``, one OME-TIFF per volume;
* ``npy`` — ``OUT/<acquisition>/t00000_c0.npy``.

All three keep each volume exactly once across restarts (see each sink), and carry the fused voxel size and the
provenance the stage chain declared (in :class:`~streamer.sinks.base.VolumeMeta`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from streamer.sinks.base import PlacementTable, Sink, SinkSetupError, VolumeMeta

OutputFormat = Literal["zarr", "tiff", "npy"]
FORMATS: tuple[str, ...] = ("zarr", "tiff", "npy")


def output_path(fmt: str, out: Path, acquisition_id: str) -> Path:
    """The dataset (zarr) or folder (tiff, npy) an acquisition's volumes go to."""
    if fmt == "zarr":
        return Path(out) / f"{acquisition_id}.ome.zarr"
    if fmt in ("tiff", "npy"):
        return Path(out) / acquisition_id
    raise SinkSetupError(f"unknown output format {fmt!r}; expected one of {', '.join(FORMATS)}")


def open_disk_sink(fmt: str, out: Path, meta: VolumeMeta) -> Sink:
    """The synchronous disk sink of format ``fmt`` for ``meta``'s acquisition, resuming what an earlier run wrote."""
    from streamer.sinks import OmeTiffConfig, OmeZarrConfig, open_sink
    from streamer.sinks.npy_sink import NpyDirSink

    path = output_path(fmt, out, meta.acquisition_id)
    if fmt == "zarr":
        return open_sink(OmeZarrConfig(path=path, resume=True))
    if fmt == "tiff":
        return open_sink(OmeTiffConfig(directory=path, overwrite=True))
    return NpyDirSink(Path(out))


def disk_outputs(fmt: str, out: Path | None, meta: VolumeMeta, *, threaded: bool = True,
                 metrics: Any = None, pool: Any = None) -> list[tuple[Any, bool]]:
    """``[(sink, critical=True)]`` for the disk output, or ``[]`` without an output folder.

    ``threaded`` puts an OME writer behind :class:`~streamer.sinks.threaded.ThreadedSink` (``on_full="block"``: the
    outputs must be whole; the recording holds the raw data while processing lags), as the live service does; the
    ``npy`` writer stays synchronous (a file per volume, written before the next stack is processed). ``pool``: a
    shared :class:`~streamer.sinks.pool.WriterPool` for the writer instead of a thread of its own.
    """
    if out is None:
        return []
    sink = open_disk_sink(fmt, Path(out), meta)
    if threaded and fmt != "npy":
        from streamer.sinks.threaded import ThreadedSink

        sink = ThreadedSink(sink, on_full="block", critical=True, metrics=metrics, pool=pool)
    return [(sink, True)]


def volume_meta(chain: Any, start: Any, acquisition_id: str, shape: tuple[int, ...], dtype: str) -> VolumeMeta:
    """The outputs' description of an acquisition: its geometry, and the voxel size and provenance its stage chain
    declares (:class:`engines.reconstruct.StageChain`); a chain that declares nothing (deskew only, a test's plain
    list) gets the deskewed geometry from the start message."""
    grid = getattr(chain, "grid", None)
    prov = getattr(chain, "provenance", None) or {}
    voxel = tuple(float(v) for v in grid.voxel_size_um) if grid is not None else None
    table = PlacementTable() if getattr(chain, "fitter", None) is not None else None
    if start is not None:
        return VolumeMeta.from_start(start, shape=tuple(shape), dtype=dtype, voxel_size_um=voxel,  # type: ignore[arg-type]
                                     provenance=prov, placements=table)
    return VolumeMeta(acquisition_id, tuple(shape), dtype, voxel or (1.0, 1.0, 1.0),  # type: ignore[arg-type]
                      provenance=prov, placements=table)
