"""Mirror search against the simulator's truth: where step 3 puts the mirror plane, and how much it tilts it.

For each structure and seed it simulates one rLLSM stack, runs step 1 and step 3 exactly as ``rllsm reconstruct``
does (classical mode, no lateral SR), maps the simulator's true mirror plane (height 0 in its mirror frame) into
the rotated volume with the rotation step 3 chose, and reports

* the found plane's position minus the true one, in slices of the rotated volume (the plane's mean over the
  field of view);
* the residual tilt of the true plane in the rotated frame, degrees about x and about y (0 when the search
  found the right rotation);
* the search score and mirror contrast step 3 reported.

    python scripts/bench_mirror.py --shape 101,256,256 --seeds 0,1,2 --structures filaments,beads
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sim_cases import add_case_args, cases, shape_of  # beside this script


def mirror_error(cfg, seed: int) -> dict[str, float]:
    """Found minus true mirror plane (slices) and residual tilts (degrees) for one simulated stack."""
    from engines.reconstruct import Reconstructor, ReconstructParams
    from engines.simulate.microscope import Microscope
    from engines.simulate.truth import mirror_plane_rotated

    mic = Microscope(cfg, seed=seed)
    st = mic.acquire(0, with_ground_truth=False)
    rec = Reconstructor(cfg.optics, ReconstructParams(mode="classical"), None, device="cpu")
    t0 = time.perf_counter()
    vol, pre = rec.preprocess(st.raw)
    _, _, rep = rec.split(vol)
    secs = time.perf_counter() - t0
    truth = mirror_plane_rotated(mic.geometry, pre.crop_start, tuple(vol.shape), rep)
    return {"offset_slices": rep.split_index - truth["z0"], "tilt_x_deg": truth["tilt_x_deg"],
            "tilt_y_deg": truth["tilt_y_deg"], "angle_x_found": rep.angle_x_deg, "score": rep.score,
            "contrast": rep.mirror_contrast, "seconds": secs}


def main(argv: list[str] | None = None) -> int:
    from engines.simulate.config import make_sim_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_case_args(ap, shape="101,256,256", structures="filaments,beads", seeds="0,1,2")
    args = ap.parse_args(argv)
    shape = shape_of(args)
    print("| structure | seed | found − true (slices) | tilt about x (°) | tilt about y (°) | score | contrast | time (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for structure, seed in cases(args):
        m = mirror_error(make_sim_config(shape=shape, structure=structure), seed)
        print(f"| {structure} | {seed} | {m['offset_slices']:+.3f} | {m['tilt_x_deg']:+.3f} | {m['tilt_y_deg']:+.3f} "
              f"| {m['score']:.3f} | {m['contrast']:.2f} | {m['seconds']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
