"""``rllsm fuse`` end to end in a subprocess, on tiny TIFFs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from engines.rldfn.checkpoint import save_rldfn
from engines.rldfn.classical import classical_fuse
from engines.rldfn.fuse import fuse_rldfn
from engines.rldfn.model import RLDFN
from engines.rldfn.network import DualViewFusionNet

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "fixtures" / "rldfn"))
from seeded_weights import seed_module  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _rllsm(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RLLSM_DEVICE": "cpu"}
    return subprocess.run([sys.executable, "-m", "streamer", "fuse", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuse")
    rng = np.random.default_rng(3)
    a = (rng.random((12, 20, 24)) * 100).astype(np.uint16)
    b = (rng.random((12, 20, 24)) * 100).astype(np.uint16)
    z, y, x = np.meshgrid(*[np.arange(-3, 4)] * 3, indexing="ij")
    pa = np.exp(-((z - 0.5 * x) ** 2) / 6 - (x**2 + y**2) / 2).astype(np.float32)
    pb = np.exp(-((z + 0.5 * x) ** 2) / 6 - (x**2 + y**2) / 2).astype(np.float32)
    paths = {}
    for name, arr in (("a", a), ("b", b), ("pa", pa), ("pb", pb)):
        paths[name] = d / f"{name}.tif"
        tifffile.imwrite(paths[name], arr)
    net = DualViewFusionNet(width=4)
    for fname, part in (("net_FA.pth", "feature_a"), ("net_FB.pth", "feature_b"), ("net_G.pth", "unet")):
        seed_module(getattr(net, part), 11, fname)
    paths["model"] = save_rldfn(net.eval(), d / "tiny.pt")
    paths["dir"] = d
    return paths


def test_classical_cli_writes_what_the_function_computes(files):
    out = files["dir"] / "classical.tif"
    r = _rllsm(str(files["a"]), str(files["b"]), str(out), "--mode", "classical", "--psf-a", str(files["pa"]),
               "--psf-b", str(files["pb"]), "--iterations", "3", "--no-progress")
    assert r.returncode == 0, r.stderr
    got = tifffile.imread(out)
    want = classical_fuse(*(tifffile.imread(files[k]) for k in ("a", "b", "pa", "pb")), iterations=3)
    assert got.dtype == np.float32 and got.shape == (12, 20, 24)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_rldfn_cli_tiled(files):
    out = files["dir"] / "rldfn.tif"
    r = _rllsm(str(files["a"]), str(files["b"]), str(out), "--model", str(files["model"]), "--psf-a",
               str(files["pa"]), "--psf-b", str(files["pb"]), "--tile", "16", "--overlap", "8", "--batch", "2")
    assert r.returncode == 0, r.stderr
    from engines.rldfn.checkpoint import load_rldfn

    model = RLDFN(load_rldfn(files["model"]), tifffile.imread(files["pa"]), tifffile.imread(files["pb"]))
    torch.set_num_threads(1)
    want = fuse_rldfn(tifffile.imread(files["a"]), tifffile.imread(files["b"]), model, tile=16, overlap=8)
    np.testing.assert_allclose(tifffile.imread(out), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--mode", "rldfn"], "needs --model"),
        (["--model", "MISSING"], "RL-DFN weights not found"),
        (["--model", "MODEL", "--tile", "30"], "multiple of 4"),
        (["--model", "MODEL", "--memory-budget", "0.01"], "memory budget"),
        (["--mode", "classical", "--tile", "16"], "apply to --mode rldfn only"),
    ],
)
def test_cli_errors_are_clear(files, extra, message, capsys):
    """In-process (same parser and command code as the subprocess runs, without five interpreter starts)."""
    from streamer.cli import main

    extra = [str(files["model"]) if e == "MODEL" else str(files["dir"] / "nope") if e == "MISSING" else e
             for e in extra]
    argv = ["fuse", str(files["a"]), str(files["b"]), str(files["dir"] / "x.tif"), "--psf-a", str(files["pa"]),
            "--psf-b", str(files["pb"]), "--no-progress", *extra]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse rejects bad option values itself
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not (files["dir"] / "x.tif").exists()


def test_cli_shape_mismatch(files, tmp_path, capsys):
    from streamer.cli import main

    odd = tmp_path / "odd.tif"
    tifffile.imwrite(odd, np.random.default_rng(0).integers(1, 100, (12, 20, 20), dtype=np.uint16))
    code = main(["fuse", str(files["a"]), str(odd), str(tmp_path / "x.tif"), "--mode", "classical", "--psf-a",
                 str(files["pa"]), "--psf-b", str(files["pb"]), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "registered onto one grid" in err and "12×20×24" in err and "12×20×20" in err


def test_cli_single_psf_is_rotated_into_both_views(files, tmp_path, capsys):
    from engines.rldfn.psf import clean_psf, dual_view_psfs
    from streamer.cli import main

    out = tmp_path / "one_psf.tif"
    code = main(["fuse", str(files["a"]), str(files["b"]), str(out), "--mode", "classical", "--psf", str(files["pa"]),
                 "--angle", "25", "--psf-voxel", "0.2", "0.1", "0.1", "--view-voxel", "0.1", "0.1", "0.1",
                 "--iterations", "2", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    pa, pb = dual_view_psfs(clean_psf(tifffile.imread(files["pa"])), 25.0, (0.2, 0.1, 0.1), (0.1, 0.1, 0.1))
    want = classical_fuse(tifffile.imread(files["a"]), tifffile.imread(files["b"]), pa, pb, iterations=2)
    np.testing.assert_allclose(tifffile.imread(out), want, rtol=1e-5, atol=1e-5)
    for extra, message in ((["--psf-a", str(files["pa"])], "give both --psf-a and --psf-b"),
                           (["--psf", str(files["pa"]), "--psf-a", str(files["pa"])], "not both"),
                           ([], "record no voxel size"),
                           (["--view-voxel", "0.1", "0.1", "0.1"], "already exists")):
        assert main(["fuse", str(files["a"]), str(files["b"]), str(out), "--mode", "classical", *extra]) == 2
        assert message in capsys.readouterr().err
