"""Write throughput of the OME-Zarr / OME-TIFF writers, side by side in one run, ratios printed.

    .venv/bin/python scripts/bench_writers.py --shape 64 512 512 --volumes 16 --out /tmp/bench_writers

Every writer gets the same uint16 volumes (a synthetic cell: smooth signal + Poisson noise, so compressors see
realistic data) and writes them as a (t, c=1, z, y, x) dataset appended along t, uncompressed (the live default).
Time is wall clock from the first append to a closed dataset, so flushing is included. Each writer runs
``--repeats`` times in interleaved order; the best run is reported (the machine is shared) and the median shown.
Writers whose package is missing are reported as such, not skipped silently.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# run as `python scripts/bench_writers.py` from a checkout: our sinks come from this tree, not an installed package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def synthetic_volumes(shape: tuple[int, int, int], n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    base = 100 + 800 * np.exp(-(((z - shape[0] / 2) / (shape[0] / 4)) ** 2 + ((y - shape[1] / 2) / (shape[1] / 5)) ** 2
                                 + ((x - shape[2] / 2) / (shape[2] / 5)) ** 2))
    return [rng.poisson(base).astype(np.uint16) for _ in range(n)]


def _write_through(sink: Any, vols: list[np.ndarray], n_timepoints: int | None = None) -> None:
    """Set up one of our sinks for the benchmark volumes, append them all in order, close it."""
    from streamer.sinks import VolumeIndex, VolumeMeta

    sink.setup(VolumeMeta(acquisition_id="bench", shape=vols[0].shape, dtype="uint16", voxel_size_um=(0.2, 0.1, 0.1),
                          n_timepoints=n_timepoints))
    for t, v in enumerate(vols):
        sink.append(v, VolumeIndex(t))
    sink.close()


def w_rllsm_zarr(vols: list[np.ndarray], out: Path, backend: str = "zarr-python", shard: bool = True) -> None:
    from streamer.sinks import OmeZarrConfig
    from streamer.sinks.zarr_sink import OmeZarrSink

    sink = OmeZarrSink(OmeZarrConfig(path=out, overwrite=True, backend=backend, shard=shard))
    _write_through(sink, vols, n_timepoints=len(vols))


def w_rllsm_zarr_threaded(vols: list[np.ndarray], out: Path) -> None:
    """Our sink with its default settings behind the writer thread, as the service runs it (close waits for all)."""
    from streamer.sinks import OmeZarrConfig, ThreadedSink
    from streamer.sinks.zarr_sink import OmeZarrSink

    sink = ThreadedSink(OmeZarrSink(OmeZarrConfig(path=out, overwrite=True)), queue_size=len(vols), on_full="block")
    _write_through(sink, vols, n_timepoints=len(vols))


def w_rllsm_tiff(vols: list[np.ndarray], out: Path) -> None:
    from streamer.sinks import OmeTiffConfig
    from streamer.sinks.tiff_sink import OmeTiffSink

    sink = OmeTiffSink(OmeTiffConfig(directory=out, overwrite=True))
    _write_through(sink, vols)


def w_ome_writers(vols: list[np.ndarray], out: Path) -> None:
    """ome-writers (pymmcore-plus's writer): frame-by-frame appends, its default OME-Zarr backend."""
    from ome_writers import AcquisitionSettings, Dimension, create_stream

    z, y, x = vols[0].shape
    settings = AcquisitionSettings(
        root_path=str(out), overwrite=True, dtype="uint16",
        dimensions=[
            Dimension(name="t", count=len(vols), chunk_size=1, type="time"),
            Dimension(name="z", count=z, chunk_size=min(z, 64), type="space", scale=0.2, unit="micrometer"),
            Dimension(name="y", count=y, chunk_size=min(y, 256), type="space", scale=0.1, unit="micrometer"),
            Dimension(name="x", count=x, chunk_size=min(x, 256), type="space", scale=0.1, unit="micrometer"),
        ],
    )
    stream = create_stream(settings)
    for v in vols:
        for plane in v:
            stream.append(plane)
    stream.close()


def w_acquire_zarr(vols: list[np.ndarray], out: Path) -> None:
    """acquire-zarr (C++ writer with its own thread pool): whole volumes appended, NGFF on."""
    import acquire_zarr as aqz

    z, y, x = vols[0].shape
    dims = [
        aqz.Dimension(name="t", kind=aqz.DimensionType.TIME, array_size_px=0, chunk_size_px=1, shard_size_chunks=1),
        aqz.Dimension(name="z", kind=aqz.DimensionType.SPACE, array_size_px=z, chunk_size_px=min(z, 64),
                      shard_size_chunks=max(1, z // min(z, 64))),
        aqz.Dimension(name="y", kind=aqz.DimensionType.SPACE, array_size_px=y, chunk_size_px=min(y, 256),
                      shard_size_chunks=max(1, y // min(y, 256))),
        aqz.Dimension(name="x", kind=aqz.DimensionType.SPACE, array_size_px=x, chunk_size_px=min(x, 256),
                      shard_size_chunks=max(1, x // min(x, 256))),
    ]
    settings = aqz.StreamSettings(store_path=str(out), overwrite=True,
                                  arrays=[aqz.ArraySettings(dimensions=dims, data_type=np.uint16, is_ngff=True)])
    stream = aqz.ZarrStream(settings)
    for v in vols:
        stream.append(v)
    stream.close()


WRITERS: dict[str, Callable[[list[np.ndarray], Path], None]] = {
    "zarr-python, sharded": w_rllsm_zarr,
    "zarr-python, unsharded": lambda v, o: w_rllsm_zarr(v, o, "zarr-python", shard=False),
    "tensorstore, sharded": lambda v, o: w_rllsm_zarr(v, o, "tensorstore", shard=True),
    "tensorstore, unsharded": lambda v, o: w_rllsm_zarr(v, o, "tensorstore", shard=False),
    "direct (z-slab chunks, raw write)": lambda v, o: w_rllsm_zarr(v, o, "direct", shard=False),
    "rllsm default + writer thread": w_rllsm_zarr_threaded,
    "ome-writers": w_ome_writers,
    "acquire-zarr": w_acquire_zarr,
    "tifffile (rllsm OmeTiffSink)": w_rllsm_tiff,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=(64, 512, 512), metavar=("Z", "Y", "X"))
    p.add_argument("--volumes", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("/tmp/bench_writers"))
    args = p.parse_args()

    vols = synthetic_volumes(tuple(args.shape), args.volumes)
    total = sum(v.nbytes for v in vols)
    print(f"machine: {platform.machine()} {platform.system()}, {__import__('os').cpu_count()} CPUs, "
          f"python {platform.python_version()}")
    print(f"data: {args.volumes} volumes of {'×'.join(map(str, args.shape))} uint16 = {total / 1e9:.3f} GB; "
          f"out: {args.out}")
    times: dict[str, list[float]] = {name: [] for name in WRITERS}
    missing: dict[str, str] = {}
    args.out.mkdir(parents=True, exist_ok=True)
    warm = synthetic_volumes((2, 16, 16), 1)
    for name, fn in WRITERS.items():  # imports and first-call setup are not write throughput
        try:
            fn(warm, args.out / "warmup.ome.zarr")
        except Exception:
            pass
        shutil.rmtree(args.out / "warmup.ome.zarr", ignore_errors=True)
    for _ in range(args.repeats):
        for name, fn in WRITERS.items():
            if name in missing:
                continue
            target = args.out / ("".join(ch if ch.isalnum() else "_" for ch in name) + ".ome.zarr")
            shutil.rmtree(target, ignore_errors=True)
            t0 = time.perf_counter()
            try:
                fn(vols, target)
            except ImportError as err:
                missing[name] = f"not installed ({err.name})"
                continue
            except Exception as err:  # report, don't hide: a writer that fails is a result too
                missing[name] = f"failed: {err!r}"[:200]
                continue
            times[name].append(time.perf_counter() - t0)
            shutil.rmtree(target, ignore_errors=True)
    ref = min(times["zarr-python, sharded"] or [float("nan")])
    print(f"\n{'writer':34s} {'best GB/s':>10s} {'median GB/s':>12s} {'vs zarr-python':>15s}")
    for name in WRITERS:
        if name in missing:
            print(f"{name:34s} {missing[name]}")
            continue
        best, med = min(times[name]), statistics.median(times[name])
        print(f"{name:34s} {total / best / 1e9:10.2f} {total / med / 1e9:12.2f} {ref / best:14.2f}×")


if __name__ == "__main__":
    main()
