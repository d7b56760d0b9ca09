"""End-to-end bead FWHM through ``rllsm reconstruct --keep-intermediates`` (deskewed input → VSI-SR → views → fused).

``python -m engines.training.e2e_fwhm OUT.tif`` reads ``OUT.preprocessed.tif``, ``OUT.lateral_sr.tif``,
``OUT.view_a.tif``, ``OUT.view_b.tif``, ``OUT.tif`` and ``OUT.json`` written by ``rllsm reconstruct`` on a
simulated bead stack, finds isolated beads (local maxima above 30 % of each volume's maximum) and prints the
median 1-D Gaussian FWHM in nm along each array axis of each stage. Voxel sizes: deskewed planes are
``stage_step·sin(angle)`` apart with the camera pixel laterally; VSI-SR divides the lateral pixel by 1.5; the
views and the fused volume use the isotropic voxel recorded in ``OUT.json``. Axes of the rotated views are
not the deskewed axes, so compare *within* a row type (views vs fused) and *within* the first two rows.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from scipy.ndimage import maximum_filter

from engines.training.resolution import _fwhm_1d


def volume_fwhm(v: np.ndarray, spacing_nm: tuple[float, float, float], half: int = 6) -> dict:
    """Median FWHM (nm) along z, y, x of isolated bright maxima of a volume."""
    v = v.astype(np.float64)
    peaks = (v == maximum_filter(v, size=7)) & (v > 0.3 * v.max())
    res: list[list[float]] = [[], [], []]
    for z, y, x in zip(*np.nonzero(peaks)):
        if min(z, y, x) < half or z >= v.shape[0] - half or y >= v.shape[1] - half or x >= v.shape[2] - half:
            continue
        prof = [v[z - half:z + half + 1, y, x], v[z, y - half:y + half + 1, x], v[z, y, x - half:x + half + 1]]
        f = [_fwhm_1d(p, s) for p, s in zip(prof, spacing_nm)]
        if all(q is not None for q in f):
            for i in range(3):
                res[i].append(f[i])
    med = [round(float(np.median(r)), 1) if r else None for r in res]
    return {"beads": len(res[0]), "fwhm_z_nm": med[0], "fwhm_y_nm": med[1], "fwhm_x_nm": med[2]}


def main(argv: list[str] | None = None) -> int:
    import tifffile

    from engines.config import OpticsConfig

    p = argparse.ArgumentParser(prog="python -m engines.training.e2e_fwhm")
    p.add_argument("output", type=Path, help="the OUT.tif given to rllsm reconstruct --keep-intermediates")
    args = p.parse_args(argv)
    out = args.output
    meta = json.loads(out.with_suffix(".json").read_text())
    o = OpticsConfig()
    dz = o.stage_step_um * abs(math.sin(math.radians(o.skew_angle_deg))) * 1000
    px = o.pixel_size_um * 1000
    iso = meta["voxel_um"] * 1000
    stages = {"deskewed input": (".preprocessed.tif", (dz, px, px)), "after VSI-SR": (".lateral_sr.tif", (dz, px / 1.5, px / 1.5)),
              "view A": (".view_a.tif", (iso,) * 3), "view B": (".view_b.tif", (iso,) * 3), "fused": (".tif", (iso,) * 3)}
    report = {name: volume_fwhm(tifffile.imread(out.with_name(out.stem + suffix)), sp)
              for name, (suffix, sp) in stages.items()}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
