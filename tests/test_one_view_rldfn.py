"""RL-DFN where only one view has data: the coverage-weighted RL estimate takes over, the two-view region is kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from engines.rldfn.coverage import blend_weight, coverage_mask
from engines.rldfn.errors import VolumeShapeError
from engines.rldfn.one_view import blend_one_view, intensity_match

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_intensity_match_recovers_gain_and_offset() -> None:
    rng = np.random.default_rng(0)
    est = torch.from_numpy(rng.gamma(0.3, 1.0, (16, 16, 16)).astype(np.float32))
    both = torch.ones(est.shape, dtype=torch.bool)
    gain, offset = intensity_match(3.0 * est + 0.5, est, both)
    assert gain == pytest.approx(3.0, rel=1e-5) and offset == pytest.approx(0.5, abs=1e-5)


def test_blend_keeps_the_network_where_both_views_are_trusted_and_the_estimate_elsewhere() -> None:
    rng = np.random.default_rng(1)
    shape = (12, 16, 40)
    est = torch.from_numpy(rng.gamma(0.3, 1.0, shape).astype(np.float32))
    fused = 2.0 * est + 0.1 + torch.from_numpy(rng.normal(0, 0.01, shape).astype(np.float32))
    ma = torch.ones(shape, dtype=torch.bool)
    mb = ma.clone()
    mb[:, :, 24:] = False  # x ≥ 24: view A only
    wa, wb = blend_weight(ma), blend_weight(mb)
    out = blend_one_view(fused, est, wa, wb)
    two = (torch.minimum(wa, wb) > 0.999)
    assert torch.equal(out[two], fused[two])
    one = wb == 0
    torch.testing.assert_close(out[one], torch.clamp(2.0 * est[one] + 0.1, min=0), rtol=0.02, atol=0.02)
    assert (out >= 0).all()


@pytest.fixture(scope="module")
def half_covered():
    """Simulated dual-view filaments where view B holds no data for x ≥ 56 (view A alone there)."""
    from engines.training.synthetic_dual import make_dual_view

    va, vb, obj, pa, pb = make_dual_view("filaments", (32, 64, 96), np.random.default_rng(0))
    vb[:, :, 56:] = 0
    return va, vb, obj, pa, pb


@pytest.fixture(scope="module")
def demo_model(half_covered):
    """The shipped demo RL-DFN with the simulated views' PSFs (skips where the demo weights are not installed)."""
    from engines.rldfn.checkpoint import load_rldfn
    from engines.rldfn.model import RLDFN
    from engines.weights import DemoWeightsError, demo_weights_path

    *_, pa, pb = half_covered
    try:
        return RLDFN(load_rldfn(demo_weights_path("rl-dfn")), pa, pb)
    except DemoWeightsError:
        pytest.skip("the demo weights are not installed")


def test_rldfn_follows_the_sample_where_one_view_sees_it(half_covered, demo_model) -> None:
    from engines.rldfn.fuse import fuse_rldfn

    va, vb, obj, _, _ = half_covered
    filled = fuse_rldfn(va, vb, demo_model, tile=32, overlap=8, device="cpu")
    network = fuse_rldfn(va, vb, demo_model, tile=32, overlap=8, device="cpu", one_view=False)
    ca, cb = (coverage_mask(torch.from_numpy(v)).numpy() for v in (va, vb))
    one = ca & ~cb
    one[:, :, :64] = False  # past view B's edge and the blend ramp
    truth = ndimage.gaussian_filter(obj, 1.0)

    def r(x: np.ndarray) -> float:
        return float(np.corrcoef(x[one], truth[one])[0, 1])

    # the network alone does not follow the sample there; the filled volume does, better than the view holding data
    assert r(network) < 0.5 < r(va) < r(filled)
    assert filled[one].max() <= 2 * np.percentile(va[ca], 99.99)
    # where both views are trusted the network's output is untouched
    np.testing.assert_array_equal(filled[:, :, :40], network[:, :, :40])


def test_reference_math_is_not_filled(half_covered, demo_model) -> None:
    from engines.rldfn.fuse import fuse_rldfn

    va, vb, *_ = half_covered
    sub = (slice(0, 16), slice(0, 32), slice(40, 72))  # straddles view B's edge
    a, b = np.ascontiguousarray(va[sub]), np.ascontiguousarray(vb[sub])
    plain = fuse_rldfn(a, b, demo_model, tile="none", device="cpu")
    explicit = fuse_rldfn(a, b, demo_model, tile="none", device="cpu", registered=False, align=False, one_view=False)
    np.testing.assert_array_equal(plain, explicit)
    with pytest.raises(VolumeShapeError, match="one_view_iterations"):
        fuse_rldfn(a, b, demo_model, tile=16, device="cpu", one_view_iterations=0)

