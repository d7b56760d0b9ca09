"""Losses and quality metrics used to train and validate VSI-SR.

The generator loss follows the published training recipe: for every output channel both images are
min–max normalised, then ``MSE + w_ssim·(1 − SSIM) + w_fft·MSE(|F|^0.1)`` where ``|F|`` is the centred
magnitude spectrum of the edge-apodised image; the per-channel losses are averaged. The validation PSNR is
computed only on the foreground of the ground truth (a band-pass mask), after a least-squares affine fit
of the prediction to the ground truth, as in the published evaluation.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from torch.nn import functional as F

__all__ = [
    "VSISRLoss",
    "affine_match",
    "apodize_edges",
    "foreground_mask",
    "masked_psnr",
    "percentile_norm",
    "spectrum_magnitude",
    "ssim",
    "tv_loss",
]


def apodize_edges(img: torch.Tensor, width: int = 10) -> torch.Tensor:
    """Blend opposite borders of ``(N, C, H, W)`` images so the FFT sees no wrap-around step.

    The first and last ``width`` rows (then columns) are pulled towards their mutual mean with a
    ``1 − sin`` ramp, the same apodisation the published loss applies before its spectrum term.
    """
    _, _, ny, nx = img.shape
    width = min(width, ny // 2, nx // 2)
    if width < 1:
        return img
    ramp = 1.0 - torch.sin((torch.arange(width, dtype=img.dtype, device=img.device) + 0.5) / width * math.pi / 2)
    top, bottom = img[:, :, :width, :], img[:, :, ny - width:, :]
    delta = (bottom.flip(2) - top) / 2 * ramp.view(1, 1, -1, 1)
    img = torch.cat([top + delta, img[:, :, width:ny - width, :], bottom - delta.flip(2)], dim=2)
    left, right = img[:, :, :, :width], img[:, :, :, nx - width:]
    delta = (right.flip(3) - left) / 2 * ramp.view(1, 1, 1, -1)
    return torch.cat([left + delta, img[:, :, :, width:nx - width], right - delta.flip(3)], dim=3)


def spectrum_magnitude(img: torch.Tensor) -> torch.Tensor:
    """Centred ``|FFT2|^0.1`` of apodised ``(N, C, H, W)`` images (the power compresses the DC peak)."""
    spec = torch.fft.fft2(apodize_edges(img))
    return torch.fft.fftshift((spec.abs() + 1e-8) ** 0.1, dim=(-2, -1))


def _gauss_window(size: int, sigma: float, channels: int, like: torch.Tensor) -> torch.Tensor:
    x = torch.arange(size, dtype=like.dtype, device=like.device) - size // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean structural similarity of two ``(N, C, H, W)`` images in [0, 1] (Gaussian window, zero padding)."""
    c = a.shape[1]
    w = _gauss_window(window, sigma, c, a)
    pad = window // 2
    mu_a = F.conv2d(a, w, padding=pad, groups=c)
    mu_b = F.conv2d(b, w, padding=pad, groups=c)
    var_a = F.conv2d(a * a, w, padding=pad, groups=c) - mu_a**2
    var_b = F.conv2d(b * b, w, padding=pad, groups=c) - mu_b**2
    cov = F.conv2d(a * b, w, padding=pad, groups=c) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return (num / den).mean()


def _minmax(x: torch.Tensor) -> torch.Tensor:
    # Over the whole batch, as the published loss does; the epsilon only guards a constant image.
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo + 1e-12)


class VSISRLoss(torch.nn.Module):
    """``MSE + ssim_weight·(1 − SSIM) + fft_weight·spectrum MSE``, per output channel, averaged.

    Parameters
    ----------
    ssim_weight, fft_weight
        Published defaults 0.1 and 1.0; 0 switches a term off.
    """

    def __init__(self, ssim_weight: float = 0.1, fft_weight: float = 1.0) -> None:
        super().__init__()
        self.ssim_weight = ssim_weight
        self.fft_weight = fft_weight

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of ``pred`` against ``target``, both ``(N, C, H, W)``."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        total = pred.new_zeros(())
        for ch in range(pred.shape[1]):
            p = _minmax(pred[:, ch:ch + 1])
            t = _minmax(target[:, ch:ch + 1])
            term = torch.mean((p - t) ** 2)
            if self.ssim_weight > 0:
                term = term + self.ssim_weight * (1 - ssim(t, p))
            if self.fft_weight > 0:
                term = term + self.fft_weight * torch.mean((spectrum_magnitude(p) - spectrum_magnitude(t)) ** 2)
            total = total + term
        return total / pred.shape[1]


def percentile_norm(x: np.ndarray, lo: float = 0.0, hi: float = 100.0) -> np.ndarray:
    """Scale ``x`` so its ``lo``/``hi`` percentiles map to 0/1, clipped to [0, 1]."""
    a, b = np.percentile(x, [lo, hi])
    return np.clip((x - a) / (b - a + 1e-7), 0.0, 1.0).astype(np.float32)


def foreground_mask(img: np.ndarray, thresh: float = 0.01, fine_sigma: float = 11.0,
                    coarse_sigma: float = 50.0) -> np.ndarray:
    """Foreground of a 2-D image in [0, 1]: a fine blur minus a coarse background blur above ``thresh``.

    Kernel radii (5 and 50 pixels) and mirror borders match the published mask, so PSNRs are comparable.
    """
    img = np.asarray(img, dtype=np.float64)
    fine = gaussian_filter(img, fine_sigma, mode="mirror", truncate=5.0 / fine_sigma)
    coarse = gaussian_filter(img, coarse_sigma, mode="mirror", truncate=50.0 / coarse_sigma)
    return (fine - coarse) >= thresh


def affine_match(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Least-squares ``a·pred + b`` closest to ``gt`` (removes the network's arbitrary intensity scale)."""
    x = pred.ravel().astype(np.float64)
    design = np.stack([x, np.ones_like(x)], axis=1)
    coef, *_ = np.linalg.lstsq(design, gt.ravel().astype(np.float64), rcond=None)
    return (coef[0] * pred + coef[1]).astype(np.float32)


def masked_psnr(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> float:
    """PSNR in dB over the pixels where ``mask`` is true (peak 1 for data in [0, 1])."""
    m = mask.astype(bool)
    if not m.any():
        raise ValueError("masked PSNR: the foreground mask is empty (ground truth has no structure above threshold)")
    mse = float(np.mean((pred[m] - gt[m]) ** 2))
    if mse == 0:
        return 100.0
    peak = max(1.0, float(np.max(pred * m)))
    return 20 * math.log10(peak / math.sqrt(mse))


def tv_loss(vol: torch.Tensor, axial_weight: float = 5.0) -> torch.Tensor:
    """Squared total variation of ``(N, C, Z, Y, X)`` volumes, the axial term weighted ``axial_weight``×.

    Each direction's sum of squared neighbour differences is divided by its number of difference planes,
    then scaled by 3 and divided by the batch size, as in the published RL-DFN regulariser.
    """
    dz = (vol[:, :, 1:] - vol[:, :, :-1]).pow(2).sum() / max(vol.shape[2] - 1, 1)
    dy = (vol[:, :, :, 1:] - vol[:, :, :, :-1]).pow(2).sum() / max(vol.shape[3] - 1, 1)
    dx = (vol[..., 1:] - vol[..., :-1]).pow(2).sum() / max(vol.shape[4] - 1, 1)
    return 3 * (dy + dx + axial_weight * dz) / vol.shape[0]
