"""Registering a fused volume back onto its views: sub-voxel shifts measured and removed."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from engines.rldfn.align import (
    align_to_estimate,
    align_to_views,
    measure_shift,
    shift_volume,
)
from engines.rldfn.metrics import forward_registration_shift, registration_shift

SHAPE = (40, 64, 72)


def _points(seed: int = 0, n: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.zeros(SHAPE, np.float32)
    for _ in range(n):
        t[tuple(rng.integers(8, s - 8) for s in SHAPE)] = rng.uniform(0.5, 1.0)
    return t


def _tilted_psf(sign: int, size: int = 15) -> np.ndarray:
    # an elongated Gaussian tilted in z–x by ±30°, as the two views' PSFs are
    z, y, x = (np.mgrid[:size, :size, :size] - size // 2).astype(np.float64)
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30)) * sign
    u, w = c * z + s * x, -s * z + c * x
    p = np.exp(-0.5 * ((u / 3.0) ** 2 + (y / 1.2) ** 2 + (w / 1.2) ** 2))
    return (p / p.sum()).astype(np.float32)


def _conv(t: np.ndarray, psf: np.ndarray) -> np.ndarray:
    from scipy.signal import fftconvolve

    return np.clip(fftconvolve(t, psf, mode="same"), 0, None).astype(np.float32)


def test_shift_volume_moves_by_the_sub_voxel_amount_asked() -> None:
    a = ndimage.gaussian_filter(_points(), (2.0, 1.2, 1.5)).astype(np.float32)
    for s in [(0.3, -0.4, 0.25), (-0.7, 0.1, 1.2)]:
        moved = shift_volume(torch.from_numpy(a), s)
        np.testing.assert_allclose(registration_shift(moved.numpy(), a), s, atol=0.03)
        np.testing.assert_allclose(measure_shift(moved, torch.from_numpy(a), torch.ones(SHAPE)), s, atol=0.03)
    assert torch.equal(shift_volume(torch.from_numpy(a), (0.0, 0.0, 0.0)), torch.from_numpy(a))


def test_forward_measure_sees_through_tilted_psfs() -> None:
    # the benchmarks' measure for deconvolutions: a mask cutting the tilted PSFs does not bias it
    truth = _points(1)
    psfs = [_tilted_psf(1), _tilted_psf(-1)]
    views = [_conv(truth, p) for p in psfs]
    mask = np.zeros(SHAPE, bool)
    mask[:28] = True  # a mask that cuts the tilted PSFs across, like the cut at the mirror
    s = (0.35, -0.5, 0.4)
    fused = shift_volume(torch.from_numpy(ndimage.gaussian_filter(truth, 0.7)), s)
    np.testing.assert_allclose(forward_registration_shift(fused.numpy(), views, psfs, mask), s, atol=0.05)


def test_align_to_views_removes_a_shift() -> None:
    # the views' joint RL estimate is what the shift is measured against: the truth, sharpened, comes back
    truth = _points(2)
    psfs = (_tilted_psf(1), _tilted_psf(-1))
    va, vb = (torch.from_numpy(_conv(truth, p)) for p in psfs)
    ones = torch.ones(SHAPE)
    fused = shift_volume(torch.from_numpy(ndimage.gaussian_filter(truth, 0.7)), (0.45, -0.6, 0.55))
    aligned, removed = align_to_views(fused, va, vb, ones, ones, psfs=psfs)
    np.testing.assert_allclose(removed, (0.45, -0.6, 0.55), atol=0.08)
    rest = forward_registration_shift(aligned.numpy(), [va.numpy(), vb.numpy()], list(psfs))
    assert np.abs(rest).max() < 0.05, rest
    assert np.abs(registration_shift(aligned.numpy(), truth)).max() < 0.08
    assert aligned.min() >= 0


def test_an_output_unlike_its_estimate_is_registered_by_its_structures() -> None:
    # a network output is not the object: here structures thinned, one population dropped, the contrast bent;
    # where they sit is what is registered
    truth = _points(3, 60)
    estimate = torch.from_numpy(ndimage.gaussian_filter(truth, (1.6, 1.0, 1.0)))
    kept = truth * (truth > 0.7)
    output = torch.from_numpy(ndimage.gaussian_filter(kept, 0.6) ** 0.7)
    s = (-0.55, 0.3, 0.65)
    aligned, removed = align_to_estimate(shift_volume(output, s), estimate, torch.ones(SHAPE))
    np.testing.assert_allclose(removed, s, atol=0.08)
    assert np.abs(registration_shift(aligned.numpy(), output.numpy())).max() < 0.05


def test_nothing_to_measure_leaves_the_volume_alone() -> None:
    fused = torch.rand(SHAPE)
    out, removed = align_to_estimate(fused, fused, torch.zeros(SHAPE))
    assert removed == (0.0, 0.0, 0.0) and out is fused
