"""Fuse two whole views with RL-DFN, as one patch or tile by tile within a memory budget."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch

from engines.device import pick_device, probe_to_host, to_device, to_host
from engines.rldfn.coverage import blend_weight, coverage_mask
from engines.rldfn.errors import MemoryBudgetError, VolumeShapeError
from engines.rldfn.model import RLDFN
from engines.rldfn.tiling import (
    blend_weights_t,
    check_budget,
    estimate_patch_bytes,
    plan_tiles,
    round_up,
    tile_for_budget,
)

log = logging.getLogger(__name__)

TileSpec = Literal["none", "auto"] | int

# torch.OutOfMemoryError appeared in torch 2.5; the CUDA-specific class is the same object there and exists in 2.4
_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

#: Default overlap between tiles (voxels). The U-Net reaches ~±24 voxels and the RL step adds the PSF's
#: half-width; with 24 voxels of overlap tiled and untiled results agree to ~0.5 % NRMSE (docs/fusion.md).
DEFAULT_OVERLAP = 24


def _shape(v: object) -> tuple[int, ...]:
    # a CUDA tensor has no __array__: read its shape without np.shape, which would copy it to the host
    return tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(np.shape(v))


def check_views(view_a: np.ndarray | torch.Tensor, view_b: np.ndarray | torch.Tensor) -> None:
    """Raise :class:`VolumeShapeError` unless both views are 3-D, non-empty and of one shape."""
    for name, v in (("view A", view_a), ("view B", view_b)):
        if len(_shape(v)) != 3:
            raise VolumeShapeError(f"{name} must be a 3-D stack (Z, Y, X), got shape {_shape(v)}")
    sa, sb = _shape(view_a), _shape(view_b)
    if sa != sb:
        raise VolumeShapeError(
            f"view A is {'×'.join(map(str, sa))} and view B is {'×'.join(map(str, sb))} "
            "(Z×Y×X); the views must be registered onto one grid before fusion (step 3)"
        )
    if min(sa) < 1:
        raise VolumeShapeError(f"views are empty: {sa}")


def _as_float(v: np.ndarray | torch.Tensor, dev: torch.device) -> torch.Tensor:
    """A view as float32 on ``dev``: a tensor there stays there; a host array is moved once (counted)."""
    if isinstance(v, torch.Tensor):
        return to_device(v, dev).float()
    # numpy converts first (uint16 and friends), as before; on the CPU the tensor shares the array's memory
    return to_device(np.asarray(v, dtype=np.float32), dev)


def _normalise(v: torch.Tensor, name: str) -> torch.Tensor:
    v = torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)
    peak = v.max()
    if float(probe_to_host(peak)) <= 0:
        raise VolumeShapeError(f"{name} has no positive voxel (max {float(peak):g}); nothing to fuse")
    return v / peak  # float32 ÷ float32, the same rounding as numpy's division by the peak


def _batches(tiles: list, batch_size: int) -> list[list]:
    """Consecutive tiles of one size, at most ``batch_size`` per group (edge tiles may differ in size)."""
    groups: list[list] = []
    for t in tiles:
        if groups and len(groups[-1]) < batch_size and groups[-1][0].size == t.size:
            groups[-1].append(t)
        else:
            groups.append([t])
    return groups


def _pad_end(v: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    # zeros at the far end, like the reference's own Z padding: the padded voxels are cut off afterwards
    if tuple(v.shape) == tuple(shape):
        return v
    out = v.new_zeros(shape)
    out[: v.shape[0], : v.shape[1], : v.shape[2]] = v
    return out


class _HostNet:
    """A network backend that reads host arrays only (ONNX Runtime's CPU provider) fed from another device.

    Each tile's two correction volumes go to the host and the fused tile comes back, through the counted edge
    functions, so the transfer counts show the cost; every other backend takes the device tensors as they are.
    """

    def __init__(self, net: Callable[..., Any], device: torch.device) -> None:
        self.net, self.device = net, device

    def __call__(self, corr_a: torch.Tensor, corr_b: torch.Tensor) -> torch.Tensor:
        out = self.net(*to_host((corr_a, corr_b)))
        return to_device(np.asarray(out, dtype=np.float32), self.device)


def _host_only(net: object, dev: torch.device) -> bool:
    # runtime backends declare the arrays they compute on; ORT with a GPU provider binds CUDA tensors directly
    return dev.type != "cpu" and getattr(net, "native", None) == "numpy" and not getattr(net, "_on_gpu", False)


def fuse_rldfn(
    view_a: torch.Tensor | np.ndarray,
    view_b: torch.Tensor | np.ndarray,
    model: RLDFN,
    tile: TileSpec = "none",
    overlap: int = DEFAULT_OVERLAP,
    device: str | torch.device | None = None,
    memory_budget_bytes: int | None = None,
    normalize: bool = True,
    progress: Callable[[int, int], None] | None = None,
    batch_size: int = 1,
    registered: bool | None = None,
    align: bool | None = None,
    one_view: bool | None = None,
    one_view_iterations: int | None = None,
    reports: dict[str, Any] | None = None,
) -> torch.Tensor | np.ndarray:
    """Fuse two registered views with RL-DFN.

    Parameters
    ----------
    view_a, view_b
        The two views on one grid, (Z, Y, X), any real dtype: torch tensors on any device (the result is a
        tensor on the same device) or numpy arrays (the result is a numpy array). Everything between — the
        normalisation, padding, coverage weights, cutting the tiles and blending them — runs on ``device``;
        nothing crosses to the host but a scalar per view (its peak).
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
        Torch device to compute on (default: the views' device for tensors, :func:`engines.device.pick_device`
        for numpy arrays).
    memory_budget_bytes
        Upper bound for one patch's estimated peak memory; ``None`` disables the check (required for ``"auto"``).
        On a GPU the whole-volume buffers (both padded views, the blend accumulators and, when registered, the
        coverage weights) live there too and are taken off the budget first. The Richardson–Lucy estimate that
        alignment and the one-view fill use runs after the patches within the same bound, in blocks when the
        whole volume's does not fit (:mod:`engines.rldfn.blocked_rl`).
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
    align
        Measure the network output's sub-voxel shift against the views' coverage-weighted joint Richardson–Lucy
        estimate and undo it (:mod:`engines.rldfn.align`): a network keeps whatever offset its training pairs
        held. Default: as ``registered``.
    one_view
        Where only one view has data, replace the network's output by the coverage-weighted Richardson–Lucy
        estimate of both views (:mod:`engines.rldfn.one_view`; the network fuses two views and its output there
        does not follow the sample), blended in over the views' edge ramps. Default: as ``registered``.
    one_view_iterations
        Iterations of that estimate, which the alignment registers to as well (computed once for both; default
        :data:`engines.rldfn.classical.DEFAULT_ITERATIONS`).
    reports
        When given, and the output is aligned, ``reports["registration"]`` receives the
        :class:`~engines.rldfn.consistency.RegistrationReport`: the shift removed, the shift left and its spread
        over the volume's halves (a warning is logged when the network's output is warped against its views).

    Returns
    -------
    torch.Tensor or np.ndarray
        float32 fused volume of the views' shape, a tensor on the views' device or a numpy array like the views.

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
    if one_view_iterations is not None and int(one_view_iterations) < 1:
        raise VolumeShapeError(f"one_view_iterations must be ≥ 1, got {one_view_iterations}")
    overlap = round_up(overlap)
    shape = tuple(int(n) for n in _shape(view_a))
    padded = tuple(round_up(n) for n in shape)
    width = int(getattr(model.net, "width", 64))
    tensors = isinstance(view_a, torch.Tensor) and isinstance(view_b, torch.Tensor)
    home = view_a.device if tensors else torch.device("cpu")  # type: ignore[union-attr]
    if device is not None:
        dev = pick_device(str(device))
    else:
        dev = home if tensors else pick_device(None)
    registered = tile != "none" if registered is None else bool(registered)
    budget = _patch_budget(memory_budget_bytes, padded, dev, registered)
    if tile == "auto":
        if budget is None:
            raise VolumeShapeError("tile='auto' needs a memory budget (memory_budget_bytes)")
        tile = tile_for_budget(padded, budget // int(batch_size), overlap, width)
    if tile == "none":
        check_budget(padded, budget, width, "the whole volume as one patch")
        tiles = plan_tiles(padded, max(padded), 0)
    elif isinstance(tile, (int, np.integer)) and not isinstance(tile, bool):
        if tile <= 0 or tile % 4:
            raise VolumeShapeError(f"tile size {tile} must be a positive multiple of 4 (the U-Net pools twice)")
        if overlap >= tile:
            raise VolumeShapeError(f"overlap {overlap} must be smaller than the tile size {tile}")
        check_budget(tuple(min(int(tile), n) for n in padded), None if budget is None
                     else budget // int(batch_size), width,
                     "one tile" if batch_size == 1 else f"one tile (of a batch of {batch_size})")
        tiles = plan_tiles(padded, int(tile), overlap)
    else:
        raise VolumeShapeError(f"tile must be 'none', 'auto' or a positive multiple of 4, got {tile!r}")

    a, b = _as_float(view_a, dev), _as_float(view_b, dev)
    if normalize:
        a, b = _normalise(a, "view A"), _normalise(b, "view B")
    a, b = _pad_end(a, padded), _pad_end(b, padded)
    model = model.to(dev).eval()
    weights = None
    if registered:
        weights = [blend_weight(coverage_mask(v)) for v in (a, b)]
    was_registered, net = getattr(model, "registered", False), model.net
    model.registered = registered
    if _host_only(net, dev):
        model.net = _HostNet(net, dev)
    try:
        fused = _run_tiles(a, b, model, tiles, padded, shape, overlap, width, dev, batch_size, weights, progress)
    finally:
        model.registered, model.net = was_registered, net
    do_align = registered if align is None else align
    do_fill = registered if one_view is None else one_view
    if do_align or do_fill:
        if weights is None:
            weights = [blend_weight(coverage_mask(v)) for v in (a, b)]
        inner = tuple(slice(0, n) for n in shape)
        va, vb, wa, wb = a[inner], b[inner], weights[0][inner], weights[1][inner]
        psfs = (model.psf_a.detach().cpu().numpy(), model.psf_b.detach().cpu().numpy())
        both = torch.minimum(wa, wb)
        do_fill = do_fill and not bool((both > 0.99).all())  # both views everywhere: nothing to fill
        estimate = _estimate(va, vb, wa, wb, psfs, one_view_iterations, budget) if do_align or do_fill else None
        if do_align:
            from engines.rldfn.align import align_to_estimate

            fused, moved = align_to_estimate(fused, estimate, both)
            log.debug("fused volume moved by %s voxels onto its views", tuple(-m for m in moved))
            if reports is not None:
                from engines.rldfn.consistency import check_registration

                reports["registration"] = check_registration(fused, estimate, both, moved)
        if do_fill:
            from engines.rldfn.one_view import blend_one_view

            fused = blend_one_view(fused, estimate, wa, wb)
    if not tensors:
        return fused.numpy() if dev.type == "cpu" else to_host(fused)
    if fused.device == home:
        return fused
    return torch.from_numpy(to_host(fused)) if home.type == "cpu" else fused.to(home)


def _estimate(a: torch.Tensor, b: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor,
              psfs: tuple[np.ndarray, np.ndarray], iterations: int | None, budget: int | None) -> torch.Tensor:
    """The views' coverage-weighted joint Richardson–Lucy estimate: what the output is registered to (it sits on
    the views by construction) and what fills the regions only one view sees; in blocks when the whole volume's
    deconvolution does not fit the patches' memory budget (it runs after them)."""
    from engines.rldfn.blocked_rl import joint_rl_within
    from engines.rldfn.classical import DEFAULT_ITERATIONS

    its = DEFAULT_ITERATIONS if iterations is None else int(iterations)
    return joint_rl_within(a, b, psfs[0], psfs[1], its, [wa, wb], budget)


def _patch_budget(budget: int | None, padded: tuple[int, ...], dev: torch.device, registered: bool) -> int | None:
    """What is left of ``budget`` for the patches once the whole-volume buffers sit on an accelerator."""
    if budget is None or dev.type == "cpu":
        # on the CPU those buffers were host memory before the chain became device-resident, and the budget
        # (calibrated for the patch forward) never counted them; keep the tiles it picks unchanged there
        return budget
    volumes = 4 + (2 if registered else 0)  # a, b, accumulator, weight sum (+ two coverage weights)
    resident = volumes * 4 * int(np.prod(padded))
    if resident >= budget:
        raise MemoryBudgetError(
            f"the {'×'.join(map(str, padded))}-voxel volume's own buffers on the {dev.type.upper()} "
            f"({volumes} float32 volumes, ≈{resident / 2**20:.0f} MiB) do not fit the memory budget of "
            f"{budget / 2**20:.0f} MiB; raise the budget"
        )
    return budget - resident


def _run_tiles(a: torch.Tensor, b: torch.Tensor, model: RLDFN, tiles: list, padded: tuple[int, ...],
               shape: tuple[int, ...], overlap: int, width: int, dev: torch.device, batch_size: int,
               weights: list[torch.Tensor] | None, progress: Callable[[int, int], None] | None) -> torch.Tensor:

    def cut(v: torch.Tensor, group: list) -> torch.Tensor:
        # (N, 1, Z, Y, X), contiguous like the numpy stack the network was checked against
        return torch.stack([v[t.slices] for t in group])[:, None]

    acc = torch.zeros(padded, dtype=torch.float32, device=dev)
    wsum = torch.zeros(padded, dtype=torch.float32, device=dev)
    done = 0
    with torch.inference_mode():
        for group in _batches(tiles, batch_size):
            ta, tb = cut(a, group), cut(b, group)
            tw = None if weights is None else (cut(weights[0], group), cut(weights[1], group))
            try:
                out = (model(ta, tb) if tw is None else model(ta, tb, tw))[:, 0].float()
            except (_OOM, RuntimeError) as err:
                # CUDA raises OutOfMemoryError; the CPU allocator a RuntimeError "can't allocate memory"
                if not isinstance(err, _OOM) and "allocate" not in str(err):
                    raise
                del ta, tb, tw
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                size = group[0].size
                raise MemoryBudgetError(
                    f"{len(group)} × a {'×'.join(map(str, size))} patch did not fit in {dev.type.upper()} memory "
                    f"(estimated ≈{len(group) * estimate_patch_bytes(size, width) / 2**20:.0f} MiB); use a smaller "
                    "tile (tile=N or tile='auto' with a memory budget) or batch_size=1"
                ) from None
            out = torch.nan_to_num(out.to(dev), nan=0.0)  # the reference zeroes NaNs as well
            for t, o in zip(group, out):
                if len(tiles) > 1:
                    w = blend_weights_t(t, padded, overlap, dev)
                    acc[t.slices] += w * o
                    wsum[t.slices] += w
                else:  # one patch: weight 1, the same numbers as 1·o
                    acc[t.slices] += o
                    wsum[t.slices] += 1.0
            done += len(group)
            if progress is not None:
                progress(done, len(tiles))
    fused = acc / wsum
    if tuple(shape) == tuple(padded):
        return fused
    return fused[: shape[0], : shape[1], : shape[2]].contiguous()
