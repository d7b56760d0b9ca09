"""Tiling a volume into overlapping patches and blending the results back, as pure code.

A patch's borders are its weakest voxels: the Richardson–Lucy step convolves circularly (the PSF wraps
around the patch) and the U-Net sees zero padding there. The reference cuts its volume into patches with an
8-voxel margin and butts the trimmed patches together, which leaves visible seams. Here neighbouring tiles
overlap by ``overlap`` voxels and are blended with raised-cosine weights that fall towards each tile's inner
borders (never at the volume's own border), so a voxel is dominated by the tile in which it lies deepest.

Tile starts are multiples of 4: the U-Net pools twice, and a tile shifted by a voxel would see another
pooling grid than the whole volume and give different numbers everywhere, not just at its borders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from engines.rldfn.errors import MemoryBudgetError, VolumeShapeError
from engines.rldfn.network import REFERENCE_WIDTH, SIZE_MULTIPLE


@dataclass(frozen=True)
class Tile:
    """One patch: ``start`` and ``size`` per axis (Z, Y, X) in the (padded) volume."""

    start: tuple[int, int, int]
    size: tuple[int, int, int]

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(s, s + n) for s, n in zip(self.start, self.size))  # type: ignore[return-value]


def round_up(n: int, multiple: int = SIZE_MULTIPLE) -> int:
    """Smallest multiple of ``multiple`` that is ≥ ``n``."""
    return -(-int(n) // multiple) * multiple


def _axis_starts(length: int, size: int, overlap: int) -> list[int]:
    if size >= length:
        return [0]
    step = size - overlap
    starts = list(range(0, length - size, step))
    starts.append(length - size)  # last tile flush with the end; it may overlap its neighbour by more
    return sorted(set(starts))


def plan_tiles(shape: tuple[int, int, int], tile: int, overlap: int) -> list[Tile]:
    """Cover a volume of ``shape`` (already a multiple of 4 per axis) with tiles of edge ``tile``.

    Parameters
    ----------
    shape
        (Z, Y, X) of the padded volume; each a multiple of :data:`~engines.rldfn.network.SIZE_MULTIPLE`.
    tile
        Tile edge in voxels (a multiple of 4); along an axis shorter than ``tile`` the tile spans the axis.
    overlap
        Voxels shared by neighbouring tiles; must leave a positive step (``overlap < tile``).

    Returns
    -------
    list[Tile]
        Tiles in Z-major order; every voxel is covered at least once.
    """
    if any(n % SIZE_MULTIPLE for n in shape):
        raise VolumeShapeError(f"volume {shape} must be padded to multiples of {SIZE_MULTIPLE} before tiling")
    if tile % SIZE_MULTIPLE or tile <= 0:
        raise VolumeShapeError(f"tile size {tile} must be a positive multiple of {SIZE_MULTIPLE}")
    if not 0 <= overlap < tile or overlap % SIZE_MULTIPLE:
        raise VolumeShapeError(
            f"overlap {overlap} must be a multiple of {SIZE_MULTIPLE}, ≥ 0 and smaller than the tile size {tile}"
        )
    sizes = [min(tile, n) for n in shape]
    per_axis = [_axis_starts(n, s, overlap) for n, s in zip(shape, sizes)]
    return [
        Tile((z, y, x), (sizes[0], sizes[1], sizes[2]))
        for z in per_axis[0] for y in per_axis[1] for x in per_axis[2]
    ]


def _ramp(n: int, overlap: int, rise: bool, fall: bool) -> np.ndarray:
    w = np.ones(n, np.float32)
    m = min(overlap, n // 2)
    if m > 0:
        # The outer quarter of the overlap gets (almost) no weight: there the circular RL convolution wraps
        # and the U-Net sees its zero padding, and errors are tens of per cent. A raised cosine then hands
        # over to the neighbour. Weights stay strictly positive so that no voxel ever divides by zero.
        dead = m // 4
        r = np.full(m, 1e-6, np.float32)
        k = m - dead
        r[dead:] = 0.5 - 0.5 * np.cos(np.pi * (np.arange(k) + 0.5) / k)
        if rise:
            w[:m] = r
        if fall:
            w[n - m:] = r[::-1]
    return w


def _ramps(t: Tile, shape: tuple[int, int, int], overlap: int) -> list[np.ndarray]:
    return [_ramp(t.size[ax], overlap, rise=t.start[ax] > 0, fall=t.start[ax] + t.size[ax] < shape[ax])
            for ax in range(3)]


def blend_weights(t: Tile, shape: tuple[int, int, int], overlap: int) -> np.ndarray:
    """Separable blending weights for ``t``: cosine ramps on inner borders, 1 at the volume's border."""
    r = _ramps(t, shape, overlap)
    return r[0][:, None, None] * r[1][None, :, None] * r[2][None, None, :]


def blend_weights_t(t: Tile, shape: tuple[int, int, int], overlap: int, device: torch.device | str) -> torch.Tensor:
    """:func:`blend_weights` as a tensor built on ``device``: only the three 1-D ramps (a tile edge each) are
    moved there, and their float32 product is the same, bit for bit."""
    r = [torch.from_numpy(v).to(device) for v in _ramps(t, shape, overlap)]
    return r[0][:, None, None] * r[1][None, :, None] * r[2][None, None, :]


#: Fixed part of a patch forward's memory (allocator pools, oneDNN/cuDNN workspaces), bytes.
PATCH_OVERHEAD_BYTES = 16 * 2**20

#: Hidden channels of the feature nets: fixed at 64 whatever the U-Net's width (the reference's choice).
FEATURE_HIDDEN = 64

#: Largest number of elements one activation tensor of a patch may hold. Convolution libraries index with
#: 32-bit integers and lay channels out in padded blocks; a tensor near 2³¹ elements crashes oneDNN on the CPU
#: (SIGSEGV, seen on 101×480×509 views) and exceeds cuDNN's limits on the GPU. The margin of 2 covers the
#: blocked layouts.
MAX_TENSOR_ELEMENTS = 2**31 // 2


def _bytes_per_voxel(width: int) -> int:
    # float32 channels alive at the peak, which is one of two stages: the feature nets (their 64-channel hidden
    # maps and the RL step's FFT buffers, ~4.5·64) or the U-Net's full-resolution level (skip, up-sampled,
    # their concatenation, conv outputs and the two gated feature maps, ~9.5·width + 2·64)
    return int(4 * max(4.5 * FEATURE_HIDDEN, 9.5 * width + 2 * FEATURE_HIDDEN))


def max_patch_voxels(width: int = REFERENCE_WIDTH) -> int:
    """Most voxels one patch may hold so that no activation (2·``width`` or 64 channels) reaches the
    convolution libraries' 32-bit limits (:data:`MAX_TENSOR_ELEMENTS`) — on the CPU as on the GPU."""
    return MAX_TENSOR_ELEMENTS // max(2 * int(width), FEATURE_HIDDEN)


def estimate_patch_bytes(shape: tuple[int, int, int], width: int = REFERENCE_WIDTH) -> int:
    """Peak memory (bytes) of one RL-DFN patch forward without gradients, weights excluded.

    The peak is reached in one of two stages: the two feature nets (their hidden maps are 64 channels whatever
    the width, plus the RL step's FFT buffers: ~4.5 × 64 float32 channels per voxel) or the U-Net's
    full-resolution level (skip tensor, up-sampled tensor, their concatenation, conv outputs and the gated
    features: ~9.5·``width`` + 128 channels); the estimate is the larger, plus a fixed :data:`PATCH_OVERHEAD_BYTES`.
    Calibrated on the CPU (torch 2.13, growth of peak RSS during one forward in a fresh process after a warm-up):
    widths 4–64, patches 16×32×32 to 64×128×128, measured 0.85–1.0× this estimate (e.g. width 16, 64×128×128:
    1178 MiB measured, 1168 MiB estimated; width 32, 32×64×64: 193–204 MiB vs 232 MiB);
    ``tests/test_rldfn_memory.py`` measures it in a subprocess.
    """
    return int(np.prod(shape)) * _bytes_per_voxel(width) + PATCH_OVERHEAD_BYTES


def tile_for_budget(shape: tuple[int, int, int], budget_bytes: int, overlap: int, width: int = REFERENCE_WIDTH) -> int:
    """Largest tile edge (multiple of 4) whose patch fits ``budget_bytes`` and :func:`max_patch_voxels`.

    Raises
    ------
    MemoryBudgetError
        When not even the smallest useful tile (``overlap`` plus 4 voxels of content per side) fits.
    """
    smallest = round_up(2 * overlap + SIZE_MULTIPLE)
    edge = round_up(max(shape))
    cap = max_patch_voxels(width)
    while edge >= smallest:
        patch = tuple(min(edge, n) for n in shape)
        if estimate_patch_bytes(patch, width) <= budget_bytes and int(np.prod(patch)) <= cap:  # type: ignore[arg-type]
            return edge
        edge -= SIZE_MULTIPLE
    need = estimate_patch_bytes(tuple(min(smallest, n) for n in shape), width)  # type: ignore[arg-type]
    raise MemoryBudgetError(
        f"not even one {smallest}³-voxel tile (overlap {overlap} on each side plus {SIZE_MULTIPLE} voxels) fits "
        f"the memory budget: it needs ≈{need / 2**20:.0f} MiB, the budget is {budget_bytes / 2**20:.0f} MiB; "
        "raise the budget or lower the overlap"
    )


def check_budget(patch: tuple[int, int, int], budget_bytes: int | None, width: int, what: str) -> None:
    """Raise :class:`MemoryBudgetError` when one ``patch`` would exceed ``budget_bytes`` (None: no limit)."""
    n = int(np.prod(patch))
    if n > max_patch_voxels(width):
        raise MemoryBudgetError(
            f"{what} of {'×'.join(map(str, patch))} voxels is larger than one convolution can take "
            f"({max_patch_voxels(width)} voxels at width {width}: activations would reach the 32-bit index limit "
            "of the convolution libraries); use tiles (tile='auto' or a size)"
        )
    if budget_bytes is None:
        return
    need = estimate_patch_bytes(patch, width)
    if need > budget_bytes:
        raise MemoryBudgetError(
            f"{what} of {'×'.join(map(str, patch))} voxels needs ≈{need / 2**20:.0f} MiB, more than the memory "
            f"budget of {budget_bytes / 2**20:.0f} MiB; use a smaller tile (largest that fits: "
            f"{_largest_cube(budget_bytes, width)} voxels per side) or raise the budget"
        )


def _largest_cube(budget_bytes: int, width: int) -> int:
    edge = int(math.floor((max(budget_bytes - PATCH_OVERHEAD_BYTES, 0) / _bytes_per_voxel(width)) ** (1 / 3)))
    return max(0, edge - edge % SIZE_MULTIPLE)
