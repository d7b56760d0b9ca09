"""Joint Wiener recombination of the three virtual-SIM orientations into one isotropic lateral SR plane.

Per plane: the wide-field plane (bicubically enlarged 1.5×) and the three network outputs (0°, 60°, 120°,
already rotated back and cropped) are combined in Fourier space,

    S = ( Σ_i (OTF0 + w·OTF_i) · F[b_i]  −  2 · OTF0 · apo · F[wf] ) / ( OTF0 + Σ_i OTF_i + σ² ),

where OTF_i is the side-band OTF turned to orientation i, w the OTF weight and σ the Wiener constant.
The result is clipped at zero, rescaled to [0, 1] and given the mean of the 0° band (the published
recipe).  The filters depend only on the image size, so they are built once per volume, stored
``ifftshift``-ed, and applied to a whole batch of planes with one FFT each.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage

from engines.vsisr.otf import OTFSet
from engines.vsisr.rotate import resize_cubic

N_ANGLES = 3
ANGLE_STEP_DEG = 60.0
#: Offset added to the min–max denominator so a flat image maps to zeros instead of NaN (as published).
_EPS = 1e-7


def minmax_norm(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """``(x − min) / (max − min + 1e-7)`` over ``dims``, clipped to [0, 1] (the reference's prctile norm 0–100)."""
    lo = x.amin(dim=dims, keepdim=True)
    hi = x.amax(dim=dims, keepdim=True)
    return ((x - lo) / (hi - lo + _EPS)).clamp_(0.0, 1.0)


def minmax_norm_np(x: np.ndarray, axis: tuple[int, ...] | None = None) -> np.ndarray:
    """numpy twin of :func:`minmax_norm` (keeps the input dtype)."""
    lo = x.min(axis=axis, keepdims=True)
    hi = x.max(axis=axis, keepdims=True)
    y = (x - lo) / (hi - lo + _EPS)
    return np.clip(y, 0.0, 1.0, out=y)


def smooth_matlab(a: np.ndarray, window: int) -> np.ndarray:
    """Moving average with MATLAB ``smooth`` edges (shrinking odd windows at both ends).

    Matches the published helper for ``len(a) ≥ window``; shorter profiles (which crash the published
    code) use the largest odd window that fits, as MATLAB does.
    """
    a = np.asarray(a, dtype=np.float64)
    n = a.size
    w = min(window, n if n % 2 else n - 1)
    if w <= 1:
        return a.copy()
    mid = np.convolve(a, np.ones(w), "valid") / w
    r = np.arange(1, w - 1, 2)
    start = np.cumsum(a[: w - 1])[::2] / r
    stop = (np.cumsum(a[:-w:-1])[::2] / r)[::-1]
    return np.concatenate((start, mid, stop))


def intensity_profile(widefield: np.ndarray, threshold_pct: float, window: int = 11) -> np.ndarray:
    """Relative brightness of each plane: mean of its pixels above the ``threshold_pct`` percentile,
    smoothed along z and scaled to a maximum of 1.

    Used to give the reconstructed planes the slow z-trend of the raw stack (bleaching, depth) instead of
    the per-plane normalisation of the network outputs.
    """
    flat = widefield.reshape(widefield.shape[0], -1).astype(np.float64)
    thresh = np.percentile(flat, threshold_pct, axis=1, keepdims=True)
    above = flat > thresh
    # A flat plane has no pixel strictly above its percentile; fall back to ≥ so it gets its own level.
    above = np.where(above.any(axis=1, keepdims=True), above, flat >= thresh)
    prof = (flat * above).sum(axis=1) / above.sum(axis=1)
    prof = smooth_matlab(prof, window)
    top = prof.max()
    return prof / top if top > 0 else np.ones_like(prof)


def percentile_rows(flat: torch.Tensor, pct: float) -> torch.Tensor:
    """``numpy.percentile(flat, pct, axis=1)`` (linear method) of a 2-D tensor, on its device.

    Two order statistics per row (``kthvalue``) instead of a sort; no size limit (``torch.quantile`` refuses
    more than 2**24 elements).
    """
    n = flat.shape[1]
    pos = pct / 100.0 * (n - 1)
    lo = int(math.floor(pos))
    frac = pos - lo
    v_lo = flat.kthvalue(lo + 1, dim=1).values
    if frac == 0.0 or lo + 1 >= n:
        return v_lo
    v_hi = flat.kthvalue(lo + 2, dim=1).values
    return torch.lerp(v_lo, v_hi, frac)


def intensity_profile_tensor(widefield: torch.Tensor, threshold_pct: float, window: int = 11) -> torch.Tensor:
    """:func:`intensity_profile` of a tensor: the per-pixel work on its device, the smoothing of the
    (one number per plane) profile on the host; returns a float64 tensor on the input's device."""
    from engines.device import probe_to_host

    flat = widefield.reshape(widefield.shape[0], -1).to(torch.float64)
    thresh = percentile_rows(flat, threshold_pct)[:, None]
    above = flat > thresh
    # A flat plane has no pixel strictly above its percentile; fall back to ≥ so it gets its own level.
    above = torch.where(above.any(dim=1, keepdim=True), above, flat >= thresh)
    prof = (flat * above).sum(dim=1) / above.sum(dim=1)
    prof = smooth_matlab(probe_to_host(prof), window)
    top = prof.max()
    prof = prof / top if top > 0 else np.ones_like(prof)
    return torch.from_numpy(prof).to(widefield.device)


class Recombiner:
    """Pre-built Wiener filters for one SR image size.

    Parameters
    ----------
    otfs
        Decoded OTFs (:class:`engines.vsisr.otf.OTFSet`).
    height, width
        SR plane size (1.5 × the input plane).
    otf_weight, wiener, apo_factor
        Weight of the side-band OTFs in each orientation's numerator, Wiener constant σ, apodisation power.
    device
        torch device the filters live on.
    """

    def __init__(
        self, otfs: OTFSet, height: int, width: int, otf_weight: float, wiener: float, apo_factor: float,
        device: torch.device | str = "cpu",
    ) -> None:
        self.height, self.width = height, width
        self.device = torch.device(device)
        apo = resize_cubic(otfs.apo ** apo_factor, height, width)
        otf0 = resize_cubic(otfs.otf0, height, width)
        # The shipped side-band OTF is extended along rows; turned 90° it matches the 0° orientation.
        base = ndimage.rotate(otfs.otf1, 90, order=3)
        side = []
        for i in range(N_ANGLES):
            ang = i * ANGLE_STEP_DEG
            turned = base if ang == 0 else ndimage.rotate(base, -ang, reshape=False, order=3)
            side.append(resize_cubic(turned, height, width))
        den = otf0 + sum(side) + wiener**2
        filt = torch.stack([(otf0 + otf_weight * s) / den for s in side])
        wf = (N_ANGLES - 1) * otf0 * apo / den
        # The published code multiplies fftshift-ed spectra; shifting the filters once is equivalent.
        self.band_filters = torch.fft.ifftshift(filt, dim=(-2, -1)).to(self.device)
        self.wf_filter = torch.fft.ifftshift(wf, dim=(-2, -1)).to(self.device)

    def __call__(self, widefield: torch.Tensor, bands: torch.Tensor) -> torch.Tensor:
        """Recombine a batch of planes.

        Parameters
        ----------
        widefield
            ``(B, H, W)`` input planes in [0, 1] (before the 1.5× enlargement).
        bands
            ``(B, 3, 1.5H, 1.5W)`` network outputs at 0°, 60°, 120°, in the input frame.

        Returns
        -------
        torch.Tensor
            ``(B, 1.5H, 1.5W)`` float64, each plane scaled to the mean of its 0° band.
        """
        wf = resize_cubic(widefield.to(self.device), self.height, self.width)
        bands = bands.to(self.device, torch.float64)
        im_mean = bands[:, 0].mean(dim=(-2, -1))
        b = minmax_norm(bands, (-2, -1))
        spec = (self.band_filters * torch.fft.fft2(b)).sum(dim=1) - self.wf_filter * torch.fft.fft2(wf)
        sr = torch.fft.ifft2(spec).real.clamp_(min=0.0)
        sr = minmax_norm(sr, (-2, -1))
        mean = sr.mean(dim=(-2, -1))
        scale = torch.where(mean > 0, im_mean / mean.clamp(min=1e-30), torch.zeros_like(mean))
        return sr * scale[:, None, None]


def adjust_intensity(sr: torch.Tensor, level: torch.Tensor, threshold_pct: float) -> torch.Tensor:
    """Scale each plane so the mean of its pixels above ``threshold_pct`` equals ``level`` (per plane)."""
    out = torch.empty_like(sr)
    q = threshold_pct / 100.0
    for k in range(sr.shape[0]):
        plane = sr[k]
        # per plane: torch.quantile refuses inputs above 2**24 elements, a whole batch could exceed that
        thresh = torch.quantile(plane.flatten(), q)
        mask = plane > thresh
        if not bool(mask.any()):
            mask = plane >= thresh
        m = plane[mask].mean()
        out[k] = plane * (level[k] / m) if float(m) > 0 else plane
    return out
