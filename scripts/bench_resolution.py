"""Resolution against the simulator's truth, per reconstruction mode: bead FWHM and best-matching blur.

For each structure (beads, filaments) and seed it simulates one rLLSM stack, reconstructs it in each mode, brings
the ground truth (real emitters on the deskewed grid) onto the fused volume's grid with the same crop, rotation and
view cut the chain used, and reports

* the median FWHM (lateral y, x and axial z, nm) of isolated beads in the fused volume (beads only);
* the Gaussian blur (lateral, axial FWHM in nm) of the truth that best correlates with the fused volume, over the
  voxels both views cover and over those only one view covers;
* the brightest voxel in the one-view region over the views' 99.99th percentile (≤ 2 means no hot voxels).

Run ``python scripts/bench_resolution.py --shape 101,256,256 --seeds 0,1 --modes classical,sr-rl,full`` (the demo
weights serve sr-rl and full); it prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch


def truth_on_views(truth: np.ndarray, rec, report_pre, report_views, sr: bool) -> np.ndarray:
    """The deskewed-grid truth resampled onto the fused (view A) grid of this reconstruction."""
    from engines.rotate3d import rot_x, rot_y, rotate_volume
    from engines.views import view_indices

    gt = truth[:, :, report_pre.crop_start: report_pre.crop_start + truth.shape[1]]
    dz, dx = rec.optics.deskewed_pixel_z_um, rec.optics.pixel_size_um
    if sr:  # lateral SR drops 3 planes at each end and samples 1.5× finer laterally
        gt = gt[3:-3]
    v = report_views.voxel_um
    rot = rot_y(report_views.angle_y_correction_deg) @ rot_x(report_views.angle_x_deg) @ rot_y(
        report_views.angle_y_deg - report_views.angle_y_correction_deg)
    shape = report_views.rotated_shape
    a_idx, b_idx = view_indices(shape[0], report_views.split_offset, rec.views_params.max_depth)
    # rotate_volume centres both grids on the volume's centre; the SR volume's lateral extent in µm is the same
    rotated = rotate_volume(np.ascontiguousarray(gt, np.float32), (dz, dx, dx), rot, out_spacing=v, out_shape=shape,
                            device="cpu")
    return rotated[a_idx], rotated[b_idx]


def main(argv: list[str] | None = None) -> int:
    from engines.reconstruct import Reconstructor, ReconstructParams, demo_models, uses_lateral_sr
    from engines.rldfn.coverage import coverage_mask
    from engines.rldfn.metrics import best_matching_blur, puncta_fwhm
    from engines.simulate.config import make_sim_config
    from engines.simulate.microscope import simulate_stack

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="101,256,256", help="raw stack Z,Y,X")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--structures", default="beads,filaments")
    ap.add_argument("--modes", default="classical,sr-rl,full")
    ap.add_argument("--iterations", default="10", help="comma list of RL iterations (classical, sr-rl)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    shape = tuple(int(s) for s in args.shape.split(","))
    rows = []
    for structure in args.structures.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            cfg = make_sim_config(shape=shape, structure=structure)
            stack, _ = simulate_stack(cfg, seed=seed)
            for mode in args.modes.split(","):
                its = [int(i) for i in args.iterations.split(",")] if mode != "full" else [0]
                for it in its:
                    models = demo_models(cfg.optics) if uses_lateral_sr(mode) else None
                    params = ReconstructParams(mode=mode, iterations=max(it, 1))
                    rec = Reconstructor(cfg.optics, params, models, device="cpu")
                    t0 = time.perf_counter()
                    res = rec(stack.raw, keep_intermediates=True)
                    secs = time.perf_counter() - t0
                    va, vb = res.intermediates["view_a"], res.intermediates["view_b"]
                    ta, tb = truth_on_views(stack.ground_truth, rec, res.reports["preprocess"],
                                            res.reports["split_views"], uses_lateral_sr(mode))
                    fused = res.fused
                    # the real sample lies on one side of the mirror: keep the truth cut that matches the fusion
                    truth = ta if np.corrcoef(fused.ravel(), ta.ravel())[0, 1] >= np.corrcoef(
                        fused.ravel(), tb.ravel())[0, 1] else tb
                    ca = coverage_mask(torch.from_numpy(va)).numpy()
                    cb = coverage_mask(torch.from_numpy(vb)).numpy()
                    both, one = ca & cb, ca ^ cb
                    vox = (res.voxel_um,) * 3
                    lat, ax, corr = best_matching_blur(fused, truth, vox, mask=both)
                    # the real sample may not reach the one-view region at all: then there is nothing to match
                    lat1, ax1, corr1 = best_matching_blur(fused, truth, vox, mask=one) if (
                        one.any() and truth[one].max() > 0) else (math.nan, math.nan, math.nan)
                    p = max(np.percentile(va[ca], 99.99), np.percentile(vb[cb], 99.99))
                    hot = float(fused[one].max() / p) if one.any() else math.nan
                    fw = puncta_fwhm(fused, vox) if structure == "beads" else {"z": math.nan, "y": math.nan,
                                                                              "x": math.nan}
                    rows.append((structure, seed, mode, it or "—", fw, lat, ax, corr, lat1, ax1, corr1, hot, secs))
                    print(rows[-1], flush=True)
    print(f"\nraw stacks {'×'.join(map(str, shape))}, seeds {args.seeds}, CPU\n")
    print("| structure | seed | mode | RL iter. | bead FWHM z/y/x (nm) | best blur lat/ax (nm), two-view | r | "
          "best blur lat/ax (nm), one-view | r | one-view max / views p99.99 | time (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for s, seed, mode, it, fw, lat, ax, corr, lat1, ax1, corr1, hot, secs in rows:
        f = "—" if math.isnan(fw["z"]) else f"{fw['z']:.0f}/{fw['y']:.0f}/{fw['x']:.0f}"
        print(f"| {s} | {seed} | {mode} | {it} | {f} | {lat:.0f}/{ax:.0f} | {corr:.3f} | {lat1:.0f}/{ax1:.0f} | "
              f"{corr1:.3f} | {hot:.2f} | {secs:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
