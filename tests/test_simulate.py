"""Simulator: geometry recovered by the reconstruction's own inverse steps, camera statistics, training pairs.

Every check compares against truth the simulator records (bead positions, mirror plane, band column) after
running the *independent* inverse code: engines.deskew for Step 1 and engines.views for Step 3.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from engines.deskew import deskew
from engines.simulate import Microscope, SimulationError, make_sim_config, simulate_training_pair
from engines.simulate.config import SimConfig, photons_for_snr
from engines.simulate.noise import camera, expected_counts, expected_variance

pytestmark = pytest.mark.timeout(120)

BEADS = dict(structure="beads", shape=(64, 64, 192), n_objects=8, height_range_um=(0.8, 2.0), band_photons=0.0,
             peak_photons=2000.0)


def _centroid(vol: np.ndarray, centre: np.ndarray, radius: tuple[int, int, int]) -> tuple[np.ndarray, float]:
    """Intensity centroid in a box around ``centre`` and the z–x correlation of the spot (its tilt)."""
    c = np.round(centre).astype(int)
    sl = tuple(slice(max(ci - r, 0), min(ci + r + 1, n)) for ci, r, n in zip(c, radius, vol.shape))
    sub = np.clip(vol[sl], 0, None).astype(np.float64)
    com = np.array(ndimage.center_of_mass(sub))
    zz, _, xx = np.meshgrid(*[np.arange(n) for n in sub.shape], indexing="ij")
    w = sub / sub.sum()
    czx = (w * (zz - com[0]) * (xx - com[2])).sum()
    czz, cxx = (w * (zz - com[0]) ** 2).sum(), (w * (xx - com[2]) ** 2).sum()
    return com + [s.start for s in sl], float(czx / math.sqrt(czz * cxx))


@pytest.fixture(scope="module")
def beads_no_mirror():
    mic = Microscope(make_sim_config(**BEADS, mirror_reflectance=0.0), seed=1)
    return mic, mic.acquire(0)


@pytest.fixture(scope="module")
def beads_mirror():
    mic = Microscope(make_sim_config(**BEADS, mirror_reflectance=1.0), seed=1)
    return mic, mic.acquire(0)


def test_beads_deskew_to_true_positions(beads_no_mirror) -> None:
    mic, st = beads_no_mirror
    g = mic.geometry
    desk = deskew(st.raw.astype(np.float32) - mic.cfg.optics.camera_offset, g.dx_um, g.dz_um, g.angle_deg)
    truth = np.array(mic.bead_positions()["deskewed_index"])
    assert len(truth) >= 5
    for p in truth:
        c, tilt = _centroid(desk, p, (12, 6, 6))
        assert np.abs(c - p).max() < 0.5, f"bead at {p} measured at {c}"
        # The PSF of a deskewed stack is aligned with the detection axis; a wrong shear direction in the
        # forward model would tilt it strongly (|corr| ≈ 1) while leaving the centroid in place.
        assert abs(tilt) < 0.15, f"bead at {p}: deskewed PSF tilted (z–x correlation {tilt:.2f})"


def test_views_overlay_and_psfs_are_complementary(beads_mirror) -> None:
    views = pytest.importorskip("engines.views")
    from engines.rotate3d import rot_x, rot_y

    mic, st = beads_mirror
    g, o = mic.geometry, mic.cfg.optics
    desk = deskew(st.raw.astype(np.float32) - o.camera_offset, g.dx_um, g.dz_um, g.angle_deg)
    view_a, view_b, rep = views.split_views(
        desk, g.dx_um, g.dz_deskewed_um, views.ViewsParams(angle_deg=o.objective_angle_deg)
    )
    # Where the true emitters land in the rotated volume (rotate3d's convention: physical µm from the centre).
    rot = rot_x(rep.angle_x_deg) @ rot_y(rep.angle_y_deg)
    spacing = np.array([g.dz_deskewed_um, g.dx_um, g.dx_um])
    c_in, c_out = (np.array(desk.shape) - 1) / 2, (np.array(rep.rotated_shape) - 1) / 2

    def rotated(idx: list[float]) -> np.ndarray:
        return rot @ ((np.asarray(idx) - c_in) * spacing) / g.dx_um + c_out

    beads = mic.bead_positions()
    real = [rotated(p) for p in beads["deskewed_index"]]
    virt = [rotated(p) for p in beads["virtual_deskewed_index"]]
    true_mirror = np.mean([(r[0] + v[0]) / 2 for r, v in zip(real, virt)])
    assert abs(rep.split_index - true_mirror) < 1.0, f"mirror found at {rep.split_index}, truth {true_mirror:.2f}"

    k = int(round(rep.rotated_shape[0] - 1 + rep.split_offset))
    a0 = int(math.ceil(k / 2)) - 1 - rep.depth + 1  # rotated slice of view index 0 (engines.views.cut_views)
    for r, v in zip(real, virt):
        # Each bead is in one view by its real image and in the other by its mirror image.
        ca, tilt_a = _centroid(view_a, np.array([v[0] - a0, v[1], v[2]]), (6, 5, 5))
        cb, tilt_b = _centroid(view_b, np.array([k - r[0] - a0, r[1], r[2]]), (6, 5, 5))
        assert np.abs(ca - cb).max() < 1.0, f"bead {r}: view A {ca} vs view B {cb}"
        # Complementary PSFs: the detection axis is tilted one way in one view and the other way in the other.
        assert tilt_a * tilt_b < 0 and min(abs(tilt_a), abs(tilt_b)) > 0.2, (tilt_a, tilt_b)


def test_real_image_on_one_side_of_the_mirror_plane() -> None:
    mic = Microscope(make_sim_config(structure="filaments", shape=(48, 64, 128)), seed=3)
    g = mic.geometry
    gt = mic.ground_truth(0)
    k, _, x = np.nonzero(gt)
    assert len(k) > 100
    # virtual_side "high": every real emitter lies below the mirror's column in its plane.
    assert np.all(x < g.mirror_deskewed_x(k) + 1.0)
    # and the heights the geometry assigns are within the configured range (after drift, none below zero)
    h = g.deskewed_to_mirror(np.stack([k, np.zeros_like(k), x], 1).astype(float))[:, 2]
    assert h.min() > -1.0 and h.max() < mic.cfg.height_range_um[1] + 1.0


def test_band_sits_on_the_mirror_line_raw_and_deskewed() -> None:
    cfg = make_sim_config(structure="puncta", shape=(40, 48, 160), peak_photons=20.0, band_photons=400.0,
                          mirror_position=0.4, band_sigma_px=6.0, band_wide_fraction=0.0)
    mic = Microscope(cfg, seed=5)
    st = mic.acquire(0)
    g = mic.geometry
    signal = st.raw.astype(np.float64) - cfg.optics.camera_offset
    # Raw: the band is the brightest column of the mean frame, at the mirror_position the config asked for.
    col = signal.mean(axis=(0, 1))
    assert abs(int(np.argmax(col)) - 0.4 * (g.nx - 1)) <= 1
    # Deskewed (engines.deskew, not our geometry): the band is a plane sliding by the shear per plane.
    desk = deskew(signal.astype(np.float32), g.dx_um, g.dz_um, g.angle_deg)
    predicted = g.mirror_deskewed_x(np.arange(g.nz))
    meta = mic.metadata(1)["mirror"]
    assert predicted[0] == pytest.approx(meta["deskewed_x_at_plane0"])
    for kk in range(2, g.nz - 2):
        prof = ndimage.gaussian_filter1d(desk[kk].mean(axis=0), 1.5)
        assert abs(int(np.argmax(prof)) - predicted[kk]) <= 1.5, f"plane {kk}"


def test_camera_noise_has_the_model_mean_and_variance() -> None:
    rng = np.random.default_rng(0)
    s, off, gain, read = 40.0, 100.0, 1.5, 3.0
    counts = camera(np.full((400, 1000), s, np.float32), rng, offset=off, gain=gain, read_noise=read)
    assert counts.dtype == np.uint16
    n = counts.size
    mean, var = counts.mean(), counts.var()
    exp_mean, exp_var = expected_counts(s, off, gain), expected_variance(s, gain, read) + 1 / 12
    assert abs(mean - exp_mean) < 5 * math.sqrt(exp_var / n)
    assert abs(var - exp_var) < 5 * exp_var * math.sqrt(2 / n)
    # Same generator state → same stack, whatever the thread count.
    again = camera(np.full((400, 1000), s, np.float32), np.random.default_rng(0), offset=off, gain=gain,
                   read_noise=read)
    assert np.array_equal(counts, again)


def test_simulated_stack_noise_matches_its_expected_photons() -> None:
    cfg = make_sim_config(structure="filaments", shape=(32, 64, 96), read_noise_counts=2.5, gain=1.0)
    mic = Microscope(cfg, seed=2)
    st = mic.acquire(0, keep_photons=True)
    lam = st.photons.astype(np.float64)
    z = (st.raw - expected_counts(lam, cfg.optics.camera_offset, cfg.gain)) / np.sqrt(
        expected_variance(lam, cfg.gain, cfg.read_noise_counts) + 1 / 12
    )
    assert abs(z.mean()) < 0.01 and abs(z.var() - 1.0) < 0.02
    assert lam.max() == pytest.approx(cfg.peak_photons + mic.band().max(), rel=0.35)


def test_snr_sets_the_peak_photons() -> None:
    s = photons_for_snr(10.0, 2.0)
    assert s / math.sqrt(s + 4.0) == pytest.approx(10.0)
    cfg = make_sim_config(snr=10.0, read_noise_counts=2.0)
    assert cfg.effective_peak_photons() == pytest.approx(s)


def test_timepoints_move_deterministically() -> None:
    cfg = make_sim_config(structure="puncta", shape=(24, 48, 64))
    a, b = Microscope(cfg, seed=9), Microscope(cfg, seed=9)
    p3 = a.sample.at(3, cfg)
    assert np.array_equal(p3, b.sample.at(3, cfg))
    # any order of access gives the same positions as the sequential run (the walk is cached, not re-drawn)
    seq = [b.sample.at(t, cfg) for t in range(6)]
    assert all(np.array_equal(a.sample.at(t, cfg), seq[t]) for t in (5, 1, 4, 0, 2))
    shift = (p3 - a.sample.at(0, cfg)).mean(axis=0)
    assert np.allclose(shift[:2], 3 * np.array(cfg.drift_um_per_timepoint[:2]), atol=0.05)
    assert np.array_equal(a.acquire(1).raw, b.acquire(1).raw)
    assert not np.array_equal(a.acquire(0).raw, a.acquire(1).raw)


@pytest.mark.parametrize("structure", ["filaments", "puncta", "beads", "tubules", "rings", "meshwork"])
def test_training_pair_shapes_range_and_determinism(structure: str) -> None:
    llsm, gt = simulate_training_pair(structure, seed=4, shape=(12, 64, 96))
    assert llsm.shape == (12, 64, 96) and gt.shape == (12, 96, 144)
    assert llsm.dtype == gt.dtype == np.float32
    assert llsm.min() == 0.0 and llsm.max() == 1.0 and gt.min() == 0.0 and gt.max() == 1.0
    llsm2, gt2 = simulate_training_pair(structure, seed=4, shape=(12, 64, 96))
    assert np.array_equal(llsm, llsm2) and np.array_equal(gt, gt2)


def test_training_ground_truth_is_sharper_along_one_axis_only() -> None:
    cfg = make_sim_config(peak_photons=5000.0, sr_factor=1.6, n_objects=4, height_range_um=(0.5, 1.0))
    llsm, gt = simulate_training_pair("beads", seed=7, shape=(24, 96, 128), config=cfg)

    def widths(vol: np.ndarray) -> tuple[float, float]:
        # second moments of the brightest spot's in-focus plane, after removing the noise floor
        z, y, x = np.unravel_index(np.argmax(ndimage.gaussian_filter(vol, 1.0)), vol.shape)
        r = max(4, vol.shape[1] // 24)
        sub = vol[z, y - r:y + r + 1, x - r:x + r + 1].astype(np.float64)
        sub = np.clip(sub - np.median(vol[z]), 0, None)
        yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
        w = sub / sub.sum()
        my, mx = (w * yy).sum(), (w * xx).sum()
        return math.sqrt((w * (yy - my) ** 2).sum()), math.sqrt((w * (xx - mx) ** 2).sum())

    sy_l, sx_l = widths(llsm)
    sy_g, sx_g = widths(gt)
    assert 0.8 < sx_l / sy_l < 1.25, "LLSM input should be laterally isotropic"
    assert sx_g / sy_g < 0.8, f"LLS-SIM ground truth not sharper along x: σx/σy = {sx_g / sy_g:.2f}"
    # y resolution matches LLSM (the GT grid is 1.5× finer, so its widths in fine pixels are 1.5× larger)
    assert 0.8 < sy_g / (1.5 * sy_l) < 1.25


def test_bad_configs_raise_typed_errors_that_name_the_field() -> None:
    with pytest.raises(SimulationError, match="unknown field 'mirror'"):
        make_sim_config(mirror=0.5)
    with pytest.raises(SimulationError, match="mirror_position"):
        make_sim_config(mirror_position=1.5)
    with pytest.raises(SimulationError, match="smaller field"):
        make_sim_config(shape=(1000, 1000, 1000))
    with pytest.raises(SimulationError, match="height_range_um"):
        make_sim_config(height_range_um=(3.0, 1.0))
    with pytest.raises(SimulationError, match="highest imaged height"):
        Microscope(make_sim_config(structure="beads", shape=(8, 16, 16)), seed=0)
    with pytest.raises(SimulationError, match="mirror image inside the 8-plane stack"):
        Microscope(make_sim_config(structure="beads", shape=(8, 64, 192), height_range_um=(0.8, 2.0)), seed=0)
    with pytest.raises(SimulationError, match="unknown structure 'actin'; choose one of filaments"):
        simulate_training_pair("actin", seed=0, shape=(8, 64, 64))
    with pytest.raises(SimulationError, match="even"):
        simulate_training_pair("puncta", seed=0, shape=(8, 63, 64))
    with pytest.raises(SimulationError, match="negative|≥ 0"):
        camera(np.full((4, 4), -1.0, np.float32), np.random.default_rng(0), offset=100.0)
    assert SimConfig().version == 1


def test_step1_band_fit_finds_the_simulated_band_and_its_drift() -> None:
    background = pytest.importorskip("engines.background")
    cfg = make_sim_config(structure="filaments", shape=(63, 96, 192), band_drift_px_per_plane=0.2, band_photons=60.0)
    mic = Microscope(cfg, seed=4)
    raw = mic.acquire(0, with_ground_truth=False).raw.astype(np.float32) - cfg.optics.camera_offset
    fit = background.fit_band(raw, background.BackgroundParams(gs_window_px=cfg.band_sigma_px, n_average=9))
    truth = mic.band_center()
    mid = (cfg.shape[0] - 1) / 2
    assert abs(fit.position_px - np.interp(mid, np.arange(cfg.shape[0]), truth)) < 3.0
    assert fit.drift_px_per_plane == pytest.approx(0.2, abs=0.05)


def test_step1_and_step3_find_the_true_mirror_plane_on_filaments() -> None:
    """The reconstruction's own Step 1 (band removal + deskew) and Step 3 (rotate, split) on a filament stack."""
    background = pytest.importorskip("engines.background")
    views = pytest.importorskip("engines.views")
    from engines.rotate3d import rot_x, rot_y

    cfg = make_sim_config(structure="filaments", shape=(101, 96, 256), height_range_um=(0.3, 2.5))
    mic = Microscope(cfg, seed=2)
    g = mic.geometry
    vol, rep = background.preprocess(mic.acquire(0, with_ground_truth=False).raw, cfg.optics,
                                     background.BackgroundParams(gs_window_px=cfg.band_sigma_px, crop_square=False))
    assert abs(rep.band.position_px - g.mirror_column) < 4.0
    view_a, view_b, vr = views.split_views(vol, g.dx_um, g.dz_deskewed_um,
                                           views.ViewsParams(angle_deg=cfg.optics.objective_angle_deg))
    rot = rot_x(vr.angle_x_deg) @ rot_y(vr.angle_y_deg)
    spacing = np.array([g.dz_deskewed_um, g.dx_um, g.dx_um])
    c_in, c_out = (np.array(vol.shape) - 1) / 2, (np.array(vr.rotated_shape) - 1) / 2
    on_mirror = g.mirror_to_deskewed(np.array([[4.0, 4.0, 0.0]]))[0]
    true_split = (rot @ ((on_mirror - c_in) * spacing) / g.dx_um + c_out)[0]
    assert abs(vr.split_index - true_split) < 1.0
    # the two views show the same filaments: strongly correlated once B is flipped
    assert np.corrcoef(view_a.ravel(), view_b.ravel())[0, 1] > 0.6


def _direct_same_convolution(img: np.ndarray, ker: np.ndarray) -> np.ndarray:
    from scipy.signal import convolve

    return convolve(img.astype(np.float64), ker.astype(np.float64), mode="same", method="direct")


def test_fft_convolver_is_the_linear_same_size_convolution() -> None:
    from engines.simulate.optics import FFTConvolver

    rng = np.random.default_rng(0)
    img = rng.random((9, 12, 20)).astype(np.float32)
    ker = rng.random((5, 3, 7)).astype(np.float32)  # asymmetric: catches a flipped or shifted kernel
    out = FFTConvolver(ker, img.shape)(img)
    assert np.allclose(out, _direct_same_convolution(img, ker), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_fft_convolver_cuda_matches_cpu() -> None:
    from engines.simulate.optics import FFTConvolver

    rng = np.random.default_rng(1)
    img = rng.random((33, 64, 96)).astype(np.float32)
    ker = rng.random((11, 9, 21)).astype(np.float32)
    cpu = FFTConvolver(ker, img.shape)(img)
    gpu = FFTConvolver(ker, img.shape, device="cuda")(img)
    assert np.allclose(gpu, cpu, rtol=1e-4, atol=1e-3 * float(cpu.max()))


def test_fft_convolver_extended_is_the_valid_convolution() -> None:
    from scipy.signal import convolve

    from engines.simulate.optics import FFTConvolver

    rng = np.random.default_rng(2)
    ker = rng.random((5, 3, 7)).astype(np.float32)
    conv = FFTConvolver(ker, (9, 12, 20))
    src = rng.random(conv.extended_shape).astype(np.float32)
    expect = convolve(src.astype(np.float64), ker.astype(np.float64), mode="valid", method="direct")
    assert expect.shape == (9, 12, 20)
    assert np.allclose(conv.extended(src), expect, rtol=1e-4, atol=1e-4)


def test_static_sample_renders_once_and_only_the_noise_changes() -> None:
    cfg = make_sim_config(structure="puncta", shape=(24, 48, 96), drift_um_per_timepoint=(0.0, 0.0, 0.0),
                          jitter_um=0.0)
    mic = Microscope(cfg, seed=1)
    assert mic.is_static
    a, b = mic.acquire(0, keep_photons=True), mic.acquire(3, keep_photons=True)
    assert np.array_equal(a.photons, b.photons) and not np.array_equal(a.raw, b.raw)
    # the cached image is what a fresh render of that timepoint gives
    fresh = Microscope(cfg, seed=1)  # same config, but timepoint 3 rendered first
    assert np.allclose(fresh.expected_photons(3), b.photons, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("virtual_side", "angle"), [("low", 30.8), ("high", -30.8)])
def test_geometry_variants_deskew_to_truth(virtual_side: str, angle: float) -> None:
    """Mirror image on the other side of the band, and the stage scanning the other way."""
    cfg = make_sim_config(**{**BEADS, "n_objects": 4}, mirror_reflectance=0.0, virtual_side=virtual_side,
                          optics={"skew_angle_deg": angle})
    mic = Microscope(cfg, seed=1)
    g = mic.geometry
    raw = mic.acquire(0).raw.astype(np.float32) - cfg.optics.camera_offset
    desk = deskew(raw, g.dx_um, g.dz_um, g.angle_deg)
    for p in mic.bead_positions()["deskewed_index"]:
        c, tilt = _centroid(desk, np.array(p), (12, 6, 6))
        assert np.abs(c - p).max() < 0.5 and abs(tilt) < 0.15
    k, _, x = np.nonzero(mic.ground_truth(0))
    below = x < g.mirror_deskewed_x(k)
    assert below.all() if virtual_side == "high" else not below.any()


def _fwhm(line: np.ndarray, spacing: float) -> float:
    """Full width at half maximum of a 1-D peak, crossings linearly interpolated."""
    line = np.asarray(line, dtype=np.float64)
    i = int(np.argmax(line))
    half = line[i] / 2
    lo, hi = i, i
    while lo > 0 and line[lo - 1] > half:
        lo -= 1
    while hi < len(line) - 1 and line[hi + 1] > half:
        hi += 1
    left = lo - (line[lo] - half) / (line[lo] - line[lo - 1])
    right = hi + (line[hi] - half) / (line[hi] - line[hi + 1])
    return float((right - left) * spacing)


def test_beads_have_the_resolution_the_optics_imply(beads_no_mirror) -> None:
    mic, _ = beads_no_mirror
    g, o, c = mic.geometry, mic.cfg.optics, mic.cfg
    photons = mic.expected_photons(0)  # noise-free, to measure the optics rather than the noise
    desk = deskew(photons - mic.band(), g.dx_um, g.dz_um, g.angle_deg)
    lam, na, n = o.emission_nm / 1000, o.na_detection, o.refractive_index
    lateral = 0.51 * lam / na  # Airy FWHM; pixel integration and off-centre sampling widen it by up to ~25 %
    # Axial: widefield detection (0.88 λ / (n − √(n² − NA²))) times the sheet's main lobe, both ~Gaussian.
    det_axial = 0.88 * lam / (n - math.sqrt(n * n - na * na))
    axial = 1 / math.sqrt(1 / det_axial**2 + 1 / c.sheet_fwhm_um**2)
    for p in mic.bead_positions()["deskewed_index"]:
        k, y, x = np.round(p).astype(int)
        box = desk[k - 2:k + 3, y - 2:y + 3, x - 2:x + 3]
        dk, dy, dx = np.unravel_index(int(np.argmax(box)), box.shape)
        k, y, x = k - 2 + dk, y - 2 + dy, x - 2 + dx
        assert lateral * 0.95 < _fwhm(desk[k, :, x], g.dx_um) < lateral * 1.3
        assert axial * 0.9 < _fwhm(desk[:, y, x], g.dz_deskewed_um) < axial * 1.15


@pytest.mark.parametrize(("angle", "virtual_side"), [(30.8, "high"), (-30.8, "high"), (45.0, "low")])
def test_frame_conversions_are_consistent(angle: float, virtual_side: str) -> None:
    from engines.deskew import deskewed_width
    from engines.simulate import Geometry

    cfg = make_sim_config(shape=(40, 30, 120), virtual_side=virtual_side, optics={"skew_angle_deg": angle})
    g = Geometry.from_config(cfg)
    rng = np.random.default_rng(0)
    raw = rng.uniform([0, 0, 0], [40, 30, 120], (200, 3))
    assert np.allclose(g.mirror_to_raw(g.raw_to_mirror(raw)), raw, atol=1e-9)
    m = g.raw_to_mirror(raw)
    assert np.allclose(m[:, 2], g.height_of_raw_column(raw[:, 2]), atol=1e-9)  # a raw column is one height
    assert np.allclose(g.reflect(g.reflect(m)), m)
    assert g.nx_deskewed == deskewed_width(120, 40, cfg.optics.pixel_size_um, cfg.optics.stage_step_um, angle)
    # physical distances are preserved between the mirror and the deskewed frames (a rigid change of frame)
    d = g.mirror_to_deskewed(m) * np.array([g.dz_deskewed_um, g.dx_um, g.dx_um])
    assert np.allclose(np.linalg.norm(d[1:] - d[:-1], axis=1), np.linalg.norm(m[1:] - m[:-1], axis=1))
    # moving along the stage by one step moves one plane on the raw grid, same column
    p = np.array([[1.0, 1.0, 1.5]])
    step = g.mirror_to_raw(p + [cfg.optics.stage_step_um, 0, 0]) - g.mirror_to_raw(p)
    assert np.allclose(step, [[1.0, 0.0, 0.0]], atol=1e-9)
