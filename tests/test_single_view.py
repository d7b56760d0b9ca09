"""Single-view LLSM mode on real data without a mirror, and the dual-view modes refusing such data."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import tifffile

from engines.config import OpticsConfig
import torch

from engines.reconstruct import ReconModels, Reconstructor, ReconstructParams, load_models
from engines.rldfn.metrics import puncta_fwhm
from engines.views import NoMirrorError, ViewsParams

# the pycudadecon stack's optics (data README): dx 0.1 µm, stage step 0.3 µm, 31.5°, camera offset 98
OPTICS = dict(pixel_size_um=0.1, stage_step_um=0.3, skew_angle_deg=31.5, objective_angle_deg=31.5,
              camera_offset=98.0, emission_nm=515.0, na_detection=1.1)


@pytest.fixture(scope="module")
def whole(shared_data) -> np.ndarray:
    return tifffile.imread(shared_data / "llsm-pycudadecon" / "im_raw.tif")


@pytest.fixture(scope="module")
def crop(whole) -> np.ndarray:
    return np.ascontiguousarray(whole[:, 150:246, 96:224])  # a field with puncta; 88 planes kept


def test_single_view_sharpens_real_llsm_without_speckle(crop, shared_data) -> None:
    models = load_models(psf=shared_data / "llsm-pycudadecon" / "psf.tif", psf_voxel_um=(0.1, 0.101, 0.101))
    rec = Reconstructor(OpticsConfig(**OPTICS), ReconstructParams(mode="single-view", iterations=8), models,
                        device="cpu")
    res = rec(crop, keep_intermediates=True)
    desk, out = res.intermediates["preprocessed"], res.fused
    assert out.shape == desk.shape and res.voxel_zyx_um == pytest.approx((0.3 * np.sin(np.radians(31.5)), 0.1, 0.1))
    before, after = puncta_fwhm(desk, res.voxel_zyx_um), puncta_fwhm(out, res.voxel_zyx_um)
    assert before["n"] >= 10 and after["n"] >= 10
    for ax in "zyx":  # sharper along every axis, by a clear margin
        assert after[ax] < 0.92 * before[ax], (ax, before, after)
    # no saturated or speckled regions: the brightest voxels stay within a small factor of the data's
    assert out.max() < 3.0 * desk.max()
    hot = out > 2.0 * np.percentile(desk, 99.99)
    assert hot.mean() < 1e-4
    # flux kept where the data are (deconvolution moves light, it does not make it)
    assert abs(out.sum() / desk.sum() - 1) < 0.1


@pytest.mark.parametrize("mode", ["classical", "sr-rl"])
def test_dual_view_mode_refuses_data_without_mirror(whole, mode) -> None:
    from engines.vsisr.network import VSISR, VSISRConfig
    from engines.vsisr.otf import generate_otfs

    optics = OpticsConfig(**OPTICS)
    models = None
    if mode == "sr-rl":  # refused before the (here untrained) network runs
        models = ReconModels(vsisr=VSISR(VSISRConfig(features=16, n_groups=1, n_blocks=1, reduction=4,
                                                     head_features=16)).eval(), otfs=generate_otfs(optics))
    rec = Reconstructor(optics, ReconstructParams(mode=mode, iterations=1), models, device="cpu")
    with pytest.raises(NoMirrorError, match="--mode single-view"):
        rec(whole)


def test_simulated_rllsm_passes_the_mirror_check() -> None:
    from engines.background import preprocess
    from engines.simulate.config import make_sim_config
    from engines.simulate.microscope import simulate_stack
    from engines.views import MIRROR_THRESHOLD, check_mirror_tensor

    for structure in ("filaments", "beads"):
        cfg = make_sim_config(shape=(48, 96, 96), structure=structure)
        stack, _ = simulate_stack(cfg, seed=5)
        vol, _ = preprocess(stack.raw, cfg.optics, device="cpu")
        contrast = check_mirror_tensor(torch.from_numpy(vol), cfg.optics.pixel_size_um,
                                       cfg.optics.deskewed_pixel_z_um, ViewsParams(angle_deg=cfg.optics.objective_angle_deg))
        assert contrast > 1.5 * MIRROR_THRESHOLD


def test_cli_names_single_view_mode_for_data_without_mirror(whole, crop, tmp_path) -> None:
    src, small = tmp_path / "llsm.tif", tmp_path / "llsm_crop.tif"
    tifffile.imwrite(src, whole)
    tifffile.imwrite(small, crop)
    args = [sys.executable, "-m", "streamer", "reconstruct", str(src), str(tmp_path / "out.tif"), "--device", "cpu",
            "--pixel-size-um", "0.1", "--stage-step-um", "0.3", "--skew-angle-deg", "31.5",
            "--objective-angle-deg", "31.5", "--camera-offset", "98"]
    proc = subprocess.run(args + ["--mode", "classical", "--iterations", "1"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--mode single-view" in proc.stderr and "Traceback" not in proc.stderr
    args[4] = str(small)
    proc = subprocess.run(args + ["--mode", "single-view", "--iterations", "2", "--float32"], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    out = tifffile.imread(tmp_path / "out.tif")
    assert out.dtype == np.float32 and out.shape[0] == crop.shape[0] and np.isfinite(out).all()
