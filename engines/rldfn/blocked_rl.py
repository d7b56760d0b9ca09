"""Coverage-weighted joint Richardson–Lucy within a memory budget: whole when it fits, else block by block.

The whole-volume deconvolution of two views holds about 85 bytes per voxel of its mirror-padded volume live
(views, weights, estimate, OTFs and the FFT buffers of one update; one view: about 55), and the process's peak RSS
reaches up to 137 with what the allocator keeps of freed blocks; :func:`rl_bytes` budgets 120 (one view: 75),
~170–260 bytes per voxel of the views — 15 GB for the views of a 101×480×509 stack
after lateral SR. Where that exceeds the budget, the volume is cut into overlapping cubic blocks that each fit,
every block is deconvolved on the whole volume's terms (:class:`engines.rldfn.classical.VolumeTerms`: the views'
relative gain and the one-view ceiling's level do not change from block to block) and the blocks are blended
with the RL-DFN tiles' raised-cosine weights. Richardson–Lucy is local — a voxel depends on data within a few PSF
widths — so blocks overlapping by :func:`block_overlap` agree with the whole-volume result to well under a per
cent (``tests/test_blocked_rl.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from engines.rldfn.classical import (
    _pad_widths,
    clean_views,
    coverage_weights,
    volume_terms,
    weighted_rl,
)
from engines.rldfn.errors import MemoryBudgetError
from engines.rldfn.tiling import blend_weights_t, plan_tiles, round_up

#: Peak bytes of one weighted RL run per voxel of its padded volume: a fixed part plus one per view (two views
#: with weights: 120). Measured beyond the fixed overhead: live memory 81–86 B for two views, 50–62 B for one;
#: as the process's RSS peak, which also holds what the allocator keeps of freed blocks, 85–137 B for two views
#: (the same run, from run to run) — the budget must bound that.
BYTES_PER_PADDED_VOXEL = 30
BYTES_PER_PADDED_VOXEL_PER_VIEW = 45

#: Fixed part of that peak (allocator pools, FFT plans), bytes.
OVERHEAD_BYTES = 16 * 2**20


def rl_bytes(shape: Sequence[int], psfs: Sequence[np.ndarray]) -> int:
    """Estimated peak memory of :func:`engines.rldfn.classical.weighted_rl` of one view of ``shape`` per PSF."""
    padded = [n + lo + hi for n, (lo, hi) in zip(shape, _pad_widths(tuple(shape), psfs))]
    per_voxel = BYTES_PER_PADDED_VOXEL + BYTES_PER_PADDED_VOXEL_PER_VIEW * len(psfs)
    return int(per_voxel * math.prod(padded) + OVERHEAD_BYTES)


def block_overlap(psfs: Sequence[np.ndarray]) -> int:
    """Voxels neighbouring blocks share: twice the largest PSF's extent (the blend's outer quarter is discarded),
    at least 16, a multiple of 4."""
    extent = max(max(p.shape) for p in psfs)
    return round_up(max(16, 2 * extent))


def block_edge(shape: Sequence[int], psfs: Sequence[np.ndarray], budget_bytes: int, overlap: int) -> int:
    """Largest cubic block edge (multiple of 4) whose deconvolution fits ``budget_bytes``.

    Raises
    ------
    MemoryBudgetError
        Not even a block of twice the overlap fits.
    """
    edge = round_up(max(shape))
    while edge > 2 * overlap and rl_bytes([min(edge, n) for n in shape], psfs) > budget_bytes:
        edge -= 4
    if rl_bytes([min(edge, n) for n in shape], psfs) > budget_bytes:
        need = rl_bytes([min(2 * overlap + 4, n) for n in shape], psfs)
        raise MemoryBudgetError(
            f"the Richardson–Lucy estimate needs ≈{need / 2**20:.0f} MiB for its smallest block "
            f"({2 * overlap + 4} voxels, {overlap} of them shared with the neighbours); the memory budget is "
            f"{budget_bytes / 2**20:.0f} MiB; raise the budget")
    return edge


def joint_rl_within(view_a: torch.Tensor, view_b: torch.Tensor, psf_a: np.ndarray, psf_b: np.ndarray,
                    iterations: int, weights: Sequence[torch.Tensor] | str, budget_bytes: int | None,
                    progress: Callable[[int, int], None] | None = None, **options: Any) -> torch.Tensor:
    """:func:`engines.rldfn.classical.joint_rl` of two views within ``budget_bytes`` (:func:`rl_within`)."""
    return rl_within([view_a, view_b], [psf_a, psf_b], iterations, weights, budget_bytes, progress, **options)


def rl_within(views: Sequence[torch.Tensor], psfs: Sequence[np.ndarray], iterations: int,
              coverage: Sequence[torch.Tensor] | str | None, budget_bytes: int | None,
              progress: Callable[[int, int], None] | None = None, **options: Any) -> torch.Tensor:
    """:func:`engines.rldfn.classical.weighted_rl` of ``views`` with ``coverage`` (weights, ``"auto"`` or None),
    whole (the same numbers) when its estimated peak fits ``budget_bytes`` (or no budget is given), else in
    blended blocks that fit (``progress(done, total)`` then counts blocks, else iterations). ``options``: the
    one-view terms of :func:`~engines.rldfn.classical.weighted_rl` (``tv_one_view``, ``one_view_step``,
    ``one_view_ceiling``)."""
    shape = tuple(int(n) for n in views[0].shape)
    if budget_bytes is None or rl_bytes(shape, psfs) <= budget_bytes:
        cov = coverage if coverage is None or isinstance(coverage, str) else list(coverage)
        return weighted_rl(list(views), list(psfs), iterations, coverage=cov, progress=progress, **options)
    overlap = block_overlap(psfs)
    edge = block_edge(shape, psfs, budget_bytes, overlap)
    weights = coverage_weights(clean_views(views), coverage)
    terms = None if weights is None else volume_terms(views, weights)
    # plan on the volume rounded up to the tiling grid; blocks are then clipped to the volume itself
    grid = tuple(round_up(n) for n in shape)
    acc = torch.zeros(shape, dtype=torch.float32, device=views[0].device)
    wsum = torch.zeros_like(acc)
    blocks = plan_tiles(grid, edge, overlap)
    for k, t in enumerate(blocks):
        sl = tuple(slice(s, min(s + n, m)) for s, n, m in zip(t.start, t.size, shape))
        if any(x.stop <= x.start for x in sl):
            continue
        est = weighted_rl([v[sl] for v in views], list(psfs), iterations,
                          coverage=None if weights is None else [w[sl] for w in weights], terms=terms, **options)
        w = blend_weights_t(t, grid, overlap, acc.device)[tuple(slice(0, x.stop - x.start) for x in sl)]
        acc[sl] += w * est
        wsum[sl] += w
        del est
        if progress is not None:
            progress(k + 1, len(blocks))
    return acc / wsum
