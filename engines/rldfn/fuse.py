"""Fuse two whole views with RL-DFN, as one patch or tile by tile within a memory budget."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch

from engines.device import pick_device
from engines.rldfn.errors import MemoryBudgetError, VolumeShapeError
from engines.rldfn.model import RLDFN
from engines.rldfn.tiling import (
    blend_weights,
    check_budget,
    estimate_patch_bytes,
    plan_tiles,
    round_up,
    tile_for_budget,
)

TileSpec = Literal["none", "auto"] | int

# torch.OutOfMemoryError appeared in torch 2.5; the CUDA-specific class is the same object there and exists in 2.4
_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

#: Default overlap between tiles (voxels). The U-Net reaches ~±24 voxels and the RL step adds the PSF's
#: half-width; with 24 voxels of overlap tiled and untiled results agree to ~0.5 % NRMSE (docs/fusion.md).
DEFAULT_OVERLAP = 24


def check_views(view_a: np.ndarray, view_b: np.ndarray) -> None:
    """Raise :class:`VolumeShapeError` unless both views are 3-D, non-empty and of one shape."""
    for name, v in (("view A", view_a), ("view B", view_b)):
        if np.ndim(v) != 3:
            raise VolumeShapeError(f"{name} must be a 3-D stack (Z, Y, X), got shape {tuple(np.shape(v))}")
    if view_a.shape != view_b.shape:
        raise VolumeShapeError(
            f"view A is {'×'.join(map(str, view_a.shape))} and view B is {'×'.join(map(str, view_b.shape))} "
            "(Z×Y×X); the views must be registered onto one grid before fusion (step 3)"
        )
    if min(view_a.shape) < 1:
        raise VolumeShapeError(f"views are empty: {view_a.shape}")


def _normalise(v: np.ndarray, name: str) -> np.ndarray:
    v = np.nan_to_num(np.asarray(v, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    peak = float(v.max())
    if peak <= 0:
        raise VolumeShapeError(f"{name} has no positive voxel (max {peak:g}); nothing to fuse")
    return v / peak


def _batches(tiles: list, batch_size: int) -> list[list]:
    """Consecutive tiles of one size, at most ``batch_size`` per group (edge tiles may differ in size)."""
    groups: list[list] = []
    for t in tiles:
        if groups and len(groups[-1]) < batch_size and groups[-1][0].size == t.size:
            groups[-1].append(t)
        else:
            groups.append([t])
    return groups


def _pad_end(v: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    # zeros at the far end, like the reference's own Z padding: the padded voxels are cut off afterwards
    return np.pad(v, [(0, s - n) for s, n in zip(shape, v.shape)])


def fuse_rldfn(
    view_a: np.ndarray,
    view_b: np.ndarray,
    model: RLDFN,
    tile: TileSpec = "none",
    overlap: int = DEFAULT_OVERLAP,
    device: str | torch.device | None = None,
    memory_budget_bytes: int | None = None,
    normalize: bool = True,
    progress: Callable[[int, int], None] | None = None,
    batch_size: int = 1,
    registered: bool | None = None,
) -> np.ndarray:
    """Fuse two registered views with RL-DFN.

    Parameters
    ----------
    view_a, view_b
        The two views on one grid, (Z, Y, X), any real dtype.
    model
        :class:`~engines.rldfn.model.RLDFN` holding the network and both views' PSFs.
    tile
        ``"none"``: the whole volume is one patch (zero-padded at the far end of each axis to a multiple of 4,
        nothing else). An int: cubic tiles of that edge (multiple of 4), blended with cosine feathering over
        ``overlap`` voxels. ``"auto"``: the largest tile that fits ``memory_budget_bytes``.
    overlap
        Voxels shared by neighbouring tiles; rounded up to a multiple of 4 so that every tile keeps the whole
        volume's pooling grid.
    device
        Torch device (default: :func:`engines.device.pick_device`).
    memory_budget_bytes
        Upper bound for one patch's estimated peak memory; ``None`` disables the check (required for ``"auto"``).
    normalize
        Divide each whole view by its maximum first, as the reference's training data loader does (its
        reconstruction script divides each patch by the patch's maximum instead; per volume keeps all tiles on
        one scale and matches what the network was trained on).
    progress
        Called as ``progress(done, total)`` after each batch of tiles.
    batch_size
        Tiles of one size run together (``(N, 1, Z, Y, X)``): faster on a GPU, N times the memory; the budget
        check accounts for it. Results do not depend on it (each sample is transformed on its own).
    registered
        True: the RL step puts each PSF's centre at the FFT origin (no shift of the result against the views)
        and weights each view by its coverage (:mod:`engines.rldfn.coverage`); False: the reference's RL step,
        bit for bit, which moves the result by about one voxel per even-sized axis. Default: False for
        ``tile="none"`` (the reference's own math), True otherwise.

    Returns
    -------
    np.ndarray
        float32 fused volume of the views' shape.

    Raises
    ------
    VolumeShapeError
        Views of different shapes, not 3-D, or without signal; a bad tile size.
    MemoryBudgetError
        The whole volume (``tile="none"``) or one tile needs more memory than the budget, or the device ran
        out of memory on a patch.
    """
    check_views(view_a, view_b)
    if int(batch_size) < 1:
        raise VolumeShapeError(f"batch_size must be ≥ 1, got {batch_size}")
    if overlap < 0:
        raise VolumeShapeError(f"overlap must be ≥ 0 voxels, got {overlap}")
    overlap = round_up(overlap)
    shape = tuple(int(n) for n in view_a.shape)
    padded = tuple(round_up(n) for n in shape)
    width = int(getattr(model.net, "width", 64))
    if tile == "auto":
        if memory_budget_bytes is None:
            raise VolumeShapeError("tile='auto' needs a memory budget (memory_budget_bytes)")
        tile = tile_for_budget(padded, memory_budget_bytes // int(batch_size), overlap, width)
    if tile == "none":
        check_budget(padded, memory_budget_bytes, width, "the whole volume as one patch")
        tiles = plan_tiles(padded, max(padded), 0)
    elif isinstance(tile, (int, np.integer)) and not isinstance(tile, bool):
        if tile <= 0 or tile % 4:
            raise VolumeShapeError(f"tile size {tile} must be a positive multiple of 4 (the U-Net pools twice)")
        if overlap >= tile:
            raise VolumeShapeError(f"overlap {overlap} must be smaller than the tile size {tile}")
        check_budget(tuple(min(int(tile), n) for n in padded), None if memory_budget_bytes is None
                     else memory_budget_bytes // int(batch_size), width,
                     "one tile" if batch_size == 1 else f"one tile (of a batch of {batch_size})")
        tiles = plan_tiles(padded, int(tile), overlap)
    else:
        raise VolumeShapeError(f"tile must be 'none', 'auto' or a positive multiple of 4, got {tile!r}")

    a = _normalise(view_a, "view A") if normalize else np.asarray(view_a, np.float32)
    b = _normalise(view_b, "view B") if normalize else np.asarray(view_b, np.float32)
    a, b = _pad_end(a, padded), _pad_end(b, padded)
    dev = pick_device(str(device) if device is not None else None)
    model = model.to(dev).eval()
    registered = tile != "none" if registered is None else bool(registered)
    weights = None
    if registered:
        from engines.rldfn.coverage import blend_weight, coverage_mask

        weights = [blend_weight(coverage_mask(torch.from_numpy(v))).numpy() for v in (a, b)]
    was_registered = getattr(model, "registered", False)
    model.registered = registered
    try:
        return _run_tiles(a, b, model, tiles, padded, shape, overlap, width, dev, batch_size, weights, progress)
    finally:
        model.registered = was_registered


def _run_tiles(a: np.ndarray, b: np.ndarray, model: RLDFN, tiles: list, padded: tuple[int, ...],
               shape: tuple[int, ...], overlap: int, width: int, dev: torch.device, batch_size: int,
               weights: list[np.ndarray] | None, progress: Callable[[int, int], None] | None) -> np.ndarray:

    acc = np.zeros(padded, np.float32)
    wsum = np.zeros(padded, np.float32)
    done = 0
    with torch.inference_mode():
        for group in _batches(tiles, batch_size):
            ta = torch.from_numpy(np.stack([a[t.slices] for t in group])[:, None]).to(dev)
            tb = torch.from_numpy(np.stack([b[t.slices] for t in group])[:, None]).to(dev)
            tw = None if weights is None else tuple(
                torch.from_numpy(np.stack([w[t.slices] for t in group])[:, None]).to(dev) for w in weights)
            try:
                out = (model(ta, tb) if tw is None else model(ta, tb, tw))[:, 0].float().cpu().numpy()
            except (_OOM, RuntimeError) as err:
                # CUDA raises OutOfMemoryError; the CPU allocator a RuntimeError "can't allocate memory"
                if not isinstance(err, _OOM) and "allocate" not in str(err):
                    raise
                del ta, tb
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                size = group[0].size
                raise MemoryBudgetError(
                    f"{len(group)} × a {'×'.join(map(str, size))} patch did not fit in {dev.type.upper()} memory "
                    f"(estimated ≈{len(group) * estimate_patch_bytes(size, width) / 2**20:.0f} MiB); use a smaller "
                    "tile (tile=N or tile='auto' with a memory budget) or batch_size=1"
                ) from None
            out = np.nan_to_num(out, nan=0.0)  # the reference zeroes NaNs as well
            for t, o in zip(group, out):
                w = blend_weights(t, padded, overlap) if len(tiles) > 1 else np.ones(t.size, np.float32)
                acc[t.slices] += w * o
                wsum[t.slices] += w
            done += len(group)
            if progress is not None:
                progress(done, len(tiles))
    fused = acc / wsum
    return fused[: shape[0], : shape[1], : shape[2]]
