"""Shipped demo weights: present, small, loadable, and better than no network on simulated data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from engines.rldfn.checkpoint import load_rldfn
from engines.training.validate import cell_psnr
from engines.vsisr.checkpoint import load_checkpoint
from engines.weights import DEMO_FILES, DemoWeightsError, demo_weights_path


def test_demo_weights_are_shipped_small_and_fp16() -> None:
    paths = [demo_weights_path(k) for k in DEMO_FILES]
    assert sum(p.stat().st_size for p in paths) <= 50e6
    for p in paths:
        blob = torch.load(p, weights_only=True)
        assert {v.dtype for v in blob["state_dict"].values() if v.is_floating_point()} == {torch.float16}
    with pytest.raises(DemoWeightsError, match="unknown demo weights"):
        demo_weights_path("care")  # type: ignore[arg-type]


class _Bilinear(torch.nn.Module):
    """No-network baseline: the three centre planes resized 1.5× (what VSI-SR must beat)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x[:, 2:5], scale_factor=1.5, mode="bilinear", align_corners=False)


def test_demo_vsisr_beats_bilinear_on_simulated_filaments() -> None:
    from engines.simulate.pairs import simulate_training_pair
    from engines.training.prepare import filter_gt

    torch.set_num_threads(1)
    model = load_checkpoint(demo_weights_path("vsi-sr"))
    llsm, gt = simulate_training_pair("filaments", 4242, (10, 64, 64), photons=200.0)  # a seed not trained on
    gt = filter_gt(gt, 0.6)
    assert cell_psnr(model, llsm, gt) > cell_psnr(_Bilinear(), llsm, gt) + 1.0


def test_demo_rldfn_fuses_closer_to_the_object_than_averaging_the_views() -> None:
    from scipy.ndimage import gaussian_filter

    from engines.rldfn.model import RLDFN
    from engines.training.synthetic_dual import make_dual_view

    torch.set_num_threads(1)
    a, b, obj, pa, pb = make_dual_view("filaments", (32, 64, 64), np.random.default_rng(14))  # unseen seed
    model = RLDFN(load_rldfn(demo_weights_path("rl-dfn")), pa, pb).eval()
    with torch.no_grad():
        fused = model(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    assert fused.shape == a.shape and np.isfinite(fused).all()
    ref = gaussian_filter(obj, 0.7).ravel()

    def corr(v: np.ndarray) -> float:
        return float(np.corrcoef(v.ravel(), ref)[0, 1])

    assert corr(fused) > corr((a + b) / 2) + 0.02
