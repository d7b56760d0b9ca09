"""Benchmark (not a test): time to simulate one raw stack, by stage.

Run ``python -m engines.simulate.bench [--shape 101,512,512] [--structure filaments] [--repeat 2]``. It prints
the wall time of each stage (sample, PSF + kernel spectrum, render, camera, ground truth) for the first stack
(cold: PSF computed, kernel FFT planned) and for later timepoints of the same series (warm), plus the machine
load, so figures from a shared machine can be judged.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    from engines.simulate import Microscope, make_sim_config
    from engines.simulate.noise import camera
    from engines.simulate.optics import fft_workers

    ap = argparse.ArgumentParser(prog="python -m engines.simulate.bench")
    ap.add_argument("--shape", default="101,512,512")
    ap.add_argument("--structure", default="filaments",
                    choices=["filaments", "puncta", "beads", "tubules", "rings", "meshwork"])
    ap.add_argument("--repeat", type=int, default=2, help="warm timepoints after the first")
    args = ap.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))
    load0 = os.getloadavg()
    cfg = make_sim_config(structure=args.structure, shape=shape)

    cpu0 = time.process_time()
    t0 = time.perf_counter()
    mic = Microscope(cfg, seed=0)
    t_sample = time.perf_counter() - t0
    t0 = time.perf_counter()
    _ = mic.convolver
    t_kernel = time.perf_counter() - t0
    t0 = time.perf_counter()
    _ = mic.photon_scale
    t_scale = time.perf_counter() - t0

    rows = []
    cpu_first = 0.0
    for t in range(1 + args.repeat):
        cpu_a = time.process_time()
        a = time.perf_counter()
        photons = mic.expected_photons(t)
        b = time.perf_counter()
        raw = camera(photons, np.random.default_rng(t), offset=cfg.optics.camera_offset, gain=cfg.gain,
                     read_noise=cfg.read_noise_counts)
        c = time.perf_counter()
        gt = mic.ground_truth(t)
        d = time.perf_counter()
        rows.append((t, b - a, c - b, d - c, d - a, time.process_time() - cpu_a))
        if t == 0:
            cpu_first = time.process_time() - cpu0
        assert raw.shape == shape and gt.shape == mic.geometry.deskewed_shape

    print(f"machine: {platform.machine()} {os.cpu_count()} cores, fft workers {fft_workers()}, "
          f"load average before {load0[0]:.2f} / after {os.getloadavg()[0]:.2f}")
    print(f"stack {shape[0]}×{shape[1]}×{shape[2]} {args.structure}: {mic.sample.points_um.shape[0]} emitters "
          f"({mic.sample.n_groups} objects), deskewed grid {mic.geometry.deskewed_shape}")
    print(f"once per series: sample {t_sample:.2f} s, PSF + kernel spectrum {t_kernel:.2f} s, "
          f"photon scale (renders t=0) {t_scale:.2f} s")
    print("timepoint  render[s]  camera[s]  ground-truth[s]  total[s]  cpu[s]")
    for t, r, cam, g, tot, cpu in rows:
        print(f"{t:9d}  {r:9.2f}  {cam:9.2f}  {g:15.2f}  {tot:8.2f}  {cpu:6.2f}")
    first = t_sample + t_kernel + t_scale + rows[0][4]
    warm = float(np.mean([r[4] for r in rows[1:]])) if len(rows) > 1 else float("nan")
    warm_cpu = float(np.mean([r[5] for r in rows[1:]])) if len(rows) > 1 else float("nan")
    # CPU seconds are what the machine's other users cannot take away; divided by the cores they bound the
    # wall time on an otherwise idle machine from below.
    n = os.cpu_count() or 1
    print(f"first stack (cold, everything included): wall {first:.2f} s, cpu {cpu_first:.2f} s "
          f"(= {cpu_first / n:.2f} s on {n} idle cores)")
    print(f"each further timepoint: wall {warm:.2f} s, cpu {warm_cpu:.2f} s (= {warm_cpu / n:.2f} s on {n} idle cores)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
