"""Resolution and registration measured on volumes: FWHM of isolated puncta, the blur that best matches a known
truth, and sub-voxel shifts between volumes.

Used by the resolution benchmark (``scripts/bench_resolution.py``), by tests that check a deconvolution sharpens
real data or stays registered, and (the cross-correlation core) by :mod:`engines.rldfn.align`. They take numpy
arrays (Z, Y, X) with a voxel size in µm per axis.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def _fwhm_1d(profile: np.ndarray, centre: int) -> float | None:
    """FWHM (samples) of the peak at ``centre`` of a background-subtracted profile; None when it has no edges."""
    peak = float(profile[centre])
    if peak <= 0:
        return None
    half = peak / 2
    left = centre
    while left > 0 and profile[left] > half:
        left -= 1
    right = centre
    while right < len(profile) - 1 and profile[right] > half:
        right += 1
    if profile[left] > half or profile[right] > half:
        return None
    # linear interpolation of the two half-maximum crossings
    xl = left + (half - profile[left]) / (profile[left + 1] - profile[left])
    xr = right - (half - profile[right]) / (profile[right - 1] - profile[right])
    return float(xr - xl)


def puncta_fwhm(
    volume: np.ndarray,
    voxel_um: Sequence[float],
    n: int = 200,
    radius: int = 6,
    min_prominence: float = 0.2,
) -> dict[str, float]:
    """Median FWHM (nm) along z, y and x of the brightest isolated puncta of ``volume``.

    A punctum is a local maximum (over a (2·radius+1)³ box) at least ``radius`` voxels from every face, whose
    three axial profiles through it (minus their own minimum as local background) fall below half their peak
    on both sides within ``radius`` voxels and whose peak rises above the mean of its (3, 2·radius+1, 2·radius+1) box by ``min_prominence``
    of the brightest such peak. Returns ``{"z": …, "y": …, "x": …, "n": count}`` (NaN when none is found).
    """
    from scipy import ndimage

    v = np.asarray(volume, np.float64)
    if v.ndim != 3:
        raise ValueError(f"puncta_fwhm expects a (Z, Y, X) volume, got shape {v.shape}")
    r = int(radius)
    local_max = ndimage.maximum_filter(v, size=2 * r + 1, mode="constant", cval=-np.inf)
    cand = (v == local_max) & (v > 0)
    cand[:r], cand[-r:], cand[:, :r], cand[:, -r:], cand[:, :, :r], cand[:, :, -r:] = (False,) * 6
    idx = np.argwhere(cand)
    if len(idx) == 0:
        return {"z": float("nan"), "y": float("nan"), "x": float("nan"), "n": 0}
    med = ndimage.uniform_filter(v, size=(3, 2 * r + 1, 2 * r + 1))[tuple(idx.T)]
    prom = v[tuple(idx.T)] - med
    order = np.argsort(prom)[::-1]
    keep = order[prom[order] >= min_prominence * prom[order[0]]][: int(n)]
    widths: list[list[float]] = [[], [], []]
    for i in keep:
        z, y, x = idx[i]
        profiles = (v[z - r : z + r + 1, y, x], v[z, y - r : y + r + 1, x], v[z, y, x - r : x + r + 1])
        fw = []
        for p in profiles:
            f = _fwhm_1d(p - p.min(), r)
            if f is None:
                break
            fw.append(f)
        if len(fw) == 3:
            for ax in range(3):
                widths[ax].append(fw[ax] * float(voxel_um[ax]) * 1000.0)
    out = {name: float(np.median(w)) if w else float("nan") for name, w in zip("zyx", widths)}
    out["n"] = len(widths[0])
    return out


def best_matching_blur(
    volume: np.ndarray,
    truth: np.ndarray,
    voxel_um: Sequence[float],
    lateral_nm: Sequence[float] = tuple(range(80, 481, 25)),
    axial_nm: Sequence[float] = tuple(range(150, 901, 50)),
    mask: np.ndarray | None = None,
) -> tuple[float, float, float]:
    """The Gaussian blur (lateral FWHM, axial FWHM, in nm) of ``truth`` that best correlates with ``volume``.

    The truth is blurred by each (lateral, axial) pair of the grids (separable Gaussian, FWHM = 2.355 σ) and
    compared with the volume by Pearson correlation over ``mask`` (default: everywhere); returns the best pair
    and its correlation. A smaller best blur means a sharper reconstruction, whatever its intensity scale.
    """
    from scipy import ndimage

    vol = np.asarray(volume, np.float64)
    gt = np.asarray(truth, np.float64)
    if vol.shape != gt.shape:
        raise ValueError(f"volume {vol.shape} and truth {gt.shape} must have one shape")
    sel = np.ones(vol.shape, bool) if mask is None else np.asarray(mask, bool)
    a = vol[sel] - vol[sel].mean()
    na = np.linalg.norm(a)
    best = (float("nan"), float("nan"), -np.inf)
    # blur laterally once per lateral width, then axially (separable)
    for lat in lateral_nm:
        sy = lat / 2.355 / (voxel_um[1] * 1000.0)
        sx = lat / 2.355 / (voxel_um[2] * 1000.0)
        lateral = ndimage.gaussian_filter(gt, (0, sy, sx))
        for ax in axial_nm:
            sz = ax / 2.355 / (voxel_um[0] * 1000.0)
            b = ndimage.gaussian_filter1d(lateral, sz, axis=0)[sel]
            b = b - b.mean()
            c = float(a @ b / (na * np.linalg.norm(b) + 1e-30))
            if c > best[2]:
                best = (float(lat), float(ax), c)
    return best


def registration_shift(moving: np.ndarray, fixed: np.ndarray, mask: np.ndarray | None = None,
                       reach: int = 3) -> np.ndarray:
    """Sub-voxel shift (z, y, x voxels) of ``moving`` relative to ``fixed``: ``moving ≈ fixed`` moved by it.

    :func:`xcorr_peak` over ``mask`` (default: everywhere), in float64. Sharpening does not move the peak (a
    deconvolution correlates with its blurred input at zero shift), a displacement does, so this measures
    registration between a fused volume and its views.
    """
    import torch

    a = np.asarray(moving, np.float64)
    b = np.asarray(fixed, np.float64)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"registration_shift needs two (Z, Y, X) volumes of one shape, got {a.shape} and {b.shape}")
    sel = np.ones(a.shape) if mask is None else np.asarray(mask, np.float64)
    shift, _ = xcorr_peak(torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(sel), reach)
    return shift


def xcorr_peak(moving: torch.Tensor, fixed: torch.Tensor, mask: torch.Tensor,
               reach: int) -> tuple[np.ndarray, bool]:
    """Peak of the cross-correlation of two (Z, Y, X) tensors within ``reach`` voxels of zero shift, sub-voxel.

    Both are mean-subtracted over ``mask`` (0/1, same shape) and ``fixed`` is zeroed outside it; the circular
    cross-correlation (padded so nothing wraps within the reach) is searched on the device, its peak refined by
    :func:`quadratic_peak`. Returns the shift (z, y, x voxels, ``moving ≈ fixed`` moved by it) and whether the
    integer peak lies inside the searched window (False: at its edge, the true shift may be further).
    """
    import torch

    m = mask.to(moving.dtype)
    n = m.sum().clamp(min=1)
    # only ``fixed`` is cut by the mask: cut both, and the shared cut itself would pull the peak towards 0
    a = moving - (moving * m).sum() / n
    b = (fixed - (fixed * m).sum() / n) * m
    pad = [int(k) + reach + 1 for k in a.shape]  # no wrap-around within the reach
    dims = (0, 1, 2)
    xc = torch.fft.irfftn(torch.fft.rfftn(a, pad, dims) * torch.fft.rfftn(b, pad, dims).conj(), pad, dims)
    lags = torch.arange(-reach, reach + 1, device=xc.device)
    idx = [torch.remainder(lags, k) for k in pad]
    window = xc[idx[0][:, None, None], idx[1][None, :, None], idx[2][None, None, :]].double().cpu().numpy()
    peak = np.array(np.unravel_index(int(np.argmax(window)), window.shape))
    interior = not any(p in (0, 2 * reach) for p in peak)
    return (peak - reach).astype(np.float64) + quadratic_peak(window, peak), interior


def quadratic_peak(window: np.ndarray, peak: Sequence[int]) -> np.ndarray:
    """Sub-voxel offset of the maximum of a 3-D array near its integer ``peak`` (each axis within ±1).

    A full quadratic (with cross terms) is fitted to the 3×3×3 neighbourhood — to its logarithm where it is
    positive, exact for a Gaussian peak. Per-axis parabolas are not enough: the cross-correlation of views blurred
    by tilted PSFs is a tilted ridge, and a 1-D fit along z at the peak's integer x lands off the ridge's top
    (0.4 voxel on a 30°-tilted PSF). Zero offset where the neighbourhood leaves the array or the fit has no maximum.
    """
    p = [int(i) for i in peak]
    if any(i < 1 or i > n - 2 for i, n in zip(p, window.shape)):
        return np.zeros(3)
    nb = np.asarray(window[p[0] - 1:p[0] + 2, p[1] - 1:p[1] + 2, p[2] - 1:p[2] + 2], np.float64)
    if nb.min() > 0:
        nb = np.log(nb)
    d = np.stack(np.meshgrid(*[np.arange(-1, 2)] * 3, indexing="ij"), -1).reshape(-1, 3).astype(np.float64)
    cols = [np.ones(len(d)), d[:, 0], d[:, 1], d[:, 2], d[:, 0] ** 2, d[:, 1] ** 2, d[:, 2] ** 2,
            d[:, 0] * d[:, 1], d[:, 0] * d[:, 2], d[:, 1] * d[:, 2]]
    coef, *_ = np.linalg.lstsq(np.stack(cols, 1), nb.reshape(-1), rcond=None)
    g = coef[1:4]
    h = np.array([[2 * coef[4], coef[7], coef[8]], [coef[7], 2 * coef[5], coef[9]], [coef[8], coef[9], 2 * coef[6]]])
    if np.any(np.linalg.eigvalsh(h) >= 0):
        return np.zeros(3)
    return np.clip(-np.linalg.solve(h, g), -1.0, 1.0)


def forward_registration_shift(fused: np.ndarray, views: Sequence[np.ndarray], psfs: Sequence[np.ndarray],
                               mask: np.ndarray | None = None) -> np.ndarray:
    """Mean over the views of the shift of ``fused`` blurred by each view's PSF against that view (Lucas–Kanade,
    :func:`engines.rldfn.align.lk_shift`; NaN where it cannot be measured).

    A sharp volume and a view blurred by a tilted PSF have different shapes, and a mask that cuts the tilted PSF
    moves a plain cross-correlation by a fraction of a voxel (the two views in opposite directions); imaged
    through each view's own PSF the fused volume is compared like with like.
    """
    import torch
    from scipy.signal import fftconvolve

    from engines.rldfn.align import lk_shift

    weight = torch.ones(np.shape(fused)) if mask is None else torch.from_numpy(np.asarray(mask, np.float32))
    shifts = []
    for view, psf in zip(views, psfs):
        p = np.asarray(psf, np.float64)
        blurred = fftconvolve(np.asarray(fused, np.float64), p / p.sum(), mode="same")
        s = lk_shift(torch.from_numpy(blurred.astype(np.float32)), torch.from_numpy(np.asarray(view, np.float32)),
                     weight)
        shifts.append(np.full(3, np.nan) if s is None else np.array(s))
    return np.mean(shifts, axis=0)
