"""The tile planner's memory estimate holds: peak memory of a real patch forward, measured in a fresh process."""

from __future__ import annotations

import sys

import pytest
from memory_probe import peak_growth  # beside this file

from engines.rldfn.tiling import (
    MemoryBudgetError,
    check_budget,
    estimate_patch_bytes,
    max_patch_voxels,
    tile_for_budget,
)

# Runs one RL-DFN patch forward in a fresh interpreter (after a tiny warm-up forward that loads the libraries and
# their pools) and reports how much the peak RSS grew during it: what the estimate claims to bound.
_PROBE = r"""
import json, os, sys
import numpy as np, torch
torch.set_num_threads(2)
from engines.rldfn.model import RLDFN
from engines.rldfn.network import DualViewFusionNet
z, y, x, w = (int(v) for v in sys.argv[1:5])
torch.manual_seed(0)
psf = np.ones((7, 7, 7), np.float32)
model = RLDFN(DualViewFusionNet(width=w).eval(), psf, psf).eval()
a, b = torch.rand(1, 1, z, y, x), torch.rand(1, 1, z, y, x)
with torch.inference_mode():
    model(a[..., :8, :8, :8].contiguous(), b[..., :8, :8, :8].contiguous())
page = os.sysconf("SC_PAGE_SIZE")
current = int(open("/proc/self/statm").read().split()[1]) * page
# ru_maxrss cannot be used: exec keeps the parent's high-water mark, so a big test process inflated it. Reset this
# process's own peak (VmHWM) instead and read it back after the forward.
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
with torch.inference_mode():
    out = model(a, b)
status = open("/proc/self/status").read()
peak = int(next(l for l in status.splitlines() if l.startswith("VmHWM:")).split()[1]) * 1024
print(json.dumps({"growth": peak - current}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm (Linux)")
def test_patch_peak_memory_is_within_1_3x_of_the_estimate() -> None:
    shape, width = (32, 64, 64), 32
    estimate = estimate_patch_bytes(shape, width)
    growth = peak_growth(_PROBE, *shape, width)
    live = peak_growth(_PROBE, *shape, width, steady=True)
    print(f"patch {shape} width {width}: peak grew {growth / 2**20:.0f} MiB ({live / 2**20:.0f} MiB live), "
          f"estimate {estimate / 2**20:.0f} MiB")
    assert growth <= 1.3 * estimate  # the estimate bounds what a tile really takes …
    assert estimate <= 1.6 * live  # … without wasting the budget (the allocator's slack reaches ~1.35× live)


def test_patch_size_is_capped_below_the_convolution_index_limit() -> None:
    # 101×480×509 views (padded 104×480×512) crashed oneDNN inside a 3-D convolution as one patch
    big = (104, 480, 512)
    assert big[0] * big[1] * big[2] > max_patch_voxels(64)
    with pytest.raises(MemoryBudgetError, match="tiles"):
        check_budget(big, None, 64, "the whole volume as one patch")
    edge = tile_for_budget(big, 1 << 50, overlap=24, width=64)  # any budget: the cap still applies
    patch = [min(edge, n) for n in big]
    assert patch[0] * patch[1] * patch[2] <= max_patch_voxels(64)
