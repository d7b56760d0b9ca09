"""Joint Richardson–Lucy within a memory budget: blocks agree with the whole volume, and the budget holds."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from memory_probe import peak_growth  # beside this file

from engines.rldfn.blocked_rl import (
    block_edge,
    block_overlap,
    joint_rl_within,
    rl_bytes,
    rl_within,
)
from engines.rldfn.classical import weighted_rl
from engines.rldfn.coverage import blend_weight, coverage_mask
from engines.rldfn.errors import MemoryBudgetError
from engines.training.synthetic_dual import make_dual_view

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def scene():
    va, vb, _, pa, pb = make_dual_view("filaments", (48, 96, 112), np.random.default_rng(2), psf_size=11)
    a, b = torch.from_numpy(va), torch.from_numpy(vb)
    b[:, :, 80:] = 0  # view B has no data there: a one-view region, as at an rLLSM view's edge
    weights = [blend_weight(coverage_mask(v)) for v in (a, b)]
    return a, b, (pa, pb), weights


def test_no_budget_or_enough_is_the_whole_volume_bit_for_bit(scene) -> None:
    a, b, psfs, w = scene
    whole = weighted_rl([a, b], list(psfs), 8, coverage=w)
    assert torch.equal(joint_rl_within(a, b, *psfs, 8, w, None), whole)
    assert torch.equal(joint_rl_within(a, b, *psfs, 8, w, rl_bytes(a.shape, psfs)), whole)


def test_blocks_agree_with_the_whole_volume(scene) -> None:
    a, b, psfs, w = scene
    budget = rl_bytes((48, 56, 56), psfs)
    edge = block_edge(a.shape, psfs, budget, block_overlap(psfs))
    assert edge < max(a.shape)  # it really runs in blocks (several along y and x)
    whole = weighted_rl([a, b], list(psfs), 30, coverage=w)
    calls = []
    blocked = joint_rl_within(a, b, *psfs, 30, w, budget, progress=lambda d, t: calls.append((d, t)))
    assert len(calls) >= 4 and calls[-1][0] == calls[-1][1]
    nrmse = float(torch.sqrt(torch.mean((blocked - whole) ** 2)) / (whole.max() - whole.min()))
    print(f"blocks of {edge} voxels vs whole: NRMSE {nrmse:.2e}")
    assert nrmse < 1e-3, nrmse
    # the one-view region and its ceiling are the whole volume's too (its level is measured once)
    assert float(blocked[:, :, 88:].max()) <= 1.01 * float(whole[:, :, 88:].max())


def test_one_view_in_blocks_agrees_with_the_whole_volume(scene) -> None:
    # single-view LLSM: one deskewed volume, one PSF
    a, _, psfs, _ = scene
    whole = rl_within([a], [psfs[0]], 30, "auto", None)
    budget = rl_bytes((48, 56, 56), psfs[:1])
    blocked = rl_within([a], [psfs[0]], 30, "auto", budget)
    nrmse = float(torch.sqrt(torch.mean((blocked - whole) ** 2)) / (whole.max() - whole.min()))
    assert nrmse < 1e-3, nrmse


def test_a_budget_too_small_for_any_block_is_refused_with_what_it_needs(scene) -> None:
    a, b, psfs, w = scene
    with pytest.raises(MemoryBudgetError, match="raise the budget"):
        joint_rl_within(a, b, *psfs, 2, w, 2**20)


# Runs joint_rl_within in a fresh interpreter on random views of a realistic size and reports how much the peak
# RSS grew during it (after a warm-up that loads the FFT libraries): what rl_bytes claims to bound.
_PROBE = r"""
import json, os, sys
import numpy as np, torch
torch.set_num_threads(2)
from engines.rldfn.blocked_rl import rl_within
from engines.rldfn.coverage import blend_weight, coverage_mask
from engines.training.synthetic_dual import make_dual_view
z, y, x, budget, n = (int(v) for v in sys.argv[1:6])
rng = np.random.default_rng(0)
_, _, _, pa, pb = make_dual_view("puncta", (16, 16, 16), rng, psf_size=15)
a = torch.from_numpy(rng.random((z, y, x), dtype=np.float32))
b = torch.from_numpy(rng.random((z, y, x), dtype=np.float32))
b[:, :, : x // 3] = 0
views, psfs = [a, b][:n], [pa, pb][:n]
w = [blend_weight(coverage_mask(v)) for v in views]
rl_within([v[:16, :16, :16] for v in views], psfs, 1, [v[:16, :16, :16] for v in w], None)
page = os.sysconf("SC_PAGE_SIZE")
current = int(open("/proc/self/statm").read().split()[1]) * page
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
rl_within(views, psfs, 2, w, budget if budget > 0 else None)
status = open("/proc/self/status").read()
peak = int(next(l for l in status.splitlines() if l.startswith("VmHWM:")).split()[1]) * 1024
print(json.dumps({"growth": peak - current}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self (Linux)")
@pytest.mark.parametrize("views", [2, 1])
def test_peak_memory_holds_to_the_estimate_whole_and_in_blocks(views: int) -> None:
    # views of a 64×128×128 raw stack after lateral SR are 90×192×214 (≈ 550 MiB whole for two)
    shape = (90, 192, 214)
    psf = make_dual_view("puncta", (16, 16, 16), np.random.default_rng(0), psf_size=15)[3]
    estimate = rl_bytes(shape, [psf] * views)
    growth = peak_growth(_PROBE, *shape, 0, views)
    live = peak_growth(_PROBE, *shape, 0, views, steady=True)
    print(f"{views} view(s) whole {shape}: peak grew {growth / 2**20:.0f} MiB ({live / 2**20:.0f} MiB live), "
          f"estimate {estimate / 2**20:.0f} MiB")
    assert growth <= 1.3 * estimate and estimate <= 1.6 * live
    budget = estimate // 4
    growth = peak_growth(_PROBE, *shape, budget, views)
    print(f"in blocks, budget {budget / 2**20:.0f} MiB: peak grew {growth / 2**20:.0f} MiB")
    # the whole volume's own buffers (views, weights, the blend's two accumulators) come on top of the blocks
    assert growth <= 1.3 * budget + 4 * 4 * np.prod(shape), growth


def test_fuse_cli_classical_runs_in_blocks_within_its_budget(tmp_path) -> None:
    import os

    import tifffile

    from engines.rldfn.classical import classical_fuse

    va, vb, _, pa, pb = make_dual_view("filaments", (40, 96, 128), np.random.default_rng(4), psf_size=11)
    vb[:, :, 100:] = 0
    paths = {}
    for name, arr in (("a", va), ("b", vb), ("pa", pa), ("pb", pb)):
        paths[name] = str(tmp_path / f"{name}.tif")
        tifffile.imwrite(paths[name], arr)
    assert rl_bytes(va.shape, [pa, pb]) > 60 * 2**20  # the whole volume does not fit 60 MiB: blocks do

    def fuse(budget: str, out: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RLLSM_DEVICE": "cpu"}
        return subprocess.run([sys.executable, "-m", "streamer", "fuse", paths["a"], paths["b"], out, "--mode",
                               "classical", "--psf-a", paths["pa"], "--psf-b", paths["pb"], "--iterations", "10",
                               "--memory-budget", budget, "--no-progress"], env=env, capture_output=True, text=True,
                              timeout=240, check=False)

    r = fuse("60", str(tmp_path / "fused.tif"))
    assert r.returncode == 0, r.stderr
    got = tifffile.imread(tmp_path / "fused.tif")
    want = classical_fuse(va, vb, pa, pb, iterations=10)  # the whole volume at once
    nrmse = float(np.sqrt(np.mean((got - want) ** 2)) / (want.max() - want.min()))
    assert nrmse < 1e-3, nrmse
    r = fuse("8", str(tmp_path / "small.tif"))
    assert r.returncode == 2 and "raise the budget" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "small.tif").exists()
