"""Throughput of distributed reconstruction: in-process vs 1 vs 2 Dask workers, side by side in one run, and a
*modelled* scaling table for N workers/GPUs built from the figures measured here.

    python scripts/bench_distributed.py [--volumes 8] [--shape 32 64 96] [--iterations 10] [--workers 1 2]

Each configuration reconstructs the same simulated stacks (mode classical) into a fresh OME-Zarr through
:func:`streamer.distributed.run_volumes`; workers are warmed up first (imports, chain built) so the figures are steady
state. Every worker and the in-process run use one torch thread, so N workers have N cores' worth of threads.
Prints a Markdown report (load averages included: the machine may be shared).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the in-tree package, also for the worker processes
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                          os.environ.get("PYTHONPATH")]))


def _load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--volumes", type=int, default=8)
    ap.add_argument("--shape", type=int, nargs=3, default=(32, 64, 96), metavar=("Z", "Y", "X"))
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--gpu-volume-s", type=float, default=None,
                    help="for the modelled table: an assumed per-volume GPU time for a 101×768×768 stack")
    a = ap.parse_args()

    import numpy as np
    import tifffile
    import torch
    from distributed import Client, LocalCluster

    from engines.simulate.config import make_sim_config
    from engines.simulate.microscope import simulate_stack
    from streamer.cli import build_parser
    from streamer.distributed.offline import _NOT_RECIPE, timepoint_channel
    from streamer.distributed.recipe import Recipe
    from streamer.distributed.runner import VolumeJob, run_volumes
    from streamer.distributed.store import read_volume, write_volume
    from streamer.distributed.tasks import TiffInput
    from streamer.sinks.base import VolumeMeta

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-distributed-"))
    raw = tmp / "raw"
    raw.mkdir()
    cfg = make_sim_config(shape=tuple(a.shape), structure="filaments", n_objects=6)
    base, _ = simulate_stack(cfg, seed=1)
    rng = np.random.default_rng(0)
    for t in range(a.volumes):
        tifffile.imwrite(raw / f"cell_t{t:04d}.tif", base.raw + rng.poisson(3.0, base.raw.shape).astype(np.uint16))
    inputs = sorted(raw.glob("*.tif"))
    args = build_parser().parse_args(["reconstruct", str(raw), str(tmp / "x"), "--mode", "classical",
                                      "--iterations", str(a.iterations), "--device", "cpu"])
    from streamer.cli.options import optics_from_args

    recipe = Recipe.make("streamer.distributed.recipe:reconstruct_cli",
                         {"args": {k: v for k, v in vars(args).items() if k not in _NOT_RECIPE},
                          "optics": optics_from_args(args)}, torch_threads=1)
    jobs = [VolumeJob(t, c, TiffInput(str(p))) for p, (t, c) in zip(inputs, timepoint_channel([p.name for p in inputs]))]

    def meta(shape, dtype, voxel=None):
        return VolumeMeta("bench", shape, dtype, (0.1, 0.1, 0.1))

    rows = []
    # in-process: the same chain, one volume after another, written the same way
    fn = recipe.build()
    fn(tifffile.imread(inputs[0]))  # warm-up
    load0 = _load()
    t0 = time.perf_counter()
    comp = io = 0.0
    vols = []
    for p in inputs:
        t1 = time.perf_counter()
        v = fn(tifffile.imread(p))
        comp += time.perf_counter() - t1
        vols.append(v)
    seq = time.perf_counter() - t0
    rows.append(("in-process (1 thread)", a.volumes / seq, load0, _load()))
    per_volume = comp / a.volumes
    # write + read-back cost of one volume into an OME-Zarr, measured apart
    ref_store = tmp / "ref.ome.zarr"
    from streamer.distributed.store import create_store

    canvas = tuple(max(v.shape[i] for v in vols) for i in range(3))
    create_store(ref_store, meta(canvas, vols[0].dtype.name), a.volumes, "bench")
    t1 = time.perf_counter()
    for t, v in enumerate(vols):
        write_volume(ref_store, t, 0, v)
    io = (time.perf_counter() - t1) / a.volumes
    vol_bytes = vols[0].nbytes + base.raw.nbytes
    # storage bandwidth from a large volume (a small one measures the per-write fixed cost, not the disk)
    big = np.random.default_rng(1).random((64, 512, 512), dtype=np.float32)
    big_store = tmp / "big.ome.zarr"
    create_store(big_store, meta(big.shape, "float32"), 1, "bench")
    best = float("inf")
    for _ in range(3):
        t1 = time.perf_counter()
        write_volume(big_store, 0, 0, big)
        best = min(best, time.perf_counter() - t1)
    bw = big.nbytes / best
    shutil.rmtree(big_store, ignore_errors=True)

    overhead = None
    import dask

    from streamer.distributed.cluster import worker_environ

    dask.config.set({"distributed.nanny.pre-spawn-environ": worker_environ()})  # as `--workers` does: see there
    for n in a.workers:
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                          silence_logs=50) as lc, Client(lc) as client:
            warm = tmp / f"warm{n}.ome.zarr"
            run_volumes(client, recipe, jobs[: 2 * n], warm, meta, progress=False, say=lambda s: None)
            if overhead is None:  # scheduler round trip of an empty task
                client.submit(int, 0, pure=False).result()
                t1 = time.perf_counter()
                for k in range(50):
                    client.submit(int, k, pure=False).result()
                overhead = (time.perf_counter() - t1) / 50
            store = tmp / f"w{n}.ome.zarr"
            load0 = _load()
            s = run_volumes(client, recipe, jobs, store, meta, progress=False, say=lambda s: None)
            rows.append((f"{n} worker{'s' * (n > 1)} (1 thread each)", s.computed / s.seconds, load0, _load()))
            assert not s.failed, s.failed
            for t, v in enumerate(vols):  # the distributed volumes are the in-process ones
                assert read_volume(store, t, 0).tobytes() == v.tobytes(), t
    base_rate = rows[0][1]
    print(f"# Distributed throughput — {a.volumes} volumes {'×'.join(map(str, a.shape))}, classical, "
          f"{a.iterations} iterations\n")
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}; load average 1/5/15 min shown per row\n")
    print("| run | volumes/s | vs in-process | load before | load after |\n|---|---|---|---|---|")
    for name, rate, l0, l1 in rows:
        print(f"| {name} | {rate:.3f} | {rate / base_rate:.2f}× | {l0} | {l1} |")
    print(f"\nmeasured: compute {per_volume:.3f} s/volume, OME-Zarr write {io * 1e3:.1f} ms/volume, "
          f"OME-Zarr write bandwidth {bw / 1e6:.0f} MB/s (64×512×512 float32, best of 3), "
          f"empty-task round trip {overhead * 1e3:.2f} ms; every distributed volume byte-identical to in-process\n")
    # the model: N workers each make a volume in (compute + write + task overhead); the run is also bounded by
    # the shared storage (read raw + write fused) and the scheduler (~1 task per round trip).
    t_vol = per_volume + io + overhead
    print("## Modelled scaling (not measured): N workers/GPUs\n")
    print(f"rate(N) = min(N / t_volume, storage bandwidth / bytes per volume, 1 / task round trip), with t_volume = "
          f"{t_vol:.3f} s (compute + write + round trip, measured above), {vol_bytes / 1e6:.2f} MB read+written per "
          f"volume, {bw / 1e6:.0f} MB/s, {overhead * 1e3:.1f} ms\n")
    print("| N | modelled volumes/s | speed-up |\n|---|---|---|")
    for n in (1, 2, 4, 8, 16, 32):
        rate = min(n / t_vol, bw / vol_bytes, 1 / overhead)
        print(f"| {n} | {rate:.2f} | {rate * t_vol:.1f}× |")
    if a.gpu_volume_s:
        full = 101 * 768 * 768 * (2 + 4)  # raw uint16 read + fused float32 written
        print(f"\nWith an **assumed** (not measured) {a.gpu_volume_s} s of GPU compute per 101×768×768 volume and "
              f"the storage measured here ({full / 1e6:.0f} MB per volume at {bw / 1e6:.0f} MB/s, shared by all "
              "workers):\n")
        print("| GPUs | modelled volumes/s | 1000 timepoints take |\n|---|---|---|")
        for n in (1, 2, 4, 8, 16):
            rate = min(n / (a.gpu_volume_s + full / bw + overhead), bw / full, 1 / overhead)
            print(f"| {n} | {rate:.2f} | {1000 / rate / 60:.0f} min |")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
