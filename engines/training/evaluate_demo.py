"""Figures of the model card for the shipped demo weights (``python -m engines.training.evaluate_demo``).

* VSI-SR: masked PSNR (published evaluation) on simulated cells of three structures at 200 photons, seeds
  4242–4244 (never used for training), against the no-network baseline of resizing the input planes 1.5×.
* RL-DFN: Pearson correlation with the (σ 0.7-blurred) true object of the fused volume, of the mean of the
  two views and of each view, on three fresh dual-view filament volumes (seeds 11–13).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from torch.nn import functional as F


class BilinearBaseline(torch.nn.Module):
    """The three centre input planes resized 1.5× — what a super-resolution network must beat."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x[:, 2:5], scale_factor=1.5, mode="bilinear", align_corners=False)


def main(argv: list[str] | None = None) -> int:
    from engines.rldfn.checkpoint import load_rldfn
    from engines.rldfn.model import RLDFN
    from engines.simulate.pairs import simulate_training_pair
    from engines.training.prepare import filter_gt
    from engines.training.synthetic_dual import make_dual_view
    from engines.training.validate import cell_psnr
    from engines.vsisr.checkpoint import load_checkpoint
    from engines.weights import demo_weights_path

    torch.set_num_threads(1)
    model = load_checkpoint(demo_weights_path("vsi-sr"))
    report: dict = {"vsisr_psnr_db": {}}
    for s in ("filaments", "puncta", "beads"):
        net, base = [], []
        for seed in (4242, 4243, 4244):
            llsm, gt = simulate_training_pair(s, seed, (12, 64, 64), photons=200.0)
            gt = filter_gt(gt, 0.6)
            net.append(cell_psnr(model, llsm, gt))
            base.append(cell_psnr(BilinearBaseline(), llsm, gt))
        report["vsisr_psnr_db"][s] = {"vsisr": [float(np.mean(net)), float(np.std(net))],
                                      "bilinear": [float(np.mean(base)), float(np.std(base))]}
    corr = []
    for seed in (11, 12, 13):
        a, b, obj, pa, pb = make_dual_view("filaments", (32, 64, 64), np.random.default_rng(seed))
        fuse = RLDFN(load_rldfn(demo_weights_path("rl-dfn")), pa, pb).eval()
        with torch.no_grad():
            fused = fuse(torch.from_numpy(a), torch.from_numpy(b)).numpy()
        ref = gaussian_filter(obj, 0.7).ravel()
        corr.append([float(np.corrcoef(v.ravel(), ref)[0, 1]) for v in (fused, (a + b) / 2, a, b)])
    m, sd = np.mean(corr, 0), np.std(corr, 0)
    report["rldfn_correlation"] = {k: [float(m[i]), float(sd[i])]
                                   for i, k in enumerate(("fused", "mean_of_views", "view_a", "view_b"))}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
