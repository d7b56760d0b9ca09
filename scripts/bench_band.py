"""Residual mirror band against the simulator's truth: the view slices next to the mirror over mid-volume.

    python scripts/bench_band.py [--shape 64,128,128] [--structures beads,filaments] [--seeds 0,1,2]

For each structure and seed it simulates one stack with the band and one without (same sample and noise
seed), preprocesses it with and without step 3b (``BackgroundParams.residual_band``), cuts the views and prints
the median of the non-empty voxels of the 5 slices next to the mirror over that of the 5 mid-volume slices, for
view A and view B. Without a band this ratio is the sample's own level; a residual band raises it.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
from sim_cases import add_case_args, cases, shape_of  # beside this script


def near_over_mid(structure: str, seed: int, band: bool, residual: bool,
                  shape: tuple[int, int, int]) -> list[float]:
    from engines.background import BackgroundParams, preprocess
    from engines.simulate.config import make_sim_config
    from engines.simulate.microscope import simulate_stack
    from engines.views import split_views

    cfg = make_sim_config(shape=shape, structure=structure, **({} if band else {"band_photons": 0.0}))
    stack, _ = simulate_stack(cfg, seed)
    o = cfg.optics
    vol, _ = preprocess(stack.raw, o, BackgroundParams(residual_band=residual), device="cpu")
    dz = o.stage_step_um * math.sin(math.radians(abs(o.skew_angle_deg)))
    a, b, _ = split_views(vol, o.pixel_size_um, dz, device="cpu")
    out = []
    for v in (a, b):  # the mirror is the last slice of each view
        near, m = v[-5:], v.shape[0] // 2
        mid = v[m - 2 : m + 3]
        out.append(float(np.median(near[near > 0]) / np.median(mid[mid > 0])))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_case_args(ap, shape="64,128,128", structures="beads,filaments", seeds="0,1,2")
    args = ap.parse_args(argv)
    shape = shape_of(args)
    print("| structure | seed | band, reference only (A/B) | band, with step 3b | no band, reference only | no band, with 3b |")
    print("|---|---|---|---|---|---|")
    for structure, seed in cases(args):
        t0 = time.perf_counter()
        cells = [near_over_mid(structure, seed, band, res, shape)  # type: ignore[arg-type]
                 for band, res in ((True, False), (True, True), (False, False), (False, True))]
        row = " | ".join(f"{a:.2f}/{b:.2f}" for a, b in cells)
        print(f"| {structure} | {seed} | {row} |  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
