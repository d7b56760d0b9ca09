"""Deskew: parity with cudaDecon on real data, exact inverse (skew), geometry on synthetic stacks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engines.deskew import DeskewError, deskew, deskewed_width, shear_factor, skew


def test_matches_cudadecon_on_real_data(shared_data):
    tifffile = pytest.importorskip("tifffile")
    raw = tifffile.imread(shared_data / "llsm-pycudadecon" / "im_raw.tif")
    ref = tifffile.imread(shared_data / "llsm-pycudadecon" / "im_deskewed_zlib.tif").astype(np.int64)
    out = deskew(raw, 0.1, 0.3, 31.5, interp="linear", pad=98, device="cpu")
    assert out.dtype == np.float32
    assert out.shape == ref.shape == (88, 320, 481)
    # cudaDecon stores float→uint16 by truncation.
    diff = np.abs(np.trunc(out).astype(np.int64) - ref)
    assert (diff <= 1).mean() >= 0.999
    assert diff.max() <= 2


def test_width_formula():
    assert deskewed_width(256, 88, 0.1, 0.3, 31.5) == 256 + math.floor(88 * 0.3 * math.cos(math.radians(31.5)) / 0.1)
    assert deskewed_width(100, 10, 0.1, 0.1, 60.0) == 105  # cos 60° = 0.5 exactly enough not to lose a column


def _bead_stack(nz: int = 24, ny: int = 12, nx: int = 60, f: float = 1.3, x0: float = 30.0) -> np.ndarray:
    """Raw stack of a thin rod perpendicular to the detection plane: it is skewed by f px per plane."""
    z = np.arange(nz)[:, None, None]
    x = np.arange(nx)[None, None, :]
    centre = x0 - f * (z - nz / 2)  # cudaDecon convention: raw x = deskewed x − f·(z − nz/2) (up to centring)
    return np.exp(-((x - centre) ** 2) / (2 * 1.5**2)) * np.ones((1, ny, 1))


@pytest.mark.parametrize("interp", ["linear", "cubic"])
def test_deskew_straightens_a_skewed_rod(interp):
    dx, dz, ang = 0.1, 0.2, 49.46  # f = cos(49.46°)·2 ≈ 1.3
    f = shear_factor(dx, dz, ang)
    raw = _bead_stack(f=f)
    out = deskew(raw, dx, dz, ang, interp=interp, device="cpu")
    peaks = np.array([np.sum(p[0] * np.arange(p.shape[1])) / np.sum(p[0]) for p in out])
    # Every plane's rod lands at the same column: x_out = x_in + nx_out/2 − nx/2.
    expect = 30.0 + (out.shape[2] - raw.shape[2]) / 2
    np.testing.assert_allclose(peaks, expect, atol=0.05)


@pytest.mark.parametrize("interp", ["linear", "cubic"])
def test_skew_is_the_inverse_of_deskew(interp):
    rng = np.random.default_rng(0)
    from scipy.ndimage import gaussian_filter

    vol = gaussian_filter(rng.random((20, 8, 150)), 2.0).astype(np.float32)
    dx, dz, ang = 0.1, 0.25, 31.5
    raw = skew(vol, dx, dz, ang, interp=interp, pad=-1.0)
    assert raw.shape == (20, 8, 150 - (deskewed_width(0, 20, dx, dz, ang)))
    back = deskew(raw, dx, dz, ang, interp=interp, pad=-1.0)
    assert back.shape == vol.shape
    from scipy.ndimage import binary_erosion

    # Voxels whose interpolation touched the pad of either pass are not comparable; drop a 3-px rim.
    inside = binary_erosion(back != -1.0, structure=np.ones((1, 1, 7), bool))
    assert inside.mean() > 0.4
    err = np.abs(back - vol)[inside]
    # Smooth data: two resamplings lose little; a wrong sign or centring would give errors of order 1.
    assert err.max() < (0.02 if interp == "cubic" else 0.05) * vol.max()


def test_skew_axis_y_is_the_transpose_of_x():
    rng = np.random.default_rng(1)
    raw = rng.random((9, 30, 7)).astype(np.float32)
    out_y = deskew(raw, 0.1, 0.3, 31.5, skew_axis="y", pad=5.0)
    out_x = deskew(np.swapaxes(raw, 1, 2), 0.1, 0.3, 31.5, skew_axis="x", pad=5.0)
    np.testing.assert_array_equal(out_y, np.swapaxes(out_x, 1, 2))


def test_negative_angle_scans_the_other_way():
    rng = np.random.default_rng(2)
    raw = rng.random((11, 5, 30)).astype(np.float32)
    neg = deskew(raw, 0.1, 0.3, -31.5, pad=-1.0)
    # Scanning the other way is the mirror image of the positive-angle shear along the skew axis.
    mirrored = deskew(raw[:, :, ::-1], 0.1, 0.3, 31.5, pad=-1.0)[:, :, ::-1]
    np.testing.assert_allclose(neg, mirrored, atol=1e-5)
    assert not np.allclose(neg, deskew(raw, 0.1, 0.3, 31.5, pad=-1.0), atol=1e-2)


def test_cubic_reproduces_a_quadratic_exactly():
    x = np.arange(50, dtype=np.float64)
    raw = np.broadcast_to(0.01 * (x - 20) ** 2 + 3, (6, 2, 50)).astype(np.float32)
    dx, dz, ang = 0.1, 0.137, 40.0
    out = deskew(raw, dx, dz, ang, interp="cubic", pad=np.nan if False else -7.0)
    f = shear_factor(dx, dz, ang)
    nz, n_out = 6, out.shape[2]
    for z in range(nz):
        xin = np.arange(n_out) - n_out / 2 - f * (z - nz / 2) + 25
        ok = (xin >= 1) & (xin <= 47)  # away from the replicated edge taps
        np.testing.assert_allclose(out[z, 0, ok], 0.01 * (xin[ok] - 20) ** 2 + 3, rtol=1e-5, atol=1e-4)
        assert np.all(out[z, 0, (xin < 0) | (xin > 49)] == -7.0)


@pytest.mark.parametrize(
    "args,match",
    [
        ((np.zeros((4, 4)), 0.1, 0.2, 30.0), "3-D"),
        ((np.zeros((0, 4, 4)), 0.1, 0.2, 30.0), "empty"),
        ((np.zeros((4, 4, 4)), 0.0, 0.2, 30.0), "pixel size"),
        ((np.zeros((4, 4, 4)), 0.1, -0.2, 30.0), "stage step"),
        ((np.zeros((4, 4, 4)), 0.1, 0.2, 95.0), "angle"),
        ((np.zeros((4, 4, 4), dtype=complex), 0.1, 0.2, 30.0), "real numbers"),
    ],
)
def test_bad_input_is_a_typed_error(args, match):
    with pytest.raises(DeskewError, match=match):
        deskew(*args)


def test_bad_options_are_typed_errors():
    with pytest.raises(DeskewError, match="interpolation"):
        deskew(np.zeros((3, 3, 3)), 0.1, 0.2, 30.0, interp="nearest")  # type: ignore[arg-type]
    with pytest.raises(DeskewError, match="skew axis"):
        deskew(np.zeros((3, 3, 3)), 0.1, 0.2, 30.0, skew_axis="z")  # type: ignore[arg-type]
    with pytest.raises(DeskewError, match="wider volume"):
        skew(np.zeros((50, 3, 3)), 0.1, 0.2, 30.0)


@pytest.mark.gpu
@pytest.mark.parametrize("interp", ["linear", "cubic"])
def test_cuda_equals_cpu(interp):
    rng = np.random.default_rng(3)
    raw = (rng.random((17, 33, 45)) * 1000).astype(np.uint16)
    cpu = deskew(raw, 0.1, 0.3, 31.5, interp=interp, pad=98, device="cpu")
    gpu = deskew(raw, 0.1, 0.3, 31.5, interp=interp, pad=98, device="cuda")
    np.testing.assert_allclose(gpu, cpu, rtol=1e-6, atol=1e-3)
    back_cpu = skew(cpu, 0.1, 0.3, 31.5, interp=interp, device="cpu")
    back_gpu = skew(cpu, 0.1, 0.3, 31.5, interp=interp, device="cuda")
    np.testing.assert_allclose(back_gpu, back_cpu, rtol=1e-6, atol=1e-3)


def test_reference_matlab_deskew_is_our_negative_angle():
    # Fixture: the reference's func_deskew (under GNU Octave) on a line at one raw column; see
    # tests/fixtures/geometry/make_reference_deskew_fixture.py. It shears the other way from cudaDecon, so
    # reference data deskew with the negated angle here. Its width uses ceil and it centres on plane
    # (nz − 1)/2 instead of nz/2: a constant offset of (w_ref − w)/2 − f/2 px, and nothing else.
    import json
    from pathlib import Path

    ref = json.loads((Path(__file__).parent / "fixtures" / "geometry" / "reference_deskew.json").read_text())
    c = ref["case"]
    nz, ny, nx = c["shape"]
    raw = np.zeros((nz, ny, nx), np.float32)
    raw[:, :, c["line_column"]] = 1.0
    f = shear_factor(c["dx_um"], c["dz_um"], c["angle_deg"])
    theirs = np.array(ref["line_centroid_px"])
    for sign, expect_match in ((-1, True), (1, False)):
        out = deskew(raw, c["dx_um"], c["dz_um"], sign * c["angle_deg"], interp="cubic")[:, 1, :]
        ours = (out * np.arange(out.shape[1])).sum(axis=1) / out.sum(axis=1)
        shifted = ours + (ref["width"] - out.shape[1]) / 2 - f / 2
        # 0.25 px: Octave's cubic kernel is not Keys'; the wrong direction is off by tens of px.
        assert (np.abs(shifted - theirs).max() < 0.25) == expect_match
