"""The four steps chained, checked against the simulator's ground truth, and the ``reconstruct`` command."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import torch
from scipy import ndimage

from engines.reconstruct import ReconModels, Reconstructor, ReconstructError, ReconstructParams
from engines.rldfn.classical import classical_fuse
from engines.rotate3d import rot_x, rot_y, rotate_volume
from engines.simulate.config import make_sim_config
from engines.simulate.microscope import simulate_stack
from engines.views import ViewsParams, cut_views


def _any_volume(optics) -> ViewsParams:
    # random-weight networks scramble the mirror image: split such plumbing tests without the mirror check
    return ViewsParams(angle_deg=np.copysign(optics.objective_angle_deg, optics.skew_angle_deg), mirror_threshold=0.0)

SHAPE = (48, 96, 96)


@pytest.fixture(scope="module")
def beads():
    cfg = make_sim_config(shape=SHAPE, structure="beads", n_objects=40)
    stack, _ = simulate_stack(cfg, seed=5)
    return cfg, stack


@pytest.fixture(scope="module")
def classical(beads):
    cfg, stack = beads
    rec = Reconstructor(cfg.optics, ReconstructParams(mode="classical", iterations=10), device="cpu")
    return rec, rec(stack.raw, keep_intermediates=True)


def _truth_in_view_frame(cfg, stack, res) -> np.ndarray:
    """Ground truth carried through the geometry the chain found (crop, rotation, split), lightly blurred."""
    pre, rep = res.reports["preprocess"], res.reports["split_views"]
    gt = stack.ground_truth.astype(np.float32)
    ny = gt.shape[1]
    if gt.shape[2] > ny:
        gt = gt[:, :, pre.crop_start : pre.crop_start + ny]
    o = cfg.optics
    rot = rot_x(rep.angle_x_deg) @ rot_y(rep.angle_y_deg)
    rotated = rotate_volume(gt, (o.deskewed_pixel_z_um, o.pixel_size_um, o.pixel_size_um), rot,
                            out_spacing=rep.voxel_um, out_shape=rep.rotated_shape)
    ga, gb = cut_views(rotated, rep.split_offset, 101)
    # The simulator's truth holds the real emitters only; they lie in one of the two views.
    return ndimage.gaussian_filter(ga if ga.sum() > gb.sum() else gb, 1.0)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x = x.ravel() - x.mean()
    y = y.ravel() - y.mean()
    return float(x @ y / np.sqrt((x @ x) * (y @ y)))


def test_classical_chain_shapes_and_reports(classical) -> None:
    _, res = classical
    views = res.intermediates["view_a"], res.intermediates["view_b"]
    assert views[0].shape == views[1].shape == res.fused.shape
    assert res.intermediates["preprocessed"].shape[0] == SHAPE[0]
    assert set(res.timings_s) == {"preprocess", "lateral_sr", "split_views", "fuse"}
    assert abs(res.reports["split_views"].angle_x_deg) <= 0.1  # the simulated mirror is not tilted
    assert np.isfinite(res.fused).all() and res.fused.max() > 0


def test_fused_volume_is_closer_to_truth_than_either_view(beads, classical) -> None:
    cfg, stack = beads
    rec, res = classical
    truth = _truth_in_view_frame(cfg, stack, res)
    r_a = _pearson(res.intermediates["view_a"], truth)
    r_b = _pearson(res.intermediates["view_b"], truth)
    r_fused = _pearson(res.fused, truth)
    assert r_fused > max(r_a, r_b) + 0.2, (r_a, r_b, r_fused)
    # The views' PSF orientations matter: swapping them must do clearly worse (catches a sign convention error).
    swapped = classical_fuse(res.intermediates["view_a"], res.intermediates["view_b"], rec.psf_b, rec.psf_a, 10,
                             device="cpu")
    assert _pearson(swapped, truth) < r_fused - 0.1


def test_stage_chain_matches_direct_call(beads, classical) -> None:
    _, stack = beads
    rec, res = classical
    out = stack.raw
    for _, fn in rec.stages():
        out = fn(out)
    np.testing.assert_allclose(out, res.fused, rtol=1e-5, atol=1e-6)


def test_full_mode_without_weights_is_a_clear_error(beads) -> None:
    cfg, _ = beads
    with pytest.raises(ReconstructError, match="VSI-SR checkpoint, OTFs, RL-DFN weights"):
        Reconstructor(cfg.optics, ReconstructParams(mode="full"), ReconModels())


def test_full_mode_runs_with_small_random_networks(beads, tmp_path) -> None:
    from engines.rldfn.network import DualViewFusionNet
    from engines.vsisr.network import VSISR, VSISRConfig
    from engines.vsisr.otf import generate_otfs
    from engines.vsisr.lateral import LateralSRParams

    cfg, stack = beads
    torch.manual_seed(0)
    vsisr = VSISR(VSISRConfig(features=16, n_groups=1, n_blocks=1, reduction=4, head_features=16)).eval()
    rldfn = DualViewFusionNet(width=4).eval()
    models = ReconModels(vsisr=vsisr, otfs=generate_otfs(cfg.optics), rldfn=rldfn,
                         lateral=LateralSRParams(batch_size=16))
    raw = stack.raw[:20]
    rec = Reconstructor(cfg.optics, ReconstructParams(mode="full", tile="none", views=_any_volume(cfg.optics)), models,
                        device="cpu")
    res = rec(raw, keep_intermediates=True)
    sr = res.intermediates["lateral_sr"]
    pre = res.intermediates["preprocessed"]
    assert sr.shape == (pre.shape[0] - 6, int(pre.shape[1] * 1.5), int(pre.shape[2] * 1.5))
    assert res.voxel_um == pytest.approx(cfg.optics.pixel_size_um / 1.5)
    assert res.fused.shape == res.intermediates["view_a"].shape
    assert np.isfinite(res.fused).all()


def test_sr_rl_mode_runs_vsisr_then_network_free_fusion(beads) -> None:
    from engines.vsisr.lateral import LateralSRParams
    from engines.vsisr.network import VSISR, VSISRConfig
    from engines.vsisr.otf import generate_otfs

    cfg, stack = beads
    torch.manual_seed(0)
    vsisr = VSISR(VSISRConfig(features=16, n_groups=1, n_blocks=1, reduction=4, head_features=16)).eval()
    with pytest.raises(ReconstructError, match="mode 'sr-rl' needs VSI-SR checkpoint"):
        Reconstructor(cfg.optics, ReconstructParams(mode="sr-rl"), ReconModels(otfs=generate_otfs(cfg.optics)))
    models = ReconModels(vsisr=vsisr, otfs=generate_otfs(cfg.optics), lateral=LateralSRParams(batch_size=16))
    rec = Reconstructor(cfg.optics, ReconstructParams(mode="sr-rl", iterations=3, views=_any_volume(cfg.optics)),
                        models, device="cpu")
    res = rec(stack.raw[:20], keep_intermediates=True)
    pre = res.intermediates["preprocessed"]
    assert res.intermediates["lateral_sr"].shape == (pre.shape[0] - 6, int(pre.shape[1] * 1.5), int(pre.shape[2] * 1.5))
    assert res.voxel_um == pytest.approx(cfg.optics.pixel_size_um / 1.5)
    assert [name for name, _ in rec.stages()] == ["preprocess", "lateral_sr", "split_views", "fuse"]
    expected = classical_fuse(res.intermediates["view_a"], res.intermediates["view_b"], rec.psf_a, rec.psf_b, 3,
                              device="cpu")
    np.testing.assert_allclose(res.fused, expected, rtol=1e-5, atol=1e-6)


def test_reconstruct_command_writes_volume_summary_and_intermediates(tmp_path) -> None:
    sim = tmp_path / "sim"
    subprocess.run([sys.executable, "-m", "streamer", "simulate", "--out", str(sim), "--timepoints", "1",
                    "--shape", "48,96,96", "--structure", "beads", "--seed", "2"], check=True, capture_output=True)
    raw = next(sim.glob("raw_*.tif"))
    out = tmp_path / "out" / "fused.tif"
    proc = subprocess.run(
        [sys.executable, "-m", "streamer", "reconstruct", str(raw), str(out), "--mode", "classical",
         "--iterations", "3", "--keep-intermediates", "--config", str(sim / "metadata.json"), "--device", "cpu"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    fused = tifffile.imread(out)
    assert fused.dtype == np.uint16 and fused.ndim == 3
    # the documented uint16 rule: the 99.99th percentile of the non-zero voxels at a quarter of the range
    level = np.percentile(fused[fused > 0], 99.99)
    assert 0.9 * 16384 < level < 1.1 * 16384
    for name in ("preprocessed", "view_a", "view_b"):
        assert (out.parent / f"fused.{name}.tif").is_file()
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["mode"] == "classical" and summary["shape"] == list(fused.shape)
    assert set(summary["timings_s"]) == {"preprocess", "lateral_sr", "split_views", "fuse"}
    assert summary["uint16_gain"] > 0


def test_reconstruct_command_rejects_a_2d_image(tmp_path) -> None:
    img = tmp_path / "plane.tif"
    tifffile.imwrite(img, np.zeros((32, 32), np.uint16))
    proc = subprocess.run([sys.executable, "-m", "streamer", "reconstruct", str(img), str(tmp_path / "o.tif"),
                           "--mode", "classical"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "expected one 3-D (z, y, x) stack" in proc.stderr and "Traceback" not in proc.stderr
