"""End to end on the simulator: each mode's output stays registered to what it was computed from.

Measured as the fused volume imaged through each view's PSF against that view (Lucas–Kanade,
``engines.rldfn.metrics.forward_registration_shift``), at least 4 voxels inside the edge of the views' data:
closer to the edge, deconvolution piles up the light from beyond it, which no estimate inside can explain.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from engines.reconstruct import Reconstructor, ReconstructParams, demo_models, uses_lateral_sr
from engines.rldfn.coverage import coverage_mask
from engines.rldfn.metrics import forward_registration_shift, registration_shift
from engines.simulate.config import make_sim_config
from engines.simulate.microscope import Microscope

pytestmark = pytest.mark.timeout(600)

SHAPE = (64, 128, 128)


def _run(mode: str, structure: str = "filaments", seed: int = 0):
    cfg = make_sim_config(shape=SHAPE, structure=structure, mirror_reflectance=0.0 if mode == "single-view" else 0.75)
    raw = Microscope(cfg, seed).acquire(0, with_ground_truth=False).raw
    models = demo_models(cfg.optics) if uses_lateral_sr(mode) else None
    if uses_lateral_sr(mode) and models is None:
        pytest.skip("the demo weights are not installed")
    rec = Reconstructor(cfg.optics, ReconstructParams(mode=mode), models, device="cpu")
    return rec, rec(raw, keep_intermediates=True)


def _inner(*views: np.ndarray) -> np.ndarray:
    both = np.logical_and.reduce([coverage_mask(torch.from_numpy(v)).numpy() for v in views])
    return ndimage.binary_erosion(both, iterations=4, border_value=1)


@pytest.mark.parametrize("mode", ["classical", "sr-rl"])
def test_dual_view_fusion_is_registered_to_its_views(mode: str) -> None:
    rec, res = _run(mode)
    va, vb = res.intermediates["view_a"], res.intermediates["view_b"]
    shift = forward_registration_shift(res.fused, [va, vb], [rec.psf_a, rec.psf_b], _inner(va, vb))
    assert np.isfinite(shift).all() and np.abs(shift).max() <= 0.1, shift


def test_single_view_deconvolution_is_registered_to_its_input() -> None:
    rec, res = _run("single-view")
    view = res.intermediates.get("lateral_sr", res.intermediates["preprocessed"])
    shift = forward_registration_shift(res.fused, [view], [rec.psf], _inner(view))
    assert np.isfinite(shift).all() and np.abs(shift).max() <= 0.1, shift


def test_rldfn_output_is_moved_back_onto_its_views() -> None:
    # The demo RL-DFN moves its output about half a voxel per axis off its registered RL corrections; the fusion
    # measures that against the views and removes it.
    from engines.rldfn.fuse import fuse_rldfn

    rec, res = _run("full", structure="beads")
    va, vb = res.intermediates["view_a"], res.intermediates["view_b"]
    raw = fuse_rldfn(va, vb, rec._rldfn, tile="auto", memory_budget_bytes=2 << 30, device="cpu", align=False)
    mask = _inner(va, vb)
    mean = (va / va.max() + vb / vb.max()) / 2
    before = registration_shift(raw, mean, mask)
    after = registration_shift(res.fused, mean, mask)
    assert np.abs(before).max() > 0.3, before
    assert np.abs(after).max() <= 0.1, after
