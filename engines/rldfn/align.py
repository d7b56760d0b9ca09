"""Registering a network's fused volume back onto its views: measure its sub-voxel shift, undo it.

The registered Richardson–Lucy step moves nothing, but the fusion network after it may: it learned whatever
offset its training pairs held (the reference's RL step shifts its corrections by about one voxel per even axis,
and networks trained on it learn part of that). On the simulator the shipped demo RL-DFN puts its output 0.2–0.7
voxel off on every axis. The shift is measured against the views' own deconvolution — the coverage-weighted joint
Richardson–Lucy estimate, which sits on the views by construction (it is fitted to reproduce them through their
PSFs) — by cross-correlation where both views are trusted, and removed by a Fourier (sinc) shift.

Why not compare the fused volume blurred by each view's PSF with that view
(:func:`engines.rldfn.metrics.forward_registration_shift`)? That holds for an estimate of the object (a
deconvolution) but not for a network's output: it is not the object, and blurred it is not the view. On simulated
filaments that measure moved the demo network's output 1.2 voxel away from the truth in z; registered to the
estimate it sits within 0.25 voxel of the truth on every axis (the estimate itself: within 0.1).

Everything is torch on the tensors' own device; memory beyond the volume is bounded (the shift is measured on a
crop of at most :data:`MAX_CROP` voxels per axis, and applied one axis and one slab at a time).
"""

from __future__ import annotations

import math

import numpy as np
import torch

#: Largest shift (voxels, per axis) searched for; a network that moves its output further is not a fusion.
REACH = 2

#: Edge of the (at most) cubic crop the shift is measured on: enough structure for a sub-voxel estimate.
MAX_CROP = 256

#: Measure-and-shift rounds at most, and the remaining shift (voxels, every axis) that ends them.
ITERATIONS = 3
TOLERANCE = 0.02

#: Voxels of mirror padding at each end of an axis before the Fourier shift, against wrap-around.
_PAD = 8

#: Voxels processed per slab when shifting (bounds the complex buffers).
_SLAB_VOXELS = 1 << 24


def _crop(shape: tuple[int, ...], weight: torch.Tensor) -> tuple[slice, ...]:
    # centred on the trusted region's centre of mass, so the crop holds data
    idx = [torch.arange(n, device=weight.device, dtype=torch.float32) for n in shape]
    total = float(weight.sum())
    out = []
    for ax, n in enumerate(shape):
        other = tuple(d for d in range(3) if d != ax)
        centre = float((weight.sum(dim=other) * idx[ax]).sum()) / total if total > 0 else (n - 1) / 2
        size = min(n, MAX_CROP)
        lo = int(min(max(round(centre - size / 2), 0), n - size))
        out.append(slice(lo, lo + size))
    return tuple(out)


def measure_shift(moving: torch.Tensor, fixed: torch.Tensor, weight: torch.Tensor,
                  reach: int = REACH) -> tuple[float, float, float] | None:
    """Shift (z, y, x voxels) that takes ``fixed`` onto ``moving``, measured where ``weight`` > 0.5.

    :func:`engines.rldfn.metrics.xcorr_peak` (the benchmarks' :func:`~engines.rldfn.metrics.registration_shift`
    on the device) on a crop of at most :data:`MAX_CROP` voxels per axis. None when the mask is nearly empty or
    the peak is at the edge of the reach.
    """
    sl = _crop(tuple(moving.shape), weight)
    return _shift_in(moving[sl].float(), fixed[sl].float(), (weight[sl] > 0.5).float(), reach)


def _shift_in(a: torch.Tensor, b: torch.Tensor, m: torch.Tensor, reach: int) -> tuple[float, float, float] | None:
    from engines.rldfn.metrics import xcorr_peak

    if float(m.sum()) < 512:
        return None
    shift, interior = xcorr_peak(a, b, m, reach)
    return (float(shift[0]), float(shift[1]), float(shift[2])) if interior else None


def lk_shift(moving: torch.Tensor, fixed: torch.Tensor, weight: torch.Tensor,
             iterations: int = 12) -> tuple[float, float, float] | None:
    """Shift (z, y, x voxels) that takes ``fixed`` onto ``moving`` (up to a gain), by weighted Lucas–Kanade.

    Solves ``moving ≈ k·fixed(x − s)`` in least squares over ``weight`` (linearised: ``k·fixed − k·s·∇fixed``),
    moves ``fixed`` by the estimate with a Fourier shift and repeats. Unlike a cross-correlation it compares
    the same voxels of both, so a mask that cuts structures does not move the answer; both volumes must show
    the same structures at the same blur (compare a fused volume imaged through a view's PSF with that view).
    None when the weight is nearly empty, the data hold no gradient, or the estimate leaves ±:data:`REACH`.
    """
    w = weight.float()
    if float((w > 0).sum()) < 512:
        return None
    a = moving.float()
    total = torch.zeros(3, dtype=torch.float64)
    for _ in range(int(iterations)):
        b = shift_volume(fixed.float(), tuple(float(t) for t in total), clip=False) if total.abs().max() > 0 \
            else fixed.float()
        grads = torch.gradient(b)
        basis = [b] + [-g for g in grads]
        normal = torch.empty((4, 4), dtype=torch.float64)
        rhs = torch.empty(4, dtype=torch.float64)
        for i in range(4):
            wi = w * basis[i]
            rhs[i] = float((wi * a).sum(dtype=torch.float64))
            for j in range(i, 4):
                normal[i, j] = normal[j, i] = float((wi * basis[j]).sum(dtype=torch.float64))
        try:
            sol = torch.linalg.solve(normal, rhs)
        except RuntimeError:  # singular: no structure to register
            return None
        if not float(sol[0]) > 0:
            return None
        # at most half a voxel per round: the linearisation only holds for small shifts
        step = torch.clamp(sol[1:] / sol[0], -0.5, 0.5)
        total += step
        if total.abs().max() > REACH:
            return None
        if step.abs().max() < 1e-3:
            break
    return float(total[0]), float(total[1]), float(total[2])


def shift_volume(volume: torch.Tensor, shift: tuple[float, float, float], clip: bool = True) -> torch.Tensor:
    """``volume`` moved by ``shift`` voxels (z, y, x) with a Fourier shift per axis; mirror-padded, clipped at 0."""
    out = volume.float()
    for ax, s in enumerate(shift):
        if abs(s) < 1e-3:
            continue
        n = out.shape[ax]
        moved = torch.movedim(out, ax, -1).clone(memory_format=torch.contiguous_format)  # never the caller's
        flat = moved.reshape(-1, n)
        pad = min(_PAD, n - 1)
        length = n + 2 * pad
        freqs = torch.fft.rfftfreq(length, device=out.device)
        ramp = torch.exp(-2j * math.pi * freqs * float(s)).to(torch.complex64)
        rows = max(1, _SLAB_VOXELS // length)
        for r0 in range(0, flat.shape[0], rows):
            part = flat[r0:r0 + rows]
            if pad:
                part = torch.nn.functional.pad(part[:, None], (pad, pad), mode="reflect")[:, 0]
            spec = torch.fft.rfft(part, dim=-1) * ramp
            flat[r0:r0 + rows] = torch.fft.irfft(spec, n=length, dim=-1)[:, pad:pad + n]
        out = torch.movedim(flat.reshape(moved.shape), -1, ax)
    return torch.clamp(out, min=0) if clip else out


def align_to_estimate(fused: torch.Tensor, estimate: torch.Tensor, weight: torch.Tensor,
                      reach: int = REACH) -> tuple[torch.Tensor, tuple[float, float, float]]:
    """``fused`` moved onto ``estimate``'s grid, and the shift that was removed (0s when none could be measured).

    The shift is :func:`measure_shift`'s (cross-correlation) where ``weight`` > 0.99, re-measured on the moved
    volume and corrected until it settles (a network's output is not a shifted copy of the estimate, so the
    measure is not exactly linear in the shift); the volume is interpolated once, from the original.
    """
    trusted = (weight > 0.99).float()
    total = measure_shift(fused, estimate, trusted, reach)
    if total is None:
        return fused, (0.0, 0.0, 0.0)
    moved = shift_volume(fused, tuple(-t for t in total))  # type: ignore[arg-type]
    for _ in range(ITERATIONS - 1):
        rest = measure_shift(moved, estimate, trusted, reach)
        if rest is None or max(abs(r) for r in rest) < TOLERANCE:
            break
        total = tuple(t + r for t, r in zip(total, rest))  # type: ignore[assignment]
        moved = shift_volume(fused, tuple(-t for t in total))  # type: ignore[arg-type]
    return moved, total


def align_to_views(fused: torch.Tensor, view_a: torch.Tensor, view_b: torch.Tensor, weight_a: torch.Tensor,
                   weight_b: torch.Tensor, psfs: tuple[np.ndarray, np.ndarray],
                   iterations: int | None = None) -> tuple[torch.Tensor, tuple[float, float, float]]:
    """``fused`` moved onto the views' grid, and the shift that was removed (0s when none could be measured).

    Registered by :func:`align_to_estimate`, where both views are trusted, against the views' coverage-weighted
    joint Richardson–Lucy estimate (``iterations``, default :data:`engines.rldfn.classical.DEFAULT_ITERATIONS`).
    With that estimate at hand already (:func:`engines.rldfn.fuse.fuse_rldfn` also fills with it), call
    :func:`align_to_estimate` directly.
    """
    from engines.rldfn.classical import DEFAULT_ITERATIONS, joint_rl

    its = DEFAULT_ITERATIONS if iterations is None else int(iterations)
    estimate = joint_rl(view_a, view_b, psfs[0], psfs[1], its, coverage=[weight_a, weight_b])
    return align_to_estimate(fused, estimate, torch.minimum(weight_a, weight_b))
