"""Registering a network's fused volume back onto its views: measure its sub-voxel shift, undo it.

The registered Richardson–Lucy step moves nothing, but the fusion network after it may: it learned whatever
offset its training pairs held (the reference's RL step shifts its corrections by about one voxel per even axis,
and networks trained on it learn part of that). On simulated beads the shipped demo RL-DFN put its output about
0.5–0.65 voxel off its views on every axis. A shift is measured against the views where both are trusted and
removed by a Fourier (sinc) shift, so the fused volume lands on the views' grid as the other modes do.

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

#: Near the mirror each view also holds the tail of the other image (the sample sits on the coverslip), which
#: pulls the views' own structures towards it; the shift is measured this far (µm) from the mirror and beyond.
NEAR_MIRROR_UM = 1.0

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

    Cross-correlation of the two (each mean-subtracted inside the mask) within ``reach`` voxels of zero, its
    peak refined per axis by a parabola through the logarithms of its neighbours. None when the mask is nearly
    empty or the peak is at the edge of the reach.
    """
    sl = _crop(tuple(moving.shape), weight)
    return _shift_in(moving[sl].float(), fixed[sl].float(), (weight[sl] > 0.5).float(), reach)


def _shift_in(a: torch.Tensor, b: torch.Tensor, m: torch.Tensor, reach: int) -> tuple[float, float, float] | None:
    if float(m.sum()) < 512:
        return None
    a = (a - (a * m).sum() / m.sum()) * m
    b = (b - (b * m).sum() / m.sum()) * m
    pad = [n + reach + 1 for n in a.shape]
    dims = (0, 1, 2)
    xc = torch.fft.irfftn(torch.fft.rfftn(a, pad, dims) * torch.fft.rfftn(b, pad, dims).conj(), pad, dims)
    lags = torch.arange(-reach, reach + 1, device=xc.device)
    idx = [torch.remainder(lags, n) for n in pad]
    window = xc[idx[0][:, None, None], idx[1][None, :, None], idx[2][None, None, :]].double().cpu()
    peak = [int(i) for i in torch.nonzero(window == window.max())[0]]
    if any(p in (0, 2 * reach) for p in peak):
        return None
    out = []
    for ax in range(3):
        pos = list(peak)
        vals = []
        for d in (-1, 0, 1):
            pos[ax] = peak[ax] + d
            vals.append(float(window[tuple(pos)]))
        if min(vals) > 0:
            vals = [math.log(v) for v in vals]
        den = vals[0] - 2 * vals[1] + vals[2]
        frac = 0.5 * (vals[0] - vals[2]) / den if den < 0 else 0.0
        out.append(peak[ax] - reach + max(-0.5, min(0.5, frac)))
    return out[0], out[1], out[2]


def forward_shift(fused: torch.Tensor, views: list[torch.Tensor], psfs: list[np.ndarray], weight: torch.Tensor,
                  reach: int = REACH) -> tuple[float, float, float] | None:
    """Mean over the views of the shift of ``fused`` imaged through each view's PSF against that view.

    Comparing like with like: a sharp fused volume and a view blurred by a tilted PSF have different shapes, and
    any mask that cuts a tilted PSF moves a plain cross-correlation by a fraction of a voxel (the two views in
    opposite directions). Blurred by the view's own PSF, the fused volume should land exactly on the view.
    Measured where ``weight`` > 0.5, at least half a PSF from the crop's faces (the convolution is circular).
    """
    from engines.rldfn.classical import centred_otf

    sl = _crop(tuple(fused.shape), weight)
    f = fused[sl].float()
    shape = tuple(f.shape)
    m = (weight[sl] > 0.5).float()
    half = [max(p.shape[ax] for p in psfs) // 2 for ax in range(3)]
    inner = tuple(slice(min(h, n // 4), n - min(h, n // 4)) for h, n in zip(half, shape))
    border = torch.zeros_like(m)
    border[inner] = 1
    m = m * border
    spec = torch.fft.rfftn(f, dim=(0, 1, 2))
    shifts = []
    for view, psf in zip(views, psfs):
        blurred = torch.fft.irfftn(spec * centred_otf(psf, shape, f.device), shape, dim=(0, 1, 2))
        s = _shift_in(blurred, view[sl].float(), m, reach)
        if s is None:
            return None
        shifts.append(s)
    return tuple(float(np.mean([s[ax] for s in shifts])) for ax in range(3))  # type: ignore[return-value]


def shift_volume(volume: torch.Tensor, shift: tuple[float, float, float]) -> torch.Tensor:
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
    return torch.clamp(out, min=0)


def align_to_views(fused: torch.Tensor, view_a: torch.Tensor, view_b: torch.Tensor, weight_a: torch.Tensor,
                   weight_b: torch.Tensor, reach: int = REACH, skip_planes: int = 0,
                   psfs: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[torch.Tensor, tuple[float, float, float]]:
    """``fused`` moved onto the views' grid, and the shift that was removed (0s when none could be measured).

    With the views' ``psfs`` the shift is :func:`forward_shift`'s; without, the plain cross-correlation with the
    coverage-weighted mean of the two views. Either is measured where both views are trusted and not within the
    last ``skip_planes`` planes (the views run from far to near the mirror: :data:`NEAR_MIRROR_UM`).
    """
    wsum = weight_a + weight_b
    ref = (weight_a * view_a + weight_b * view_b) / torch.clamp(wsum, min=1e-6)
    both = torch.minimum(weight_a, weight_b)
    if 0 < skip_planes < both.shape[0]:
        both = both.clone()
        both[-skip_planes:] = 0
    def measure(vol: torch.Tensor) -> tuple[float, float, float] | None:
        if psfs is not None:
            return forward_shift(vol, [view_a, view_b], list(psfs), both, reach)
        return measure_shift(vol, ref, both, reach)

    total = measure(fused)
    if total is None:
        return fused, (0.0, 0.0, 0.0)
    moved = shift_volume(fused, tuple(-t for t in total))  # type: ignore[arg-type]
    # A network's output is not a shifted copy of its views, so the measure is not exactly linear in the shift:
    # re-measure and correct (from the original, so that the volume is interpolated once) until it settles.
    for _ in range(ITERATIONS - 1):
        rest = measure(moved)
        if rest is None or max(abs(r) for r in rest) < TOLERANCE:
            break
        total = tuple(t + r for t, r in zip(total, rest))  # type: ignore[assignment]
        moved = shift_volume(fused, tuple(-t for t in total))  # type: ignore[arg-type]
    return moved, total
