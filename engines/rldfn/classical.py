"""Classical dual-view fusion: joint Richardson–Lucy deconvolution of both views, no network.

For users without RL-DFN weights. Each iteration updates one estimate of the object from view A, then from
view B (the "sequential" joint RL of multiview light-sheet deconvolution):

``x ← x · (PSFᵀ_v ⊗ (view_v / (PSF_v ⊗ x)))``   for v = A, B

where ``⊗`` is convolution and ``PSFᵀ`` the flipped PSF (textbook RL; the reference's own RL step uses the
unflipped PSF, identical for point-symmetric PSFs). Because each view is sharp along directions where the
other is blurred, the estimate gathers the best resolution of both. Convolutions use real FFTs in float32
on the chosen device; the volume is mirror-padded by at least the PSF's half-size (up to a fast FFT length) so
that the FFT's wrap-around does not bleed one face into the opposite one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from engines.device import pick_device
from engines.rldfn.errors import VolumeShapeError

#: Floor for the blurred estimate and the estimate itself: keeps ratios finite where both are zero.
EPS = 1e-6

_DIMS = (-3, -2, -1)


def centred_otf(psf: np.ndarray, shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """Real-FFT OTF of ``psf`` for volumes of ``shape``, with the PSF's centre voxel moved to index 0.

    The centre is voxel ``n // 2`` of each PSF axis (the centre voxel of an odd-sized PSF); a PSF larger than
    ``shape`` is cropped around it. The PSF is scaled to unit sum so that deconvolution preserves flux.
    """
    p = np.asarray(psf, np.float32)
    if not np.isfinite(p).all():
        # one NaN/Inf voxel would turn every voxel of the fused volume into NaN without any other sign
        raise VolumeShapeError(f"PSF of shape {p.shape} holds NaN or infinite values; is it the right file?")
    p = np.clip(p, 0, None)
    crop = []
    for n, s in zip(p.shape, shape):
        lo = max(n // 2 - s // 2, 0)
        crop.append(slice(lo, lo + min(n, s)))
    p = p[tuple(crop)]
    total = float(p.sum())
    if total <= 0:
        raise VolumeShapeError(f"PSF of shape {np.shape(psf)} has no positive value; is it the right file?")
    canvas = np.zeros(tuple(int(s) for s in shape), np.float32)
    canvas[: p.shape[0], : p.shape[1], : p.shape[2]] = p / total
    canvas = np.roll(canvas, [-(n // 2) for n in p.shape], axis=(0, 1, 2))
    return torch.fft.rfftn(torch.from_numpy(canvas).to(device), dim=_DIMS)


def _pad_widths(shape: Sequence[int], psfs: Sequence[np.ndarray]) -> list[tuple[int, int]]:
    # at least half the largest PSF on each side, then up to a length whose FFT is fast (2·3·5-smooth):
    # an axis of 82 = 2·41 voxels transforms several times slower than one of 90
    from scipy.fft import next_fast_len

    out = []
    for ax, n in enumerate(shape):
        h = max(p.shape[ax] for p in psfs) // 2
        total = next_fast_len(n + 2 * h, real=True) - n
        out.append((total // 2, total - total // 2))
    return out


def classical_fuse(
    view_a: np.ndarray,
    view_b: np.ndarray,
    psf_a: np.ndarray,
    psf_b: np.ndarray,
    iterations: int = 10,
    device: str | torch.device | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Fuse two registered views by joint Richardson–Lucy deconvolution.

    Parameters
    ----------
    view_a, view_b
        The two views on one grid, (Z, Y, X), background already subtracted (negative values are clipped).
    psf_a, psf_b
        The views' PSFs on the same voxel grid, (Z, Y, X), bead at the centre voxel
        (e.g. from :func:`engines.rldfn.psf.dual_view_psfs`).
    iterations
        Joint iterations (each uses both views once). 5–20 is typical; more sharpens and amplifies noise.
    device
        Torch device (default: :func:`engines.device.pick_device`).
    progress
        Called as ``progress(done, total)`` after each iteration.

    Returns
    -------
    np.ndarray
        float32 fused volume of the views' shape, in the views' intensity units.
    """
    from engines.rldfn.fuse import check_views  # one shape check for both modes

    check_views(view_a, view_b)
    for name, p in (("view-A PSF", psf_a), ("view-B PSF", psf_b)):
        if np.ndim(p) != 3:
            raise VolumeShapeError(f"{name} must be a 3-D stack (Z, Y, X), got shape {tuple(np.shape(p))}")
    if int(iterations) < 1:
        raise VolumeShapeError(f"iterations must be ≥ 1, got {iterations}")
    dev = pick_device(str(device) if device is not None else None)
    shape = view_a.shape
    pads = _pad_widths(shape, (psf_a, psf_b))
    views = []
    for v in (view_a, view_b):
        v = np.clip(np.nan_to_num(np.asarray(v, np.float32)), 0, None)
        views.append(torch.from_numpy(np.pad(v, pads, mode="reflect")).to(dev))
    padded = tuple(views[0].shape)
    otfs = [centred_otf(p, padded, dev) for p in (psf_a, psf_b)]

    def conv(x: torch.Tensor, otf: torch.Tensor, adjoint: bool = False) -> torch.Tensor:
        spec = torch.fft.rfftn(x, dim=_DIMS) * (otf.conj() if adjoint else otf)
        return torch.fft.irfftn(spec, s=padded, dim=_DIMS)

    with torch.inference_mode():
        estimate = torch.clamp((views[0] + views[1]) / 2, min=EPS)
        for it in range(int(iterations)):
            for view, otf in zip(views, otfs):
                ratio = view / torch.clamp(conv(estimate, otf), min=EPS)
                estimate = torch.clamp(estimate * conv(ratio, otf, adjoint=True), min=EPS)
            if progress is not None:
                progress(it + 1, int(iterations))
    inner = tuple(slice(lo, lo + n) for (lo, _), n in zip(pads, shape))
    return estimate[inner].cpu().numpy().astype(np.float32)
