"""RL-DFN self-supervised training: real short runs on tiny simulated dual-view volumes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engines.rldfn.checkpoint import load_rldfn
from engines.training.common import TrainingError
from engines.training.fusion import FusionTrainConfig, oblique_section, train_fusion
from engines.training.synthetic_dual import make_dual_view
from streamer.cli import main

CFG = FusionTrainConfig(steps=10, patch=(12, 24, 24), width=4, disc_width=4, lr=1e-3, save_every=5)


@pytest.fixture(scope="module")
def dual() -> tuple:
    torch.set_num_threads(1)
    return make_dual_view("filaments", (20, 40, 40), np.random.default_rng(0))


def test_oblique_section_follows_the_plane() -> None:
    vol = torch.zeros(1, 1, 9, 5, 9)
    for i in range(9):
        vol[0, 0, i, :, i] = 1.0  # a bright plane along the 45° diagonal of XZ
    sec = oblique_section(vol, 45.0, np.random.default_rng(0))
    # unit steps along the diagonal: floor(8·√2) + 1 samples; random sub-voxel placement keeps it on the plane
    assert sec.shape == (1, 1, 12, 5) and float(sec.min()) > 0.4  # linear interpolation of a 1-voxel plane
    across = oblique_section(vol, 135.0, np.random.default_rng(0))
    assert float(across.mean()) * 4 < float(sec.mean())  # the perpendicular section crosses the plane once


def test_training_lowers_cycle_loss_and_resumes(dual: tuple, tmp_path: Path) -> None:
    a, b, _, psf_a, psf_b = dual
    res = train_fusion([(a, b)], psf_a, psf_b, CFG, tmp_path / "f")
    assert np.mean(res.cycle[-3:]) < np.mean(res.cycle[:3])
    net = load_rldfn(tmp_path / "f" / "rldfn.pt")
    assert net.width == 4
    assert load_rldfn(tmp_path / "f" / "reference").width == 4
    more = train_fusion([(a, b)], psf_a, psf_b, CFG.model_copy(update={"steps": 11}), tmp_path / "f")
    assert len(more.cycle) == 11 and more.cycle[:10] == res.cycle
    # any other change would mix two recipes in one model: refused
    with pytest.raises(TrainingError, match="different configuration"):
        train_fusion([(a, b)], psf_a, psf_b, CFG.model_copy(update={"steps": 12, "lr": 5e-4}), tmp_path / "f")


def test_rejects_volume_smaller_than_patch(dual: tuple) -> None:
    a, b, _, psf_a, psf_b = dual
    with pytest.raises(TrainingError, match="smaller than the training patch"):
        train_fusion([(a[:8], b[:8])], psf_a, psf_b, CFG)


def test_cli_train_fusion_synthetic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["train-fusion", "--synthetic", "--out", str(tmp_path / "o"), "--volumes", "1", "--size", "16,32,32",
               "--patch", "16,32,32", "--steps", "2", "--width", "4", "--disc-width", "4", "--no-progress",
               "--device", "cpu"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["steps"] == 2 and (tmp_path / "o" / "rldfn.pt").is_file()
    rc = main(["train-fusion", "--from-folder", str(tmp_path), "--out", str(tmp_path / "p")])
    assert rc == 2 and "--psf-a" in capsys.readouterr().err



def test_registered_cycle_loss_does_not_ask_for_darkness_where_a_view_has_no_data(dual: tuple) -> None:
    # view B empty for x ≥ 24: the coverage-weighted cycle loss prefers the true object there; the plain loss
    # prefers an object darkened where B saw nothing (it "explains" B's zeros)
    from engines.training.fusion import _coverage, _fft_blur, _weighted_l1

    a, b, obj, psf_a, psf_b = dual
    b = b.copy()
    b[:, :, 24:] = 0
    va, vb = (torch.from_numpy(v)[None, None] for v in (a, b))
    true = torch.from_numpy(obj)[None, None]
    dark = true.clone()
    dark[..., 28:] = 0
    blur = []
    for p in (psf_a, psf_b):
        t = torch.from_numpy(p / p.sum())
        blur.append((torch.fft.rfftn(t, s=[n + k - 1 for n, k in zip(a.shape, t.shape)]), tuple(t.shape)))

    def loss(fused: torch.Tensor, weighted: bool) -> float:
        fused = fused * (va.sum() / _fft_blur(true, *blur[0]).sum())  # on the views' scale
        wa, wb = (_coverage(va), _coverage(vb)) if weighted else (None, None)
        return float(_weighted_l1(_fft_blur(fused, *blur[0]), va, wa) + _weighted_l1(_fft_blur(fused, *blur[1]), vb, wb))

    assert loss(true, weighted=True) < loss(dark, weighted=True)
    assert loss(dark, weighted=False) < loss(true, weighted=False)

