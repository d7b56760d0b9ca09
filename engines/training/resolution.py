"""Lateral resolution gain of a VSI-SR model on simulated beads (bead FWHM, input vs output vs ground truth).

``python -m engines.training.resolution [--weights PTH] [--cells 2]`` simulates bead cells with the rLLSM
simulator (LLSM stack + LLS-SIM ground truth, resolution extended along x), super-resolves them, and fits a
1-D Gaussian along x and along y through every isolated bead of the ground truth's central planes. It prints
the median FWHM in nm of the LLSM input, the network output and the ground truth.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from scipy.ndimage import maximum_filter
from scipy.optimize import curve_fit


def _fwhm_1d(profile: np.ndarray, spacing_nm: float) -> float | None:
    x = np.arange(profile.size, dtype=float)

    def g(x, a, m, s, b):
        return a * np.exp(-((x - m) ** 2) / (2 * s**2)) + b

    try:
        p, _ = curve_fit(g, x, profile, p0=(profile.max() - profile.min(), profile.argmax(), 1.5, profile.min()),
                         maxfev=2000)
    except RuntimeError:
        return None
    s = abs(p[2])
    if not 0.3 < s < profile.size / 3:
        return None
    return float(2.3548 * s * spacing_nm)


def bead_fwhm(img: np.ndarray, centres: list[tuple[int, int]], spacing_nm: float, half: int) -> dict[str, float]:
    """Median FWHM (nm) along x and y of a 2-D image at the given bead centres (pixel coordinates)."""
    fx, fy = [], []
    for y, x in centres:
        if half <= y < img.shape[0] - half and half <= x < img.shape[1] - half:
            a = _fwhm_1d(img[y, x - half:x + half + 1], spacing_nm)
            b = _fwhm_1d(img[y - half:y + half + 1, x], spacing_nm)
            if a is not None and b is not None:
                fx.append(a), fy.append(b)
    if not fx:
        return {"x_nm": float("nan"), "y_nm": float("nan"), "n": 0}
    return {"x_nm": float(np.median(fx)), "y_nm": float(np.median(fy)), "n": len(fx)}


def main(argv: list[str] | None = None) -> int:
    import torch

    from engines.config import OpticsConfig
    from engines.simulate.pairs import simulate_training_pair
    from engines.training.validate import predict_cell
    from engines.vsisr.checkpoint import load_checkpoint
    from engines.weights import demo_weights_path

    p = argparse.ArgumentParser(prog="python -m engines.training.resolution")
    p.add_argument("--weights", default=None, help="VSI-SR checkpoint (default: the shipped demo weights)")
    p.add_argument("--cells", type=int, default=2)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--planes", type=int, default=12)
    p.add_argument("--photons", type=float, default=400.0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model = load_checkpoint(args.weights or demo_weights_path("vsi-sr"))
    px = OpticsConfig().pixel_size_um * 1000
    rows = {"input": [], "output": [], "ground_truth": []}
    for seed in range(args.cells):
        llsm, gt = simulate_training_pair("beads", 1000 + seed, (args.planes, args.size, args.size),
                                          photons=args.photons)
        pred = predict_cell(model, llsm)  # planes 3 … Z−4
        for k, z in enumerate(range(3, args.planes - 3)):
            g = gt[z]
            peaks = (g == maximum_filter(g, size=9)) & (g > 0.3 * g.max())
            fine = [(int(y), int(x)) for y, x in zip(*np.nonzero(peaks))]
            coarse = [(round((y - 0.25) / 1.5), round((x - 0.25) / 1.5)) for y, x in fine]
            rows["ground_truth"].append(bead_fwhm(g, fine, px / 1.5, 7))
            rows["output"].append(bead_fwhm(pred[k], fine, px / 1.5, 7))
            rows["input"].append(bead_fwhm(llsm[z], coarse, px, 5))
    out = {}
    for name, rs in rows.items():
        xs = [r["x_nm"] for r in rs if r["n"]]
        ys = [r["y_nm"] for r in rs if r["n"]]
        out[name] = {"fwhm_x_nm": float(np.median(xs)) if xs else None,
                     "fwhm_y_nm": float(np.median(ys)) if ys else None, "planes": len(xs),
                     "beads": int(sum(r["n"] for r in rs))}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
