"""Mid-plane band removal and pre-processing on synthetic stacks with a known band."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from scipy.ndimage import gaussian_filter

from engines.background import (
    BackgroundError,
    BackgroundParams,
    BandFit,
    background_preset,
    band_masks,
    fit_band,
    preprocess,
    remove_band,
    square_crop_start,
)
from engines.band_residual import residual_band
from engines.config import OpticsConfig
from engines.deskew import deskewed_width

CPU = torch.device("cpu")


def band_stack(
    nz: int = 42,
    ny: int = 128,
    nx: int = 160,
    *,
    pos: float = 80.3,
    tilt: float = 0.6,
    drift: float = 0.05,
    amp: float = 400.0,
    width: float = 3.0,
) -> np.ndarray:
    """A mid-plane band: Gaussian across, centred at pos + tan(tilt)·row + drift·plane (centred indices)."""
    z = np.arange(nz)[:, None, None] - (nz - 1) / 2
    v = np.arange(ny)[None, :, None] - (ny - 1) / 2
    u = np.arange(nx)[None, None, :]
    d = u - pos - math.tan(math.radians(tilt)) * v - drift * z
    return amp * np.exp(-0.5 * (d / width) ** 2) * np.ones((nz, 1, 1))


def sample_stack(shape: tuple[int, int, int], split: float, real: float, virtual: float, seed: int, n: int) -> np.ndarray:
    """Sparse blurred beads: brightness ``real`` below column ``split``, ``virtual`` above it."""
    rng = np.random.default_rng(seed)
    s = np.zeros(shape)
    idx = tuple(rng.integers(0, m, n) for m in shape)
    np.add.at(s, idx, 1.0)
    s = gaussian_filter(s, 1.5)
    s /= s.max()
    u = np.arange(shape[2])[None, None, :]
    return s * np.where(u < split, real, virtual)


PARAMS = BackgroundParams(residual_band=False, gs_window_px=6.0, n_average=7)


@pytest.mark.parametrize("tilt,drift", [(0.6, 0.05), (-0.45, -0.03), (0.0, 0.0)])
def test_fit_recovers_band_position_tilt_and_drift(tilt, drift):
    rng = np.random.default_rng(1)
    band = band_stack(tilt=tilt, drift=drift)
    raw = band + sample_stack(band.shape, 80.3, 300.0, 150.0, seed=2, n=80)
    raw = rng.poisson(raw + 5.0).astype(np.float64) - 5.0  # shot noise on a small background
    fit = fit_band(raw, PARAMS)
    assert abs(fit.position_px - 80.3) < 1.0
    assert abs(fit.tilt_deg - tilt) < 0.2
    assert abs(fit.drift_px_per_plane - drift) < 0.01
    assert fit.groups_used == 42 // 7


def test_band_energy_reduced_tenfold_with_full_depth_mask():
    band = band_stack()
    params = BackgroundParams(residual_band=False, gs_window_px=6.0, n_average=7, mod_amp=0.0)
    fit = fit_band(band, params)
    out, _, ratio = remove_band(band.astype(np.float32), params, CPU, fit=fit)
    assert ratio == pytest.approx(1.0, abs=0.05)  # a symmetric band: neither side is brighter
    assert (band**2).sum() / (out**2).sum() >= 10.0


def test_reference_depth_leaves_two_mod_amp_at_the_band_centre():
    # The reference masks partially on purpose (sample signal overlaps the band): depth 1 − 2·mod_amp.
    params = BackgroundParams(residual_band=False, gs_window_px=6.0, n_average=7)  # Lifeact: mod_amp 0.2 → 40 % left at the centre
    band = band_stack(tilt=0.0, drift=0.0, pos=80.0, width=1.0)
    out, fit, _ = remove_band(band.astype(np.float32), params, CPU)
    centre = out[:, :, 80] / band[:, :, 80]
    np.testing.assert_allclose(centre, 2 * params.mod_amp, atol=0.01)


def test_virtual_side_is_boosted_by_the_measured_ratio():
    shape = (40, 64, 120)
    sample = sample_stack(shape, 60.0, 200.0, 100.0, seed=3, n=1500)
    params = BackgroundParams(residual_band=False, gs_window_px=4.0, n_average=7, mod_amp=0.0)
    fit = fit_band(band_stack(*shape, pos=60.0, tilt=0.0, drift=0.0), params)  # band fixed at column 60
    out, _, ratio = remove_band(sample.astype(np.float32), params, CPU, fit=fit)
    assert ratio == pytest.approx(2.0, rel=0.1)
    real, virt = out[:, :, :40].mean(), out[:, :, 80:].mean()
    assert virt == pytest.approx(real, rel=0.1)
    low = remove_band(sample.astype(np.float32), params.model_copy(update={"virtual_side": "low"}), CPU, fit=fit)[2]
    assert low == 1.0  # the other side is never dimmed: the ratio is at least 1


def test_masks_follow_the_fitted_line():
    params = BackgroundParams(residual_band=False, gs_window_px=5.0, mod_amp=0.0)
    fit = fit_band(band_stack(tilt=0.8, drift=0.1), params)
    mask, step = band_masks((42, 128, 160), fit, params, CPU)
    peak = mask.argmax(dim=2).numpy()
    z = np.arange(42)[:, None] - 20.5
    v = np.arange(128)[None, :] - 63.5
    truth = 80.3 + math.tan(math.radians(0.8)) * v + 0.1 * z
    assert np.abs(peak - truth).max() <= 1.0
    assert float(mask.max()) == pytest.approx(1.0, abs=1e-3)
    assert float(step[0, 0, 0]) < 0.01 and float(step[0, 0, -1]) > 0.99


def test_preprocess_deskews_normalises_and_crops():
    optics = OpticsConfig(pixel_size_um=0.1, stage_step_um=0.2, skew_angle_deg=30.8, camera_offset=100.0)
    raw = 100.0 + band_stack() + sample_stack((42, 128, 160), 80.3, 300.0, 150.0, seed=4, n=80)
    vol, report = preprocess(raw.astype(np.uint16), optics, PARAMS, device="cpu")
    nx_d = deskewed_width(160, 42, 0.1, 0.2, 30.8)
    assert report.deskewed_shape == (42, 128, nx_d)
    assert vol.shape == (42, 128, 128)  # the deskewed axis cropped to the other camera axis, as Step 1
    assert report.crop_start == square_crop_start(nx_d, 128) == round((nx_d - 128) / 2) - 1
    # Normalised before the crop, as the reference: the kept part lies within [0, 1].
    assert vol.dtype == np.float32 and vol.min() == 0.0 and 0.5 < vol.max() <= 1.0
    assert report.band is not None and abs(report.band.position_px - 80.3) < 1.0
    assert abs(report.band.tilt_deg - 0.6) < 0.2
    # The y-skewed acquisition of the transposed stack gives the transposed result.
    opt_y = OpticsConfig(**{**optics.model_dump(), "skew_axis": "y"})
    vol_y, rep_y = preprocess(np.swapaxes(raw, 1, 2).astype(np.uint16), opt_y, PARAMS, device="cpu")
    np.testing.assert_allclose(vol_y, np.swapaxes(vol, 1, 2), atol=1e-6)
    assert rep_y.band is not None and rep_y.band.position_px == pytest.approx(report.band.position_px)


def test_band_removal_can_be_switched_off():
    optics = OpticsConfig(pixel_size_um=0.1, stage_step_um=0.2, skew_angle_deg=30.8, camera_offset=10.0)
    raw = np.full((6, 20, 30), 10.0)
    raw[:, 5, 7] = 110.0
    vol, report = preprocess(raw, optics, BackgroundParams(remove_band=False, normalize=False, crop_square=False))
    assert report.band is None and report.intensity_ratio == 1.0
    assert vol.max() == pytest.approx(100.0, rel=1e-4) and vol.min() == 0.0


def test_defaults_are_the_reference_lifeact_parameters_and_presets_exist():
    p = BackgroundParams()
    assert (p.gs_window_px, p.scale_factor, p.sigma_weight, p.mod_amp, p.n_average) == (30.0, 2.0, 1.0, 0.2, 21)
    assert (p.position_step_px, p.delta_angle_deg) == (1.0, 0.1)
    assert background_preset("F-actin") == p
    assert background_preset("ER").gs_window_px == 15.0 and background_preset("ER").scale_factor == 5.0
    assert background_preset("lyso").sigma_weight == 0.2 and background_preset("lyso").n_average == 15
    assert background_preset("MT").mod_amp == 0.3
    assert background_preset("skl").gs_window_px == 11.0 and background_preset("skl").scale_factor == 3.0
    with pytest.raises(BackgroundError, match="unknown background preset"):
        background_preset("mitochondria")


def test_bad_parameters_and_input_are_typed_errors():
    with pytest.raises(ValidationError):
        BackgroundParams(mod_amp=0.5)
    with pytest.raises(ValidationError):
        BackgroundParams(gs_window=3)  # type: ignore[call-arg]  # unknown field
    optics = OpticsConfig()
    with pytest.raises(BackgroundError, match="3-D"):
        preprocess(np.zeros((10, 10)), optics)
    with pytest.raises(BackgroundError, match="too small"):
        preprocess(np.zeros((1, 10, 10)), optics)


@pytest.mark.gpu
def test_cuda_equals_cpu():
    optics = OpticsConfig(pixel_size_um=0.1, stage_step_um=0.2, skew_angle_deg=30.8)
    raw = 100.0 + band_stack() + sample_stack((42, 128, 160), 80.3, 300.0, 150.0, seed=5, n=80)
    cpu, rc = preprocess(raw, optics, PARAMS, device="cpu")
    gpu, rg = preprocess(raw, optics, PARAMS, device="cuda")
    assert rg.band == rc.band
    np.testing.assert_allclose(gpu, cpu, atol=1e-5)


def test_band_fit_on_the_simulator():
    # An independently written forward model (engines/simulate): beads above a mirror, PSF, sheet, skew,
    # a drifting two-component epi band and sCMOS noise. The fit must find the band it put in.
    from engines.simulate import Microscope, make_sim_config

    cfg = make_sim_config(shape=(48, 96, 128), structure="beads", n_objects=40, band_photons=200.0,
                          band_sigma_px=4.0, band_wide_sigma_px=12.0, band_drift_px_per_plane=0.05,
                          psf_model="gaussian", mirror_position=0.55, height_range_um=(0.4, 2.0))
    scope = Microscope(cfg, seed=1)
    raw = scope.acquire(0, with_ground_truth=False).raw
    vol, report = preprocess(raw, cfg.optics, BackgroundParams(gs_window_px=4.0, n_average=8), device="cpu")
    assert report.band is not None
    assert abs(report.band.position_px - scope.geometry.mirror_column) < 1.0
    assert abs(report.band.tilt_deg) < 0.2
    assert abs(report.band.drift_px_per_plane - 0.05) < 0.01
    assert vol.shape == (48, 96, 96)


def test_parity_with_the_reference_band_removal():
    # Fixture: the reference's own RemoveMidFluorescence_v3/func_maskMiddleLine run (under GNU Octave) on
    # the seeded stack of tests/fixtures/geometry/band_case.py; regenerate with make_reference_band_fixture.py.
    import json
    from pathlib import Path

    from tests.fixtures.geometry.band_case import CASE, case_stack

    ref = json.loads((Path(__file__).parent / "fixtures" / "geometry" / "reference_band.json").read_text())
    assert ref["case"] == CASE, "band_case.py changed: regenerate reference_band.json"
    raw = case_stack()
    params = BackgroundParams(**CASE["params"], residual_band=False)
    out, fit, ratio = remove_band((raw - CASE["offset"]).astype(np.float32), params, CPU)
    nz, nv, nu = raw.shape
    z = np.arange(nz)[:, None] - (nz - 1) / 2
    v = np.arange(nv)[None, :] - (nv - 1) / 2
    ours = fit.position_px + math.tan(math.radians(fit.tilt_deg)) * v + fit.drift_px_per_plane * z
    theirs = np.array(ref["mask_centre_px"])  # (nz, nv) centroid of the reference's mask along the skew axis
    # The reference shifts its masks by whole pixels and, here, keeps its tilt at 0°: agree to ~1 px.
    assert abs(fit.position_px - theirs[nz // 2, nv // 2]) <= 1.0
    assert np.abs(ours - theirs).mean() <= 0.75 and np.abs(ours - theirs).max() <= 2.0
    ref_drift = np.polyfit(z[:, 0], theirs.mean(axis=1), 1)[0]
    assert abs(fit.drift_px_per_plane - ref_drift) <= 0.03
    assert ratio == pytest.approx(ref["intensity_ratio"], rel=0.1)
    # The band-removed, boosted data: mean profile across the band within 5 % of the reference's peak.
    prof, ref_prof = out.mean(axis=(0, 1)), np.array(ref["masked_mean_profile"])
    assert np.abs(prof - ref_prof).max() <= 0.05 * ref_prof.max()
    # Where we differ on purpose: the reference's hill climb misses this 0.6° tilt; our search finds it.
    assert ref["accAngle_deg"] == 0.0 and abs(fit.tilt_deg - CASE["band_tilt_deg"]) < 0.1


def _near_mirror_over_mid(band_photons: float, residual: bool, seed: int) -> float:
    """Median background of the 5 view slices next to the mirror over that of the 5 mid-volume slices."""
    from engines.simulate import Microscope, make_sim_config
    from engines.views import split_views

    cfg = make_sim_config(shape=(48, 96, 96), structure="beads", band_photons=band_photons)
    raw = Microscope(cfg, seed=seed).acquire(0, with_ground_truth=False).raw
    o = cfg.optics
    vol, _ = preprocess(raw, o, BackgroundParams(residual_band=residual), device="cpu")
    dz = o.stage_step_um * math.sin(math.radians(abs(o.skew_angle_deg)))
    view, _, _ = split_views(vol, o.pixel_size_um, dz, device="cpu")
    near, mid = view[-5:], view[view.shape[0] // 2 - 2 : view.shape[0] // 2 + 3]  # the mirror is at the end
    return float(np.median(near[near > 0]) / np.median(mid[mid > 0]))


@pytest.mark.parametrize("seed", [0, 1])
def test_residual_band_step_brings_the_mirror_slab_to_the_band_free_level(seed):
    # Known truth: the same sample and noise seed with and without the simulator's band.
    truth = _near_mirror_over_mid(0.0, False, seed)
    reference_only = _near_mirror_over_mid(40.0, False, seed)
    ours = _near_mirror_over_mid(40.0, True, seed)
    assert reference_only > 2.5 * truth  # the reference's mask leaves a bright slab next to the mirror
    assert ours < 1.5 * truth and ours < 0.4 * reference_only


def test_residual_band_is_never_negative_and_zero_without_a_band():
    import torch

    params = BackgroundParams(gs_window_px=6.0, n_average=7)
    frames = torch.zeros(14, 40, 64)
    fit = BandFit(position_px=30.0, tilt_deg=0.0, drift_px_per_plane=0.0)
    assert float(residual_band(frames, fit, params).abs().max()) == 0.0
    u = torch.arange(64.0)
    frames = frames + 5.0 * torch.exp(-0.5 * ((u - 30.0) / 3.0) ** 2) + 1.0
    res = residual_band(frames, fit, params)
    assert float(res.min()) >= 0.0
    assert float(res[:, :, 30].mean()) == pytest.approx(5.0, rel=0.15)  # the band above the floor of 1
    assert float(res[:, :, 0].max()) < 0.1
