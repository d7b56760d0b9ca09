"""Rotation and view split on synthetic mirrored volumes with known mirror tilt and position."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError
from scipy.ndimage import center_of_mass, label

from engines.deskew import deskew
from engines.rotate3d import rot_x, rot_y, rotate_plane, rotate_volume, rotated_shape
from engines.views import ViewsError, ViewsParams, cut_views, split_views

DX = 0.1
THETA = 30.8
DZ = 0.2 * math.sin(math.radians(THETA))  # deskewed plane spacing for a 0.2 µm stage step


def mirrored_volume(
    shape: tuple[int, int, int], ax_deg: float, mirror_um: float, seed: int = 0, n: int = 14
) -> tuple[np.ndarray, np.ndarray]:
    """Deskewed volume of beads and their (dimmer) mirror images.

    In the frame F = rot_x(ax)·rot_y(θ)·(deskewed frame) the mirror is the plane Z_F = mirror_um; beads sit
    below it. Beads are rendered analytically on the anisotropic grid. Returns (volume, bead positions in F).
    """
    rng = np.random.default_rng(seed)
    spacing = np.array([DZ, DX, DX])
    half = (np.array(shape) - 1) / 2 * spacing
    rot = rot_x(ax_deg) @ rot_y(THETA)
    beads: list[np.ndarray] = []
    while len(beads) < n:
        p_f = np.array([mirror_um - rng.uniform(0.4, 1.2), rng.uniform(-9.0, 9.0), rng.uniform(-2.5, 2.5)])
        mirror = p_f * [-1, 1, 1] + [2 * mirror_um, 0, 0]
        inside = all(np.all(np.abs(rot.T @ q) < half - 0.4) for q in (p_f, mirror))
        far = all(np.linalg.norm(p_f - b) > 0.6 for b in beads)
        if inside and far:
            beads.append(p_f)
    grid = np.stack(np.meshgrid(*[(np.arange(s) - (s - 1) / 2) * sp for s, sp in zip(shape, spacing)], indexing="ij"))
    vol = np.zeros(shape)
    sigma = 0.12
    for p_f in beads:
        for q_f, amp in ((p_f, 1.0), (p_f * [-1, 1, 1] + [2 * mirror_um, 0, 0], 0.6)):
            q = rot.T @ q_f
            d2 = sum((grid[i] - q[i]) ** 2 for i in range(3))
            vol += amp * np.exp(-d2 / (2 * sigma**2))
    return vol.astype(np.float32), np.array(beads)


SHAPE = (48, 200, 80)  # a wide y extent gives the x tilt a lever arm, as in real volumes


@pytest.mark.parametrize("ax_deg,mirror_um", [(0.43, 0.25), (-0.62, -0.33)])
def test_split_recovers_x_tilt_and_mirror_and_views_overlay(ax_deg, mirror_um):
    vol, beads = mirrored_volume(SHAPE, ax_deg, mirror_um)
    view_a, view_b, rep = split_views(vol, DX, DZ, ViewsParams(max_depth=30), device="cpu")
    assert abs(rep.angle_x_deg - ax_deg) <= 0.1
    truth_m = mirror_um / DX + (rep.rotated_shape[0] - 1) / 2
    assert abs(rep.split_index - truth_m) <= 1.0
    assert view_a.shape == view_b.shape and view_a.shape[0] == rep.depth
    # Each bead of A has its mirror image in B at the same voxel (within 1 px).
    lab, n = label(view_a > 0.3 * view_a.max())
    assert n >= len(beads) - 2  # beads may merge or fall past the common depth; most are seen
    for i in range(1, n + 1):
        ca = np.array(center_of_mass(view_a, lab, i))
        region = lab == i
        cb = np.array(center_of_mass(np.where(region, view_b, 0)))
        assert np.linalg.norm(ca - cb) <= 1.0


def test_skew_axis_y_splits_the_transposed_volume():
    vol, _ = mirrored_volume(SHAPE, 0.43, 0.25, seed=2)
    a, b, rep = split_views(vol, DX, DZ, ViewsParams(max_depth=20), device="cpu")
    a_y, b_y, rep_y = split_views(np.swapaxes(vol, 1, 2), DX, DZ, ViewsParams(max_depth=20), skew_axis="y")
    assert rep_y == rep
    np.testing.assert_array_equal(a_y, np.swapaxes(a, 1, 2))
    np.testing.assert_array_equal(b_y, np.swapaxes(b, 1, 2))


def test_y_correction_search_finds_a_small_extra_tilt():
    # Mirror truly at 31.2° while the nominal objective angle is 30.8°: the y search corrects it.
    vol, _ = mirrored_volume(SHAPE, 0.0, 0.2, seed=1)
    params = ViewsParams(angle_deg=30.4, y_range_deg=(-0.8, 0.8), max_depth=30)
    _, _, rep = split_views(vol, DX, DZ, params, device="cpu")
    assert abs(rep.angle_y_deg - THETA) <= 0.1
    assert abs(rep.angle_x_deg) <= 0.1


def test_deskewed_mirror_band_becomes_horizontal():
    # The band sits at a fixed raw column in every frame (the mirror crosses the detection plane there);
    # after our deskew and the rotation by the same angle it must lie in one z-slice.
    nz, ny, nx = 40, 8, 64
    raw = np.zeros((nz, ny, nx), np.float32)
    raw[:, :, 30] = 1.0
    desk = deskew(raw, DX, 0.2, THETA, interp="linear")
    rot = rotate_volume(desk, (DZ, DX, DX), rot_y(THETA), out_spacing=DX)
    prof = rot[:, ny // 2, :]
    cols = np.where(prof.max(axis=0) > 0.5 * prof.max())[0]
    assert len(cols) > 20
    peaks = prof[:, cols].argmax(axis=0)
    assert peaks.max() - peaks.min() <= 1


def test_rotation_conventions_agree_between_2d_and_3d():
    rng = np.random.default_rng(4)
    vol = rng.random((20, 24, 22)).astype(np.float32)
    r3 = rotate_volume(vol, (DX, DX, DX), rot_x(7.0), out_shape=vol.shape)
    r2 = np.stack([rotate_plane(vol[:, :, i], 7.0) for i in range(vol.shape[2])], axis=2)
    inner = (slice(3, -3), slice(3, -3), slice(None))
    np.testing.assert_allclose(r3[inner], r2[inner], atol=1e-4)
    assert rotated_shape((11, 11, 11), (1.0, 1.0, 1.0), rot_y(90.0), 1.0) == (11, 11, 11)


@pytest.mark.parametrize("which", ["pure_y", "general"])
def test_rotate_volume_matches_scipy(which):
    # An independent resampler: scipy's affine_transform (order 1, grid-constant = zero padding).
    from scipy.ndimage import affine_transform

    rng = np.random.default_rng(5)
    vol = rng.random((14, 12, 18)).astype(np.float32)
    spacing, dx = (0.15, 0.1, 0.1), 0.1
    rot = rot_y(30.8) if which == "pure_y" else rot_x(3.0) @ rot_y(30.8)
    shape = rotated_shape(vol.shape, spacing, rot, dx)
    ours = rotate_volume(vol, spacing, rot, out_spacing=dx)
    m = (rot.T * dx) / np.asarray(spacing)[:, None]
    c_out, c_in = (np.asarray(shape) - 1) / 2, (np.asarray(vol.shape) - 1) / 2
    ref = affine_transform(vol, m, offset=c_in - m @ c_out, output_shape=shape, order=1, mode="grid-constant")
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    part = rotate_volume(vol, spacing, rot, out_spacing=dx, z_slices=(3, 9))
    np.testing.assert_array_equal(part, ours[3:9])


def test_cut_views_geometry():
    vol = np.arange(10, dtype=np.float32)[:, None, None] * np.ones((1, 2, 2), np.float32)
    a, b = cut_views(vol, offset=1, max_depth=3)  # mirror at 5.0: A = 2,3,4 and B = 8,7,6
    np.testing.assert_array_equal(a[:, 0, 0], [2, 3, 4])
    np.testing.assert_array_equal(b[:, 0, 0], [8, 7, 6])
    a, b = cut_views(vol, offset=0, max_depth=50)  # mirror at 4.5: A = 0..4 and B = 9..5
    np.testing.assert_array_equal(a[:, 0, 0], [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(b[:, 0, 0], [9, 8, 7, 6, 5])
    with pytest.raises(ViewsError, match="no room"):
        cut_views(vol, offset=-9, max_depth=5)


def test_bad_input_is_a_typed_error():
    with pytest.raises(ViewsError, match="3-D"):
        split_views(np.zeros((5, 5)), DX, DZ)
    with pytest.raises(ViewsError, match="voxel size dz"):
        split_views(np.zeros((5, 5, 5)), DX, 0.0)
    nan = np.ones((20, 20, 20), np.float32)
    nan[3, 4, 5] = np.nan
    with pytest.raises(ViewsError, match="1 NaN or infinite voxels"):
        split_views(nan, DX, DZ)
    with pytest.raises(ValidationError):
        ViewsParams(x_range_deg=(1.0, -1.0))
    with pytest.raises(ValidationError):
        ViewsParams(cutZ=5)  # type: ignore[call-arg]


@pytest.mark.gpu
def test_cuda_equals_cpu():
    vol, _ = mirrored_volume(SHAPE, 0.43, 0.25)
    a_c, b_c, r_c = split_views(vol, DX, DZ, ViewsParams(max_depth=30), device="cpu")
    a_g, b_g, r_g = split_views(vol, DX, DZ, ViewsParams(max_depth=30), device="cuda")
    assert r_g.angle_x_deg == r_c.angle_x_deg and r_g.split_offset == r_c.split_offset
    np.testing.assert_allclose(a_g, a_c, atol=1e-5)
    np.testing.assert_allclose(b_g, b_c, atol=1e-5)


def test_split_on_the_simulator_finds_its_mirror():
    # The simulator (engines/simulate) places the mirror itself; after Step 1 the split must land on it.
    from engines.background import BackgroundParams, preprocess
    from engines.simulate import Microscope, make_sim_config

    cfg = make_sim_config(shape=(48, 96, 128), structure="beads", n_objects=40, band_photons=200.0,
                          band_sigma_px=4.0, band_wide_sigma_px=12.0, psf_model="gaussian", mirror_position=0.55,
                          height_range_um=(0.4, 2.0))
    scope = Microscope(cfg, seed=1)
    raw = scope.acquire(0, with_ground_truth=False).raw
    o, g = cfg.optics, scope.geometry
    vol, _ = preprocess(raw, o, BackgroundParams(gs_window_px=4.0, n_average=8, crop_square=False), device="cpu")
    _, _, rep = split_views(vol, o.pixel_size_um, o.deskewed_pixel_z_um, ViewsParams(max_depth=40), device="cpu")
    th = math.radians(o.skew_angle_deg)
    # Mirror through deskewed (plane 0, column x_m(0)); its rotated height, in voxels from the grid centre.
    zc = -(g.nz - 1) / 2 * g.dz_deskewed_um
    xc = (float(g.mirror_deskewed_x(0)) - (g.nx_deskewed - 1) / 2) * g.dx_um
    truth = (zc * math.cos(th) - xc * math.sin(th)) / g.dx_um + (rep.rotated_shape[0] - 1) / 2
    assert abs(rep.split_index - truth) <= 1.0
    assert abs(rep.angle_x_deg) <= 0.1


@pytest.mark.parametrize("frac", [0.0, 0.25, 0.4, 0.6])
def test_views_registered_to_a_tenth_of_a_voxel_when_the_mirror_lies_between_planes(frac):
    # The mirror at a fraction of a voxel: the cut alone leaves view B up to half a slice off view A along z;
    # view B is interpolated to the mirror's exact position, so the two images of each bead coincide.
    from engines.rldfn.metrics import registration_shift

    mirror_um = (0.1 + frac) * DX
    vol, _ = mirrored_volume(SHAPE, 0.0, mirror_um, seed=3)
    view_a, view_b, rep = split_views(vol, DX, DZ, ViewsParams(max_depth=30, x_range_deg=(0.0, 0.0)), device="cpu")
    truth_m = mirror_um / DX + (rep.rotated_shape[0] - 1) / 2
    assert abs(rep.split_index - truth_m) < 0.1, (rep.split_index, truth_m)
    shift = registration_shift(view_b, view_a)
    assert np.abs(shift).max() < 0.1, shift
    # without the interpolation the views are measurably apart whenever the mirror is off the half-slice grid
    off = abs((2 * truth_m) - round(2 * truth_m))
    if off > 0.2:
        _, b_cut, _ = split_views(vol, DX, DZ, ViewsParams(max_depth=30, x_range_deg=(0.0, 0.0), interpolate_gap=False),
                                  device="cpu")
        assert abs(registration_shift(b_cut, view_a)[0]) > 0.08
        print(f"mirror {off:.2f} half-slices off the grid: views {registration_shift(b_cut, view_a)[0]:+.2f} apart uncut")
