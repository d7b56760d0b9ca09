"""Benchmark of the geometry steps (deskew, Step 1 preprocess, Step 3 split) against naive scipy versions.

    .venv/bin/python scripts/bench_geometry.py [--shape 101 256 256] [--threads 1] [--repeat 3] [--device cpu]

Each step runs on the same seeded raw stack (beads + a drifting mid-plane band + offset), ours and a
straightforward per-plane scipy implementation side by side in one run; best-of-``repeat`` wall times, the
ratio, and the agreement of the outputs are printed. The naive versions are what one writes first:

* deskew: ``scipy.ndimage.map_coordinates`` plane by plane (order 1 for linear, 3 for cubic);
* preprocess: the same band fit, then masks built and applied plane by plane in numpy, and the naive deskew;
* split: ``scipy.ndimage.affine_transform`` (order 1) for the two 3-D rotations, the same mirror search.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import affine_transform, map_coordinates
from scipy.special import ndtr

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engines.background import BackgroundParams, fit_band, preprocess, square_crop_start  # noqa: E402
from engines.config import OpticsConfig  # noqa: E402
from engines.deskew import deskew, deskewed_width, shear_factor  # noqa: E402
from engines.rotate3d import rot_x, rot_y, rotated_shape  # noqa: E402
from engines.views import ViewsParams, _steps, cut_views, mirror_search, split_views  # noqa: E402

OPTICS = OpticsConfig(pixel_size_um=0.0926, stage_step_um=0.2, skew_angle_deg=30.8, camera_offset=100.0)
BG = BackgroundParams(gs_window_px=10.0, n_average=21)


def raw_stack(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """Seeded raw stack: Gaussian beads, a tilted drifting band, Poisson noise, offset 100 (uint16)."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    s = np.zeros(shape)
    np.add.at(s, tuple(rng.integers(0, m, 400) for m in shape), 1.0)
    s = gaussian_filter(s, 1.5)
    s *= 300.0 / s.max()
    z = np.arange(nz)[:, None, None] - (nz - 1) / 2
    v = np.arange(ny)[None, :, None] - (ny - 1) / 2
    u = np.arange(nx)[None, None, :]
    d = u - 0.55 * nx - math.tan(math.radians(0.4)) * v - 0.05 * z
    band = 200.0 * np.exp(-0.5 * (d / 4.0) ** 2)
    return (rng.poisson(s + band + 5.0) + 95).astype(np.uint16)


# --- naive versions ------------------------------------------------------------------------------------------
def naive_deskew(raw: np.ndarray, dx: float, dz: float, angle: float, order: int, pad: float) -> np.ndarray:
    nz, ny, nx = raw.shape
    n_out = deskewed_width(nx, nz, dx, dz, angle)
    f = shear_factor(dx, dz, angle)
    out = np.empty((nz, ny, n_out), np.float32)
    yy, xx = np.meshgrid(np.arange(ny, dtype=np.float64), np.arange(n_out, dtype=np.float64), indexing="ij")
    for k in range(nz):
        xin = xx - n_out / 2 - f * (k - nz / 2) + nx / 2
        out[k] = map_coordinates(raw[k].astype(np.float32), [yy, xin], order=order, mode="constant", cval=pad)
    return out


def naive_preprocess(raw: np.ndarray) -> np.ndarray:
    p = BG
    frames = raw.astype(np.float32) - np.float32(OPTICS.camera_offset)
    fit = fit_band(frames, p)
    nz, nv, nu = frames.shape
    v = np.arange(nv)[:, None] - (nv - 1) / 2
    u = np.arange(nu)[None, :]
    sa, sb, w = p.gs_window_px, p.gs_window_px * p.scale_factor, p.sigma_weight
    steps = []
    for k in range(nz):
        d = (u - fit.position_px - math.tan(math.radians(fit.tilt_deg)) * v
             - fit.drift_px_per_plane * (k - (nz - 1) / 2)) * math.cos(math.radians(fit.tilt_deg))
        m = (w * np.exp(-0.5 * (d / sa) ** 2) + np.exp(-0.5 * (d / sb) ** 2)) * ((1 - 2 * p.mod_amp) / (w + 1))
        frames[k] *= (1 - m).astype(np.float32)
        steps.append(ndtr(d / sa))
    lo, hi = max(0, int(math.floor(nz / 4 + 0.5)) - 1), int(math.floor(3 * nz / 4 + 0.5))
    num = sum(float((frames[k] * np.where(steps[k] > 0.9, 0, 1 - steps[k])).sum()) for k in range(lo, hi))
    den = sum(float((frames[k] * np.where(steps[k] < 0.1, 0, steps[k])).sum()) for k in range(lo, hi))
    ratio = max(1.0, num / den) if den > 0 else 1.0
    for k in range(nz):
        frames[k] *= (1 + steps[k] * (ratio - 1)).astype(np.float32)
    vol = naive_deskew(frames, OPTICS.pixel_size_um, OPTICS.stage_step_um, OPTICS.skew_angle_deg, 3, 0.0)
    np.maximum(vol, 0, out=vol)
    vol = (vol - vol.min()) / (vol.max() - vol.min())
    s = square_crop_start(vol.shape[2], vol.shape[1])
    return vol[:, :, s : s + vol.shape[1]]


def naive_rotate(vol: np.ndarray, spacing: tuple[float, float, float], rot: np.ndarray, dx: float,
                 oshape: tuple[int, int, int]) -> np.ndarray:
    sp = np.asarray(spacing)
    to_index = (rot.T * dx) / sp[:, None]
    c_out = (np.asarray(oshape) - 1) / 2
    c_in = (np.asarray(vol.shape) - 1) / 2
    # grid-constant: interpolate towards 0 just outside the edge, as grid_sample's zero padding does.
    return affine_transform(vol.astype(np.float32), to_index, offset=c_in - to_index @ c_out, output_shape=oshape,
                            order=1, mode="grid-constant", cval=0.0)


def naive_split(vol: np.ndarray, dx: float, dz: float, params: ViewsParams) -> tuple[np.ndarray, np.ndarray]:
    spacing = (dz, dx, dx)
    r0 = rot_y(params.angle_deg)
    oshape = rotated_shape(vol.shape, spacing, r0, dx)
    rotated = naive_rotate(vol, spacing, r0, dx, oshape)
    ax, off, _ = mirror_search(rotated.max(axis=2), _steps(*params.x_range_deg, params.x_step_deg),
                               params.split_range, params.blur_px)
    rotated = naive_rotate(vol, spacing, rot_x(ax) @ r0, dx, oshape)
    return cut_views(rotated, off, params.max_depth)


# --- harness ---------------------------------------------------------------------------------------------------
def best_of(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    best, out = math.inf, None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[101, 256, 256], metavar=("Z", "Y", "X"))
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (scipy is single-threaded)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    raw = raw_stack(tuple(args.shape))
    dx, dz, ang = OPTICS.pixel_size_um, OPTICS.stage_step_um, OPTICS.skew_angle_deg
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} torch thread(s), "
          f"torch {torch.__version__}, device {args.device}; raw stack {raw.shape} uint16; best of {args.repeat}")
    rows = []

    for interp, order in (("linear", 1), ("cubic", 3)):
        t_ours, ours = best_of(lambda: deskew(raw, dx, dz, ang, interp=interp, pad=100.0, device=args.device),
                               args.repeat)
        t_naive, naive = best_of(lambda: naive_deskew(raw, dx, dz, ang, order, 100.0), args.repeat)
        inner = np.s_[:, :, 2:-2]
        agree = float(np.abs(ours[inner] - naive[inner]).max())  # cubic: Keys vs B-spline kernels differ
        rows.append((f"deskew ({interp})", t_ours, t_naive, f"max |Δ| {agree:.3g} counts"))

    t_ours, (vol, _) = best_of(lambda: preprocess(raw, OPTICS, BG, device=args.device), args.repeat)
    t_naive, nvol = best_of(lambda: naive_preprocess(raw), args.repeat)
    rows.append(("preprocess (Step 1)", t_ours, t_naive, f"max |Δ| {float(np.abs(vol - nvol).max()):.3g} (of 1)"))

    desk = deskew(raw.astype(np.float32) - 100, dx, dz, ang, device=args.device)
    params = ViewsParams(angle_deg=ang)
    dzd = OPTICS.deskewed_pixel_z_um
    t_ours, (a, b, _) = best_of(lambda: split_views(desk, dx, dzd, params, device=args.device), args.repeat)
    t_naive, (na, nb) = best_of(lambda: naive_split(desk, dx, dzd, params), args.repeat)
    same = a.shape == na.shape
    diff = float(np.abs(a - na).max()) if same else float("nan")
    rows.append(("split-views (Step 3)", t_ours, t_naive, f"views {'same shape' if same else 'DIFFER'}, "
                 f"max |Δ| {diff:.3g}"))

    print(f"{'step':24s} {'ours [s]':>9s} {'naive [s]':>10s} {'speed-up':>9s}  agreement")
    for name, to, tn, note in rows:
        print(f"{name:24s} {to:9.3f} {tn:10.3f} {tn / to:8.1f}×  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
