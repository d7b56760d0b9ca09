"""``rllsm lateral-sr`` as a real subprocess on tiny TIFFs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from engines.vsisr.checkpoint import load_checkpoint, save_checkpoint
from engines.vsisr.lateral import LateralSRParams, lateral_sr
from engines.vsisr.network import VSISR, VSISRConfig
from engines.vsisr.otf import load_otfs

REPO = Path(__file__).resolve().parents[1]


def rllsm(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", RLLSM_DEVICE="cpu")
    return subprocess.run(
        [sys.executable, "-m", "streamer", "lateral-sr", *args], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=180,
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("latsr")
    vol = (np.random.default_rng(0).random((9, 16, 20)) * 3000 + 100).astype(np.uint16)
    tifffile.imwrite(d / "in.tif", vol)
    torch.manual_seed(1)
    save_checkpoint(VSISR(), d / "ref.pth", layout="reference")
    save_checkpoint(VSISR(VSISRConfig(n_groups=1, n_blocks=2)), d / "tiny.pth", layout="rllsm")
    tifffile.imwrite(d / "flat.tif", vol[0])
    torch.save({"conv.weight": torch.zeros(2)}, d / "bad.pth")
    return d, vol


def test_writes_same_volume_as_the_function(files, shared_data, tmp_path):
    d, vol = files
    out = tmp_path / "out.tif"
    res = rllsm(str(d / "in.tif"), str(out), "--checkpoint", str(d / "ref.pth"),
                "--otf-dir", str(shared_data / "otf-meta-rlls-vsim"), "--wavelength", "488", "--batch-size", "2")
    assert res.returncode == 0, res.stderr
    assert "lateral-sr" in res.stderr  # progress bar
    got = tifffile.imread(out)
    assert got.shape == (3, 24, 30) and got.dtype == np.uint16
    want = lateral_sr(vol, load_checkpoint(d / "ref.pth"), load_otfs(shared_data / "otf-meta-rlls-vsim", 488),
                      LateralSRParams(), device="cpu")
    assert np.abs(got.astype(np.float64) / 65535 - want).max() < 2e-4


def test_synthetic_otf_float32_and_options(files, tmp_path):
    d, _ = files
    out = tmp_path / "o.tif"
    res = rllsm(str(d / "in.tif"), str(out), "--checkpoint", str(d / "tiny.pth"), "--synthetic-otf",
                "--float32", "--stride", "3", "--no-adjust-intensity", "--no-progress")
    assert res.returncode == 0, res.stderr
    got = tifffile.imread(out)
    assert got.dtype == np.float32 and got.shape == (3, 24, 30) and 0.0 <= got.min() and got.max() <= 1.0


@pytest.mark.parametrize(
    "case, expect",
    [
        ("flat", "3-D"),
        ("badckpt", "vars.0"),
        ("nootf", "OTF0.tif"),
    ],
)
def test_user_errors_are_clear(files, tmp_path, case, expect):
    d, _ = files
    empty = tmp_path / "otf"
    (empty / "488").mkdir(parents=True)
    args = {
        "flat": [str(d / "flat.tif"), "--checkpoint", str(d / "tiny.pth"), "--otf-dir", str(empty)],
        "badckpt": [str(d / "in.tif"), "--checkpoint", str(d / "bad.pth"), "--synthetic-otf"],
        "nootf": [str(d / "in.tif"), "--checkpoint", str(d / "tiny.pth"), "--otf-dir", str(empty)],
    }[case]
    res = rllsm(args[0], str(tmp_path / "o.tif"), *args[1:])
    assert res.returncode == 2, res.stderr
    assert expect in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "o.tif").exists()
