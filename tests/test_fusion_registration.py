"""The fused volume stays registered to its views: no voxel shift from the RL step's PSF centring."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from engines.rldfn.classical import classical_fuse
from engines.rldfn.rl import exact_otf, psf_to_otf, rl_corrections, rl_corrections_registered


def _gauss_psf(size: int = 9, sigma=(2.0, 1.2, 1.5)) -> np.ndarray:
    z, y, x = np.mgrid[:size, :size, :size] - size // 2
    p = np.exp(-0.5 * ((z / sigma[0]) ** 2 + (y / sigma[1]) ** 2 + (x / sigma[2]) ** 2))
    return (p / p.sum()).astype(np.float32)


def _centroid(v: np.ndarray) -> np.ndarray:
    w = np.clip(v - np.median(v), 0, None)
    return np.array(ndimage.center_of_mass(w))


@pytest.mark.parametrize("shape", [(32, 40, 48), (31, 41, 47), (32, 41, 44)])
def test_registered_rl_step_does_not_move_a_bead(shape) -> None:
    psf = _gauss_psf(11)  # an odd box of 4k + 3 voxels, like the computed 31-voxel PSF: the shifting case
    bead = np.zeros(shape, np.float32)
    c = tuple(n // 2 + 0.3 * k for k, n in enumerate(shape))  # off-grid, to see sub-voxel shifts
    bead[tuple(int(round(x)) for x in c)] = 1.0
    view = ndimage.gaussian_filter(bead, (2.0, 1.2, 1.5)) + 1e-3
    t = torch.from_numpy(view)
    otf = exact_otf(psf, shape)
    ca, _ = rl_corrections_registered(t, t * 0.5 + 1e-3, otf, otf)
    # the correction of a view against a flat estimate is the view blurred once more: same centre
    flat_a, _ = rl_corrections_registered(t, t, otf, otf, torch.ones(shape), torch.ones(shape))
    for corr in (ca.numpy(), flat_a.numpy()):
        assert np.abs(_centroid(corr) - _centroid(view)).max() < 0.1
    # the reference's centring moves it along every axis of a multiple of 4 (all RL-DFN patches): what the
    # registered step fixes
    ref, _ = rl_corrections(t, t * 0.5 + 1e-3, t * 0 + 0.5, psf_to_otf(psf, shape), psf_to_otf(psf, shape))
    shift = _centroid(ref.numpy()) - _centroid(view)
    even = np.array([n % 2 == 0 for n in shape])
    assert (np.abs(shift[even]) > 0.5).all() and (np.abs(shift[~even]) < 0.1).all()


def test_classical_fusion_is_registered_to_its_views() -> None:
    psf = _gauss_psf(11)
    rng = np.random.default_rng(0)
    truth = np.zeros((30, 44, 52), np.float32)
    for _ in range(12):
        truth[tuple(rng.integers(6, n - 6) for n in truth.shape)] = 1.0
    view = ndimage.convolve(truth, psf, mode="constant") + 1e-4
    fused = classical_fuse(view, view, psf, psf, iterations=10, device="cpu")
    assert np.abs(_centroid(fused) - _centroid(truth)).max() < 0.1
