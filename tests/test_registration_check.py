"""The per-stack registration check tells a rigidly shifted fused volume from a warped one (known truth)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from engines.rldfn.align import shift_volume
from engines.rldfn.classical import joint_rl
from engines.rldfn.consistency import (
    SPREAD_LIMIT,
    RegistrationReport,
    check_registration,
)
from engines.training.synthetic_dual import make_dual_view

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def scene():
    va, vb, obj, pa, pb = make_dual_view("puncta", (48, 64, 64), np.random.default_rng(5))
    va, vb = torch.from_numpy(va), torch.from_numpy(vb)
    # what the check measures against: the views' joint RL estimate, as the fusion computes it
    estimate = joint_rl(va, vb, pa, pb, 30, coverage=[torch.ones_like(va)] * 2)
    return estimate, torch.from_numpy(obj)


def _check(fused: torch.Tensor, scene) -> RegistrationReport:
    estimate, _ = scene
    return check_registration(fused, estimate, torch.ones_like(estimate))


def test_the_object_itself_is_registered_and_consistent(scene) -> None:
    rep = _check(scene[1], scene)
    assert rep.consistent is True and rep.spread_voxels < 0.2, rep
    assert np.abs(rep.residual_voxels).max() < 0.1, rep
    assert RegistrationReport.model_validate(rep.model_dump(mode="json")) == rep  # what reconstruct writes


def test_a_rigid_shift_is_measured_and_stays_consistent(scene) -> None:
    shift = (0.4, -0.3, 0.35)
    rep = _check(shift_volume(scene[1], shift), scene)
    np.testing.assert_allclose(rep.residual_voxels, shift, atol=0.1)
    assert rep.consistent is True, rep


def test_a_warped_output_is_flagged_with_a_warning(scene, caplog) -> None:
    obj = scene[1]
    # the two halves along x moved 1.2 voxel apart along y, joined by a smooth ramp (a network's local offset)
    ramp = torch.clamp((torch.arange(obj.shape[2], dtype=torch.float32) - 24) / 16, 0, 1)
    warped = shift_volume(obj, (0.0, 0.6, 0.0)) * (1 - ramp) + shift_volume(obj, (0.0, -0.6, 0.0)) * ramp
    with caplog.at_level(logging.WARNING, logger="engines.rldfn.consistency"):
        rep = _check(warped, scene)
    assert rep.consistent is False and rep.spread_voxels > SPREAD_LIMIT, rep
    lo, hi = rep.halves_voxels["x0"], rep.halves_voxels["x1"]
    assert lo[1] > 0.3 and hi[1] < -0.3, rep  # each half's own offset, with its sign
    assert any("warped" in r.getMessage() for r in caplog.records)


def test_nothing_to_measure_is_reported_as_unknown(scene) -> None:
    estimate, obj = scene
    rep = check_registration(obj, estimate, torch.zeros_like(estimate))
    assert rep.consistent is None and rep.spread_voxels is None and rep.residual_voxels is None
