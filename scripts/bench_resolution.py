"""Resolution against the simulator's truth, per reconstruction mode: bead FWHM and best-matching blur.

For each structure (beads, filaments) and seed it simulates one rLLSM stack, reconstructs it in each mode, brings
the ground truth (real emitters on the deskewed grid) onto the fused volume's grid with the same crop, rotation and
view cut the chain used, and reports

* the median FWHM (lateral y, x and axial z, nm) of isolated beads in the fused volume (beads only);
* the Gaussian blur (lateral, axial FWHM in nm) of the truth that best correlates with the fused volume, over the
  voxels both views cover and over those only one view covers;
* the brightest voxel in the one-view region over the views' 99.99th percentile (≤ 2 means no hot voxels);
* per one-view region (seen by view A only, by view B only): the Pearson correlation with the truth of the
  fused volume and of the view that holds data there (the better single view: the other one is empty);
* the shift of the fused volume against its views where both have data (at least 4 voxels inside the edge of
  their data), at least 1 µm from the mirror ("far") and at any height ("all"): the fused volume blurred by each view's PSF against that view, averaged over the two
  (``engines.rldfn.metrics.forward_registration_shift``; classical and sr-rl only: it holds for a deconvolution,
  not for a network's output, which blurred is not its view); and against the truth (``registration_shift``;
  voxels, per axis). Near the mirror each view also holds the tail of the other
  image, which pulls the views' own structures towards the mirror; the fusion partly undoes that. The views'
  own shift against the truth is printed beside the fused volume's;
* mode full: the spread of the network output's shift between the halves of the volume
  (``engines.rldfn.consistency``; above 0.5 voxel the output is warped against its views, not just shifted).

The truth is rendered on the deskewed grid widened by ``PAD`` voxels on every side before it is carried onto
the fused grid, so that the one-view regions — which show emitters the other view's field does not reach —
hold their truth too.

Run ``python scripts/bench_resolution.py --shape 101,256,256 --seeds 0,1 --modes classical,sr-rl,full`` (the demo
weights serve sr-rl and full); it prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from scipy import ndimage
from sim_cases import add_case_args, cases, shape_of  # beside this script

#: Registration is measured this far (µm) from the mirror and beyond (see ``main``).
MIRROR_UM = 1.0

#: Voxels inside the edge of the views' data where registration is measured (see ``main``).
EDGE_VOXELS = 4

#: Voxels the truth's deskewed grid is widened by on every side (see the module's docstring).
PAD = 24


def wide_truth(mic, timepoint: int = 0, pad: int = PAD) -> np.ndarray:
    """Real emitters on the deskewed grid widened by ``pad`` voxels on every side (same centre)."""
    from engines.simulate.geometry import splat

    g = mic.geometry
    pts = mic.sample.at(timepoint, mic.cfg)
    shape = tuple(n + 2 * pad for n in g.deskewed_shape)
    return splat(shape, g.mirror_to_deskewed(pts) + pad, mic.sample.weights * mic.photon_scale)


def truth_on_views(truth: np.ndarray, rec, report_pre, report_views, sr: bool, pad: int = 0) -> np.ndarray:
    """The deskewed-grid truth (widened by ``pad``) resampled onto the views' grid of this reconstruction."""
    from engines.rotate3d import rot_x, rot_y, rotate_volume
    from engines.views import view_indices

    ny = truth.shape[1] - 2 * pad  # the step-1 crop keeps ny deskewed columns from crop_start, centred
    gt = truth[:, :, report_pre.crop_start: report_pre.crop_start + ny + 2 * pad]
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
    from engines.reconstruct import (
        Reconstructor,
        ReconstructParams,
        demo_models,
        load_models,
        uses_lateral_sr,
    )
    from engines.rldfn.coverage import coverage_mask
    from engines.rldfn.metrics import (
        best_matching_blur,
        forward_registration_shift,
        puncta_fwhm,
        registration_shift,
    )
    from engines.simulate.config import make_sim_config
    from engines.simulate.microscope import Microscope
    from engines.weights import demo_weights_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_case_args(ap, shape="101,256,256", structures="beads,filaments", seeds="0,1")
    ap.add_argument("--modes", default="classical,sr-rl,full")
    ap.add_argument("--rldfn", default=None, help="RL-DFN weights for mode full (a reference folder or an rllsm "
                    "file; default: the shipped demo weights)")
    ap.add_argument("--iterations", default="30", help="comma list of RL iterations (classical, sr-rl; full: of the estimate that fills one-view regions)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    shape = shape_of(args)

    def corr(x: np.ndarray, y: np.ndarray, m: np.ndarray) -> float:
        x, y = x[m].astype(np.float64), y[m].astype(np.float64)
        return float(np.corrcoef(x, y)[0, 1]) if m.sum() > 1 and x.std() > 0 and y.std() > 0 else math.nan

    rows = []
    for structure, seed in cases(args):
        cfg = make_sim_config(shape=shape, structure=structure)
        mic = Microscope(cfg, seed)
        raw = mic.acquire(0, with_ground_truth=False).raw
        wide = wide_truth(mic)
        for mode in args.modes.split(","):
            its = [int(i) for i in args.iterations.split(",")]  # full: of its one-view estimate
            for it in its:
                models = demo_models(cfg.optics) if uses_lateral_sr(mode) else None
                if mode == "full" and args.rldfn and models is not None:
                    models = load_models(vsisr_checkpoint=demo_weights_path("vsi-sr"), rldfn_weights=args.rldfn,
                                         optics=cfg.optics)
                params = ReconstructParams(mode=mode, iterations=it)
                rec = Reconstructor(cfg.optics, params, models, device="cpu")
                t0 = time.perf_counter()
                res = rec(raw, keep_intermediates=True)
                secs = time.perf_counter() - t0
                va, vb = res.intermediates["view_a"], res.intermediates["view_b"]
                ta, tb = truth_on_views(wide, rec, res.reports["preprocess"], res.reports["split_views"],
                                        uses_lateral_sr(mode), pad=PAD)
                fused = res.fused
                # the real sample lies on one side of the mirror: keep the truth cut that holds it
                truth = ta if ta.sum() >= tb.sum() else tb
                ca = coverage_mask(torch.from_numpy(va)).numpy()
                cb = coverage_mask(torch.from_numpy(vb)).numpy()
                both, a_only, b_only = ca & cb, ca & ~cb, cb & ~ca
                vox = (res.voxel_um,) * 3
                lat, ax, r2 = best_matching_blur(fused, truth, vox, mask=both)
                p = max(np.percentile(va[ca], 99.99), np.percentile(vb[cb], 99.99))
                one = a_only | b_only
                hot = float(fused[one].max() / p) if one.any() else math.nan
                # per one-view region: fused and the one view with data there, against the (sharp) truth
                regions = {name: (corr(fused, truth, m), corr(view, truth, m))
                           for name, m, view in (("A", a_only, va), ("B", b_only, vb))}
                # near the mirror each view also holds the tail of the other image (the sample sits on the
                # coverslip), which moves the views' own centroids towards it; registration is measured
                # at least MIRROR_UM from the mirror (the views' last planes), and over everything
                # and EDGE_VOXELS inside the data: deconvolution piles the light from beyond the data's edge
                # (which no estimate inside can explain) onto that edge
                inner = ndimage.binary_erosion(both, iterations=EDGE_VOXELS, border_value=1)
                far = inner.copy()
                far[-math.ceil(MIRROR_UM / res.voxel_um):] = False
                psfs = [rec.psf_a, rec.psf_b]
                # the forward measure holds for deconvolutions (classical, sr-rl), not for a network's output
                # (not the object, so not the view once blurred): mode full is judged against the truth
                deconv = mode != "full"
                s_views = forward_registration_shift(fused, [va, vb], psfs, mask=far) if deconv else np.full(3, np.nan)
                s_all = forward_registration_shift(fused, [va, vb], psfs, mask=inner) if deconv else np.full(3, np.nan)
                s_truth = registration_shift(fused, truth, mask=far)
                s_vt = registration_shift((va + vb) / 2, truth, mask=far)
                fw = puncta_fwhm(fused, vox) if structure == "beads" else {"z": math.nan, "y": math.nan,
                                                                          "x": math.nan}
                reg = res.reports.get("registration")  # mode full: the network output's warp, per stack
                spread = math.nan if reg is None or reg.spread_voxels is None else reg.spread_voxels
                rows.append((structure, seed, mode, it, fw, lat, ax, r2, regions, hot,
                             float(np.abs(s_views).max()), float(np.abs(s_all).max()),
                             s_truth, s_vt, spread, secs))
                print(rows[-1], flush=True)
    print(f"\nraw stacks {'×'.join(map(str, shape))}, seeds {args.seeds}, CPU\n")
    print("| structure | seed | mode | RL iter. | bead FWHM z/y/x (nm) | best blur lat/ax (nm), two-view (r) | "
          "A-only r: fused / view A | B-only r: fused / view B | one-view max / p99.99 | shift vs views: far / all "
          "(vox) | shift vs truth z,y,x: fused / views (vox) | network warp spread (vox) | time (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s, seed, mode, it, fw, lat, ax, r2, regions, hot, sv, sa, st, svt, spread, secs in rows:
        f = "—" if math.isnan(fw["z"]) else f"{fw['z']:.0f}/{fw['y']:.0f}/{fw['x']:.0f}"
        reg = " | ".join(f"{a:.3f} / {b:.3f}" for a, b in regions.values())
        fwd = "n/a" if math.isnan(sv) else f"{sv:.2f} / {sa:.2f}"
        st, svt = (",".join(f"{v:+.2f}" for v in x) for x in (st, svt))
        print(f"| {s} | {seed} | {mode} | {it} | {f} | {lat:.0f}/{ax:.0f} ({r2:.3f}) | {reg} | {hot:.2f} | "
              f"{fwd} | {st} / {svt} | {'—' if math.isnan(spread) else f'{spread:.2f}'} | "
              f"{secs:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
