"""Classical dual-view joint Richardson–Lucy fusion and the dual-view PSF helper, on data with known truth."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from scipy.signal import fftconvolve

from engines.rldfn.classical import classical_fuse
from engines.rldfn.errors import VolumeShapeError
from engines.rldfn.psf import clean_psf, dual_view_psfs, rotate_psf

ANGLE = 30.8  # the reference system's objective angle


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _fwhm(profile: np.ndarray) -> float:
    """Full width at half maximum of a peaked 1-D profile (linear interpolation of the crossings)."""
    p = profile - profile.min()
    c = int(np.argmax(p))
    half = p[c] / 2
    lo = c
    while lo > 0 and p[lo - 1] > half:
        lo -= 1
    hi = c
    while hi < len(p) - 1 and p[hi + 1] > half:
        hi += 1
    left = lo - 1 + (half - p[lo - 1]) / (p[lo] - p[lo - 1]) if lo > 0 else float(lo)
    right = hi + (p[hi] - half) / (p[hi] - p[hi + 1]) if hi < len(p) - 1 else float(hi)
    return float(right - left)


def _bead_fwhm(vol: np.ndarray, beads: np.ndarray, r: int = 8) -> dict[str, float]:
    """Median FWHM of the beads along Z, X and the two Z–X diagonals (voxels)."""
    out: dict[str, list[float]] = {"z": [], "x": [], "d+": [], "d-": []}
    k = np.arange(-r, r + 1)
    for z, y, x in beads:
        out["z"].append(_fwhm(vol[z - r:z + r + 1, y, x]))
        out["x"].append(_fwhm(vol[z, y, x - r:x + r + 1]))
        out["d+"].append(_fwhm(vol[z + k, y, x + k]) * np.sqrt(2))
        out["d-"].append(_fwhm(vol[z + k, y, x - k]) * np.sqrt(2))
    return {key: float(np.median(v)) for key, v in out.items()}


def _beads(shape, rng, margin=10, spacing=12) -> np.ndarray:
    """Beads on a Z–X grid ``spacing`` apart (so profiles do not overlap), at random Y and sub-grid jitter."""
    zs = range(margin, shape[0] - margin, spacing)
    xs = range(margin, shape[2] - margin, spacing)
    return np.array([(z, rng.integers(margin, shape[1] - margin), x + rng.integers(0, 2)) for z in zs for x in xs])


def _simulate(psf_a, psf_b, shape=(44, 32, 44), seed=0):
    rng = np.random.default_rng(seed)
    beads = _beads(shape, rng)
    obj = np.zeros(shape, np.float32)
    obj[tuple(beads.T)] = 1000.0
    views = []
    for p in (psf_a, psf_b):
        v = fftconvolve(obj, p, mode="same")
        views.append(np.clip(v + rng.normal(0, 0.002 * v.max(), shape), 0, None).astype(np.float32))
    return views, beads


@pytest.fixture(scope="module")
def gaussian_pair():
    z, y, x = np.meshgrid(*[np.arange(-12, 13)] * 3, indexing="ij")
    base = np.exp(-(z**2) / (2 * 3.5**2) - (y**2 + x**2) / (2 * 1.2**2)).astype(np.float32)
    return dual_view_psfs(base, ANGLE)


def test_dual_view_fusion_beats_both_views(gaussian_pair):
    (va, vb), beads = _simulate(*gaussian_pair)
    fused = classical_fuse(va, vb, *gaussian_pair, iterations=15)
    assert fused.shape == va.shape
    wa, wb, wf = (_bead_fwhm(v, beads) for v in (va, vb, fused))
    print("FWHM (voxels) A", wa, "B", wb, "fused", wf)
    for axis in ("z", "x"):
        assert wf[axis] < 0.8 * min(wa[axis], wb[axis]), axis
    # each view is worst along its own long axis; the fusion's worst direction beats both views' worst
    assert max(wf.values()) < 0.6 * min(max(wa.values()), max(wb.values()))
    # flux is kept (beads + noise floor): deconvolution moves light, it does not create it
    assert abs(fused.sum() / ((va.sum() + vb.sum()) / 2) - 1) < 0.05


def test_dual_view_beats_single_view_deconvolution(gaussian_pair):
    """The gain is from combining views, not from deconvolution alone: single-view RL stays anisotropic."""
    (va, vb), beads = _simulate(*gaussian_pair, seed=1)
    pa, pb = gaussian_pair
    fused = _bead_fwhm(classical_fuse(va, vb, pa, pb, iterations=15), beads)
    single = _bead_fwhm(classical_fuse(va, va, pa, pa, iterations=15), beads)
    print("FWHM fused", fused, "single-view RL", single)
    assert max(fused.values()) < 0.75 * max(single.values())


def test_measured_psf_rotates_to_both_views(shared_data):
    raw = tifffile.imread(shared_data / "llsm-pycudadecon" / "psf.tif")
    psf = clean_psf(raw, size=(41, 41, 41))
    voxel = (0.1, 0.101, 0.101)  # dz, dy, dx of that bead stack (µm)
    a, b = dual_view_psfs(psf, ANGLE, voxel, out_voxel_size_um=(0.1, 0.1, 0.1))

    def tilt_deg(p: np.ndarray, vox) -> float:
        """Angle of the PSF's long axis from Z towards X, from intensity-weighted second moments (µm)."""
        w = np.where(p > 0.05 * p.max(), p, 0).sum(axis=1)  # Z–X projection of the bright core
        z, x = np.meshgrid(np.arange(w.shape[0]) * vox[0], np.arange(w.shape[1]) * vox[2], indexing="ij")
        m = w.sum()
        zc, xc = (w * z).sum() / m, (w * x).sum() / m
        czz, cxx, czx = (w * (z - zc) ** 2).sum() / m, (w * (x - xc) ** 2).sum() / m, (w * (z - zc) * (x - xc)).sum() / m
        return float(np.degrees(0.5 * np.arctan2(2 * czx, czz - cxx)))

    t0 = tilt_deg(psf, voxel)
    ta, tb = tilt_deg(a, (0.1,) * 3), tilt_deg(b, (0.1,) * 3)
    print(f"measured PSF tilt {t0:.2f}°, view A {ta:.2f}°, view B {tb:.2f}°")
    assert abs((ta - t0) - ANGLE) < 2.0 and abs((tb - t0) + ANGLE) < 2.0
    assert a.shape == b.shape and all(s % 2 == 1 for s in a.shape)
    assert abs(a.sum() - 1) < 1e-4 and abs(b.sum() - 1) < 1e-4
    # the bead sits in the centre voxel's neighbourhood after rotation
    peak = np.unravel_index(np.argmax(a), a.shape)
    assert all(abs(pk - (s - 1) / 2) <= 2 for pk, s in zip(peak, a.shape))


def test_psf_rotation_direction():
    line = np.zeros((21, 3, 21), np.float32)
    line[:, 1, 10] = 1.0  # a rod along Z
    r = rotate_psf(line, 30.0, out_shape=(21, 3, 21))
    zs, xs = np.nonzero(r[:, 1] > 0.3 * r.max())
    slope = np.polyfit(zs - 10, xs - 10, 1)[0]
    assert slope == pytest.approx(np.tan(np.radians(30.0)), abs=0.05)  # +angle: leans from +Z towards +X


def test_bad_inputs():
    v = np.ones((8, 8, 8), np.float32)
    with pytest.raises(VolumeShapeError, match="registered onto one grid"):
        classical_fuse(v, np.ones((8, 8, 9)), v, v)
    with pytest.raises(VolumeShapeError, match="PSF must be a 3-D"):
        classical_fuse(v, v, v[0], v)
    with pytest.raises(VolumeShapeError, match="no positive value"):
        classical_fuse(v, v, np.zeros((3, 3, 3)), v)
    with pytest.raises(VolumeShapeError, match="NaN or infinite"):
        classical_fuse(v, v, v, np.where(np.eye(8, dtype=bool)[None], np.nan, v))
    with pytest.raises(VolumeShapeError, match="no signal above its background"):
        clean_psf(np.full((9, 9, 9), 100.0))


@pytest.mark.gpu
def test_classical_cuda_matches_cpu(gaussian_pair):
    (va, vb), _ = _simulate(*gaussian_pair)
    cpu = classical_fuse(va, vb, *gaussian_pair, iterations=5, device="cpu")
    gpu = classical_fuse(va, vb, *gaussian_pair, iterations=5, device="cuda")
    np.testing.assert_allclose(gpu, cpu, rtol=1e-3, atol=1e-3 * float(cpu.max()))


def test_computed_psf_has_the_textbook_widths():
    pytest.importorskip("psfmodels")
    from engines.rldfn.psf import computed_psf

    lam, na, n = 0.525, 1.1, 1.33
    p = computed_psf((31, 31, 31), (0.1, 0.05, 0.05), emission_nm=lam * 1000, na=na, refractive_index=n)
    assert abs(p.sum() - 1) < 1e-5 and np.unravel_index(np.argmax(p), p.shape) == (15, 15, 15)
    lateral, axial = _fwhm(p[15, 15, :]) * 0.05, _fwhm(p[:, 15, 15]) * 0.1
    print(f"computed PSF FWHM lateral {lateral:.3f} µm, axial {axial:.3f} µm")
    assert lateral == pytest.approx(0.51 * lam / na, rel=0.3)
    assert axial == pytest.approx(0.88 * lam / (n - np.sqrt(n**2 - na**2)), rel=0.4)
    assert axial > 2.5 * lateral


def _half_covered(gaussian_pair, seed: int):
    """Noisy bead views where view B has data only for x < 28: x ≥ 34 is seen by view A alone."""
    pa, pb = gaussian_pair
    (va, vb), beads = _simulate(pa, pb, shape=(40, 24, 48), seed=seed)
    obj = np.zeros(va.shape, np.float32)
    obj[tuple(beads.T)] = 1.0
    blurred = fftconvolve(obj, pa, mode="same")
    empty = blurred < 0.01 * blurred.max()  # no bead light: anything bright here is noise made by the fusion
    rng = np.random.default_rng(seed + 10)
    va = np.clip(va + rng.normal(0, 0.02 * va.max(), va.shape), 0, None).astype(np.float32)
    vb = np.clip(vb + rng.normal(0, 0.02 * vb.max(), vb.shape), 0, None).astype(np.float32)
    vb[:, :, 28:] = 0
    return va, vb, empty


@pytest.mark.parametrize("seed", [0, 1])
def test_one_view_region_is_damped_and_two_view_region_kept(gaussian_pair, seed):
    pa, pb = gaussian_pair
    va, vb, empty = _half_covered(gaussian_pair, seed)
    plain = classical_fuse(va, vb, pa, pb, iterations=20, tv_one_view=0.0, one_view_step=1.0)
    damped = classical_fuse(va, vb, pa, pb, iterations=20, tv_one_view=0.0, one_view_step=0.3)
    regularised = classical_fuse(va, vb, pa, pb, iterations=20, tv_one_view=0.02, one_view_step=1.0)
    one, two = (slice(None), slice(None), slice(36, 48)), (slice(None), slice(None), slice(0, 20))
    noise = empty[one]
    # fewer effective iterations (or TV) where one view sees: lower noise peaks away from the beads there
    assert damped[one][noise].max() < 0.9 * plain[one][noise].max()
    assert regularised[one][noise].max() < plain[one][noise].max()
    # where both views are trusted the update is the plain one: the two-view region barely moves
    assert np.abs(damped[two] - plain[two]).max() < 0.05 * plain[two].max()


def test_undamped_one_view_step_zero_keeps_the_view(gaussian_pair):
    pa, pb = gaussian_pair
    va, vb, _ = _half_covered(gaussian_pair, 0)
    fused = classical_fuse(va, vb, pa, pb, iterations=5, tv_one_view=0.0, one_view_step=0.0)
    one = (slice(None), slice(None), slice(40, 48))
    np.testing.assert_allclose(fused[one], np.maximum(va[one], 1e-6), rtol=1e-4, atol=1e-5)


def test_one_view_parameters_are_checked(gaussian_pair):
    pa, pb = gaussian_pair
    va, vb, _ = _half_covered(gaussian_pair, 0)
    with pytest.raises(VolumeShapeError, match="tv_one_view"):
        classical_fuse(va, vb, pa, pb, iterations=1, tv_one_view=0.5)
    with pytest.raises(VolumeShapeError, match="one_view_step"):
        classical_fuse(va, vb, pa, pb, iterations=1, one_view_step=1.5)


@pytest.mark.parametrize("seed", [0, 1])
def test_one_view_region_never_exceeds_the_ceiling_and_two_view_region_is_free(gaussian_pair, seed):
    import math

    import torch

    from engines.rldfn.classical import DEFAULT_ONE_VIEW_CEILING
    from engines.rldfn.coverage import coverage_mask

    pa, pb = gaussian_pair
    va, vb, _ = _half_covered(gaussian_pair, seed)
    ca = coverage_mask(torch.from_numpy(va)).numpy()
    cb = coverage_mask(torch.from_numpy(vb)).numpy()
    one, both = ca & ~cb, ca & cb
    p = max(np.percentile(va[ca], 99.99), np.percentile(vb[cb], 99.99))
    free = classical_fuse(va, vb, pa, pb, iterations=30, one_view_step=1.0, one_view_ceiling=math.inf)
    bounded = classical_fuse(va, vb, pa, pb, iterations=30, one_view_step=1.0)
    # undamped RL makes voxels far beyond the data's range where one view sees; the ceiling holds them
    assert free[one].max() > 2 * p
    assert bounded[one].max() <= DEFAULT_ONE_VIEW_CEILING * p * 1.05
    # where both views are trusted (away from B's edge and its blend zone) the bound is off
    two = (slice(None), slice(None), slice(0, 20))
    assert np.abs(bounded[two] - free[two]).max() < 0.05 * free[two].max()
    assert both.any()
    with pytest.raises(VolumeShapeError, match="one_view_ceiling"):
        classical_fuse(va, vb, pa, pb, iterations=1, one_view_ceiling=0.0)
