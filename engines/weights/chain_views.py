"""Dual-view training volumes for the demo RL-DFN, made the way the chain makes its views.

``python -m engines.weights.chain_views OUT --structures filaments,beads --seeds 100,101 --shape 64,128,128``
simulates one rLLSM stack per (structure, seed), runs the chain's steps 1–3 of mode sr-rl (background, deskew,
the demo VSI-SR, rotation and view split) and writes ``OUT/ViewA/*.tif``, ``OUT/ViewB/*.tif`` and the views'
PSFs ``OUT/psf_a.tif``, ``OUT/psf_b.tif`` — the input of ``rllsm train-fusion --from-folder``. A network trained
on these sees what it will fuse at inference: the same grid, PSFs, one-view regions and noise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def write_views(out: Path, structures: list[str], seeds: list[int], shape: tuple[int, int, int]) -> int:
    """Write the views and PSFs; returns the number of view pairs."""
    import tifffile

    from engines.reconstruct import Reconstructor, ReconstructParams, demo_models
    from engines.simulate.config import make_sim_config
    from engines.simulate.microscope import Microscope

    for sub in ("ViewA", "ViewB"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    n = 0
    for structure in structures:
        for seed in seeds:
            cfg = make_sim_config(shape=shape, structure=structure)
            raw = Microscope(cfg, seed).acquire(0, with_ground_truth=False).raw
            rec = Reconstructor(cfg.optics, ReconstructParams(mode="sr-rl"), demo_models(cfg.optics), device="cpu")
            vol, _ = rec.preprocess(raw)
            view_a, view_b, report = rec.split(rec.lateral(vol))
            v = float(report.voxel_um)
            # an ImageJ hyperstack recording the isotropic voxel, as streamer.cli.geometry_io.write_stack writes
            meta = {"imagej": True, "resolution": (1.0 / v, 1.0 / v), "metadata": {"axes": "ZYX", "spacing": v,
                                                                                  "unit": "um"}}
            name = f"{structure}_{seed:04d}.tif"
            tifffile.imwrite(out / "ViewA" / name, view_a.astype(np.float32), **meta)
            tifffile.imwrite(out / "ViewB" / name, view_b.astype(np.float32), **meta)
            n += 1
            print(f"{name}: views {view_a.shape}", flush=True)
    tifffile.imwrite(out / "psf_a.tif", np.asarray(rec.psf_a, np.float32), **meta)
    tifffile.imwrite(out / "psf_b.tif", np.asarray(rec.psf_b, np.float32), **meta)
    return n


def _shape(text: str) -> tuple[int, int, int]:
    try:
        z, y, x = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected Z,Y,X (three integers), got {text!r}") from None
    if min(z, y, x) < 1:
        raise argparse.ArgumentTypeError(f"every size must be ≥ 1, got {text!r}")
    return z, y, x


def main(argv: list[str] | None = None) -> int:
    from engines.errors import RllsmError

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="output folder (must not hold views yet)")
    ap.add_argument("--structures", default="filaments,beads")
    ap.add_argument("--seeds", default="100,101")
    ap.add_argument("--shape", type=_shape, default=(64, 128, 128), help="raw stack Z,Y,X")
    args = ap.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        ap.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    if any((args.out / sub).is_dir() and any((args.out / sub).iterdir()) for sub in ("ViewA", "ViewB")):
        ap.error(f"{args.out} already holds views; choose an empty or new folder")
    try:
        write_views(args.out, args.structures.split(","), seeds, args.shape)
    except RllsmError as err:
        ap.exit(2, f"{ap.prog}: error: {err}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
