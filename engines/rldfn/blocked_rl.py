"""Coverage-weighted joint Richardson–Lucy within a memory budget: whole when it fits, else block by block.

The whole-volume deconvolution holds about :data:`BYTES_PER_PADDED_VOXEL` bytes per voxel of its mirror-padded
volume (views, weights, estimate, OTFs and the FFT buffers of one update; measured 85–108 B on volumes of
0.4–5.8 M padded voxels, CPU), ~145–220 bytes per voxel of the views — 12 GB for the views of a 101×480×509 stack
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

from engines.rldfn.classical import _pad_widths, volume_terms, weighted_rl
from engines.rldfn.errors import MemoryBudgetError
from engines.rldfn.tiling import blend_weights_t, plan_tiles, round_up

#: Peak bytes of one weighted RL run per voxel of its padded volume (two views with weights; see the module).
BYTES_PER_PADDED_VOXEL = 100

#: Fixed part of that peak (allocator pools, FFT plans), bytes.
OVERHEAD_BYTES = 16 * 2**20


def rl_bytes(shape: Sequence[int], psfs: Sequence[np.ndarray]) -> int:
    """Estimated peak memory of :func:`engines.rldfn.classical.weighted_rl` of two views of ``shape``."""
    padded = [n + lo + hi for n, (lo, hi) in zip(shape, _pad_widths(tuple(shape), psfs))]
    return int(BYTES_PER_PADDED_VOXEL * math.prod(padded) + OVERHEAD_BYTES)


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
    """:func:`engines.rldfn.classical.joint_rl` of two views with coverage ``weights`` (``"auto"``: found from the
    views), whole (the same numbers) when its estimated peak fits ``budget_bytes`` (or no budget is given), else in
    blended blocks that fit (``progress(done, total)`` then counts blocks, else iterations). ``options``: the
    one-view terms of :func:`~engines.rldfn.classical.weighted_rl` (``tv_one_view``, ``one_view_step``,
    ``one_view_ceiling``)."""
    psfs = [psf_a, psf_b]
    shape = tuple(int(n) for n in view_a.shape)
    if budget_bytes is None or rl_bytes(shape, psfs) <= budget_bytes:
        cov = weights if isinstance(weights, str) else list(weights)
        return weighted_rl([view_a, view_b], psfs, iterations, coverage=cov, progress=progress, **options)
    if isinstance(weights, str):
        from engines.rldfn.coverage import blend_weight, coverage_mask

        weights = [blend_weight(coverage_mask(torch.clamp(torch.nan_to_num(v.float(), nan=0.0, posinf=0.0, neginf=0.0), min=0)))
                   for v in (view_a, view_b)]
    overlap = block_overlap(psfs)
    edge = block_edge(shape, psfs, budget_bytes, overlap)
    terms = volume_terms([view_a, view_b], weights)
    # plan on the volume rounded up to the tiling grid; blocks are then clipped to the volume itself
    grid = tuple(round_up(n) for n in shape)
    acc = torch.zeros(shape, dtype=torch.float32, device=view_a.device)
    wsum = torch.zeros_like(acc)
    blocks = plan_tiles(grid, edge, overlap)
    for k, t in enumerate(blocks):
        sl = tuple(slice(s, min(s + n, m)) for s, n, m in zip(t.start, t.size, shape))
        if any(x.stop <= x.start for x in sl):
            continue
        est = weighted_rl([view_a[sl], view_b[sl]], psfs, iterations, coverage=[w[sl] for w in weights],
                          terms=terms, **options)
        w = blend_weights_t(t, grid, overlap, acc.device)[tuple(slice(0, x.stop - x.start) for x in sl)]
        acc[sl] += w * est
        wsum[sl] += w
        del est
        if progress is not None:
            progress(k + 1, len(blocks))
    return acc / wsum
