"""Resolution measured on volumes: FWHM of isolated puncta, and the blur that best matches a known truth.

Used by the resolution benchmark (``scripts/bench_resolution.py``) and by tests that check a deconvolution
sharpens real data. Both work on numpy arrays (Z, Y, X) with a voxel size in µm per axis.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


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

    Both are mean-subtracted over ``mask`` (default: everywhere) and zero outside it; the peak of their
    circular cross-correlation within ``reach`` voxels of zero is refined per axis by a parabola through its
    neighbours (of its logarithm where positive). Sharpening does not move the peak (a deconvolution correlates with its blurred input at zero
    shift), a displacement does, so this measures registration between a fused volume and its views.
    """
    a = np.asarray(moving, np.float64)
    b = np.asarray(fixed, np.float64)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"registration_shift needs two (Z, Y, X) volumes of one shape, got {a.shape} and {b.shape}")
    sel = np.ones(a.shape, bool) if mask is None else np.asarray(mask, bool)
    a = np.where(sel, a - a[sel].mean(), 0.0)
    b = np.where(sel, b - b[sel].mean(), 0.0)
    pad = [n + reach + 1 for n in a.shape]  # no wrap-around within the reach
    axes = (0, 1, 2)
    xc = np.fft.irfftn(np.fft.rfftn(a, pad, axes) * np.conj(np.fft.rfftn(b, pad, axes)), pad, axes)
    lags = np.arange(-reach, reach + 1)
    window = xc[np.ix_(*[np.mod(lags, n) for n in pad])]
    peak = np.array(np.unravel_index(int(np.argmax(window)), window.shape))
    out = lags[peak].astype(np.float64)
    for ax in range(3):
        i = peak[ax]
        if 0 < i < len(lags) - 1:
            idx = list(peak)
            ym = window[tuple(idx[:ax] + [i - 1] + idx[ax + 1:])]
            y0 = window[tuple(idx)]
            yp = window[tuple(idx[:ax] + [i + 1] + idx[ax + 1:])]
            if min(ym, y0, yp) > 0:  # a Gaussian peak: its logarithm is an exact parabola
                ym, y0, yp = np.log(ym), np.log(y0), np.log(yp)
            den = ym - 2 * y0 + yp
            if den < 0:
                out[ax] += float(np.clip(0.5 * (ym - yp) / den, -0.5, 0.5))
    return out


def forward_registration_shift(fused: np.ndarray, views: Sequence[np.ndarray], psfs: Sequence[np.ndarray],
                               mask: np.ndarray | None = None, reach: int = 3) -> np.ndarray:
    """Mean over the views of :func:`registration_shift` of ``fused`` blurred by each view's PSF against that view.

    A sharp volume and a view blurred by a tilted PSF have different shapes, and a mask that cuts the tilted PSF
    moves a plain cross-correlation by a fraction of a voxel (the two views in opposite directions); imaged
    through each view's own PSF the fused volume is compared like with like.
    """
    from scipy.signal import fftconvolve

    shifts = []
    for view, psf in zip(views, psfs):
        p = np.asarray(psf, np.float64)
        blurred = fftconvolve(np.asarray(fused, np.float64), p / p.sum(), mode="same")
        shifts.append(registration_shift(blurred, view, mask, reach))
    return np.mean(shifts, axis=0)
