"""Regenerate ``docs/images/simulated_mip.png``: maximum projections of a simulated, deskewed filament stack.

    python docs/images/make_simulated_mip.py [--out docs/images/simulated_mip.png]

Top: the raw frames projected over planes (camera offset subtracted): the real image, the epi-fluorescence
band where the mirror crosses the frame, the dimmer mirror image. Middle: the deskewed stack projected along
the rows (x–z): the mirror is a plane tilted by the skew angle. Bottom: the same after Step 3's rotation by
the objective angle: the mirror is horizontal, the real image above it and the virtual image below.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def _to8(img: np.ndarray, gamma: float = 0.6) -> np.ndarray:
    lo, hi = np.percentile(img, 1.0), np.percentile(img, 99.8)
    x = np.clip((img - lo) / max(hi - lo, 1e-9), 0, 1) ** gamma
    return (x * 255).astype(np.uint8)


def main() -> int:
    from engines.deskew import deskew
    from engines.simulate import Microscope, make_sim_config

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).with_name("simulated_mip.png")))
    args = ap.parse_args()
    from engines.rotate3d import rot_y, rotate_volume, rotated_shape

    cfg = make_sim_config(structure="filaments", shape=(101, 192, 384), peak_photons=400.0, band_photons=80.0,
                          height_range_um=(0.3, 2.5), mirror_reflectance=0.8)
    mic = Microscope(cfg, seed=11)
    raw = mic.acquire(0, with_ground_truth=False).raw.astype(np.float32) - cfg.optics.camera_offset
    g = mic.geometry
    desk = deskew(raw, g.dx_um, g.dz_um, g.angle_deg)
    spacing = (g.dz_deskewed_um, g.dx_um, g.dx_um)
    # x–z projection at physical aspect: planes are dz·sin θ apart, pixels dx.
    xz = desk.max(axis=1)
    xz_img = Image.fromarray(_to8(xz)).resize((xz.shape[1], int(round(xz.shape[0] * spacing[0] / spacing[2]))),
                                              Image.BILINEAR)
    panels = [("deskewed, MIP along y: real image | tilted mirror band | mirror image", xz_img)]

    # Step 3's rotation by the objective angle: the mirror becomes horizontal (rows of constant z').
    rot_m = rot_y(cfg.optics.objective_angle_deg)
    rot = rotate_volume(desk, spacing, rot_m, out_spacing=g.dx_um)
    c_in = (np.array(desk.shape) - 1) / 2
    c_out = (np.array(rotated_shape(desk.shape, spacing, rot_m, g.dx_um)) - 1) / 2
    on_mirror = g.mirror_to_deskewed(np.array([[g.mirror_range_um((0.0, 0.0))[0], 0.0, 0.0]]))[0]
    m = int(round((rot_m @ ((on_mirror - c_in) * np.array(spacing)) / g.dx_um + c_out)[0]))
    rz = rot.max(axis=1)
    h_px = int(np.ceil(cfg.height_range_um[1] / g.dx_um)) + 12
    panels.append(("rotated by the objective angle (Step 3), MIP along y: real above the mirror, virtual below",
                   Image.fromarray(_to8(rz[max(m - h_px, 0):m + h_px + 1]))))
    real_side = rot[m + 6:] if cfg.virtual_side == "high" else rot[: m - 5]  # above the band's core
    top = real_side.max(axis=0)
    cols = np.nonzero(top.max(axis=0) > 0)[0]
    panels.append(("real view seen from above (MIP along the mirror normal)",
                   Image.fromarray(_to8(top[:, cols[0]:cols[-1] + 1]))))
    pad, title = 8, 16
    width = max(p.width for _, p in panels) + 2 * pad
    height = sum(p.height + title + pad for _, p in panels) + pad
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    y = pad
    for text, img in panels:
        draw.text((pad, y), text, fill=255)
        canvas.paste(img, (pad, y + title))
        y += img.height + title + pad
    canvas.save(args.out, optimize=True)
    print(f"{args.out}: {Path(args.out).stat().st_size / 1000:.0f} kB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
