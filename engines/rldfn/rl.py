"""Dual-view Richardson–Lucy step of RL-DFN, computed with FFTs in float32.

The step turns each view into a *correction volume* (the back-projected ratio of the view to the blurred
current estimate); RL-DFN's networks fuse the two correction volumes. It is computed exactly as the reference
computes it, so that trained reference weights see the inputs they were trained on:

1. Each PSF is centred in, cropped to or zero-padded to the patch size (:func:`align_center`), then scaled to
   unit sum (after cropping).
2. ``OTF = FFT(PSF)`` of the centred PSF; a convolution is ``ifftshift(real(IFFT(FFT(x)·OTF)))`` — the
   ``ifftshift`` undoes the PSF sitting at the array centre rather than at index 0. Convolutions are circular
   (they wrap around the patch edges), which is why the reference and our tiling give patches a margin.
3. ``blur = conv(estimate, PSF) + 1e-5``; ``ratio = max(view / blur, 1e-5)``;
   ``correction = conv(ratio, PSF)``.

Two properties of the reference kept on purpose (documented in docs/fusion.md):

* the back-projection uses the PSF itself, **not** the flipped PSF of textbook Richardson–Lucy; the two
  agree only for point-symmetric PSFs;
* the first estimate is the mean of the two views.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

#: Added to the blurred estimate before dividing, and lower bound of the ratio (the reference's 1e-5).
EPS = 1e-5


def _centre_offset(big: int, small: int) -> int:
    # Python's round() rounds halves to even; the reference centres with it, so an odd size difference puts
    # the extra voxel on a side that depends on the sizes. Using the same rounding keeps the PSF centre — and
    # therefore every output voxel — where the reference has it.
    return int(round((big - small) / 2))


def align_center(arr: np.ndarray | torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Centre a 3-D array in ``shape``: zero-pad where it is smaller, crop where it is larger.

    Parameters
    ----------
    arr
        3-D array (Z, Y, X).
    shape
        Target (Z, Y, X).

    Returns
    -------
    torch.Tensor
        float32 tensor of ``shape`` on the device of ``arr`` (CPU for numpy input).
    """
    t = torch.as_tensor(np.asarray(arr, dtype=np.float32) if isinstance(arr, np.ndarray) else arr).float()
    if t.ndim != 3 or len(shape) != 3:
        raise ValueError(f"align_center expects a 3-D array and a 3-D shape, got {tuple(t.shape)} → {tuple(shape)}")
    big = [max(int(n), int(s)) for n, s in zip(t.shape, shape)]
    canvas = torch.zeros(big, dtype=torch.float32, device=t.device)
    o = [_centre_offset(b, n) for b, n in zip(big, t.shape)]
    canvas[o[0]:o[0] + t.shape[0], o[1]:o[1] + t.shape[1], o[2]:o[2] + t.shape[2]] = t
    o = [_centre_offset(b, int(s)) for b, s in zip(big, shape)]
    return canvas[o[0]:o[0] + shape[0], o[1]:o[1] + shape[1], o[2]:o[2] + shape[2]].contiguous()


def psf_to_otf(psf: np.ndarray | torch.Tensor, shape: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """OTF of ``psf`` for patches of ``shape``: centred, cropped/padded, unit sum, then FFT (complex64).

    Raises
    ------
    ValueError
        When the PSF sums to zero (or less) inside the patch — an empty or background-only PSF file.
    """
    aligned = align_center(psf, shape)
    total = float(aligned.sum())
    if not np.isfinite(total) or total <= 0:
        raise ValueError(
            f"PSF of size {tuple(np.shape(psf))} sums to {total:g} inside a {tuple(shape)} patch; "
            "a PSF must be positive (subtract the camera offset but keep the bead)"
        )
    aligned = aligned / total
    if device is not None:
        aligned = aligned.to(device)
    return torch.fft.fftn(aligned)


def _conv(x: torch.Tensor, otf: torch.Tensor) -> torch.Tensor:
    """Circular convolution with a centred PSF given by its OTF, over the last three axes."""
    dims = (-3, -2, -1)
    return torch.fft.ifftshift(torch.fft.ifftn(torch.fft.fftn(x, dim=dims) * otf, dim=dims).real, dim=dims)


def rl_corrections(
    view_a: torch.Tensor,
    view_b: torch.Tensor,
    estimate: torch.Tensor,
    otf_a: torch.Tensor,
    otf_b: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One dual-view Richardson–Lucy step: the two correction volumes for ``estimate``.

    Parameters
    ----------
    view_a, view_b
        The two views, ``(..., Z, Y, X)`` float32, same shape.
    estimate
        Current estimate of the object, same shape (RL-DFN uses ``(view_a + view_b) / 2``).
    otf_a, otf_b
        OTFs from :func:`psf_to_otf` for this ``(Z, Y, X)``.

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        ``conv(max(view / (conv(estimate, psf) + eps), eps), psf)`` for each view.
    """
    if view_a.shape != view_b.shape or view_a.shape != estimate.shape:
        raise ValueError(
            f"views and estimate must have one shape, got A {tuple(view_a.shape)}, B {tuple(view_b.shape)}, "
            f"estimate {tuple(estimate.shape)}"
        )
    if tuple(otf_a.shape) != tuple(view_a.shape[-3:]) or tuple(otf_b.shape) != tuple(view_a.shape[-3:]):
        raise ValueError(
            f"OTFs {tuple(otf_a.shape)} / {tuple(otf_b.shape)} were made for another patch size than "
            f"{tuple(view_a.shape[-3:])}"
        )
    dims = (-3, -2, -1)
    spectrum = torch.fft.fftn(estimate, dim=dims)  # shared by both views' forward projections
    out = []
    for view, otf in ((view_a, otf_a), (view_b, otf_b)):
        blur = torch.fft.ifftshift(torch.fft.ifftn(spectrum * otf, dim=dims).real, dim=dims) + EPS
        ratio = torch.clamp(view / blur, min=EPS)
        out.append(_conv(ratio, otf))
    return out[0], out[1]


# --- the registered (non-reference) step ------------------------------------------------------------------------
#
# With an even patch and an odd PSF box, ``align_center`` puts the PSF's centre voxel at N/2 − 1 on an axis
# where ``ifftshift`` expects it at N/2: every convolution above moves the volume by one voxel along each such
# axis, and the correction volumes (blurred twice) come out about one voxel off their views. The functions
# below put the PSF's centre voxel at index 0 of the FFT instead, so a convolution moves nothing, and let each
# view count only where it has data (:mod:`engines.rldfn.coverage`). They are used wherever reference parity
# is not asked for (tiled fusion); ``tile="none"`` keeps the reference's own math, bit for bit.


def exact_otf(psf: np.ndarray | torch.Tensor, shape: Sequence[int],
              device: torch.device | str | None = None) -> torch.Tensor:
    """OTF (complex64, ``shape``) of ``psf`` with its centre voxel (``n // 2`` per axis) at index 0, unit sum.

    A PSF larger than ``shape`` is cropped around its centre; a convolution with this OTF shifts nothing.
    """
    p = torch.as_tensor(np.asarray(psf, np.float32) if isinstance(psf, np.ndarray) else psf).float()
    if p.ndim != 3 or len(shape) != 3:
        raise ValueError(f"exact_otf expects a 3-D PSF and a 3-D shape, got {tuple(p.shape)} → {tuple(shape)}")
    crop = []
    for n, s in zip(p.shape, shape):
        lo = max(n // 2 - int(s) // 2, 0)
        crop.append(slice(lo, lo + min(n, int(s))))
    centre = [n // 2 - c.start for n, c in zip(p.shape, crop)]
    p = p[tuple(crop)]
    total = float(p.sum())
    if not np.isfinite(total) or total <= 0:
        raise ValueError(
            f"PSF of size {tuple(np.shape(psf))} sums to {total:g} inside a {tuple(shape)} patch; "
            "a PSF must be positive (subtract the camera offset but keep the bead)"
        )
    canvas = torch.zeros(tuple(int(s) for s in shape), dtype=torch.float32)
    canvas[: p.shape[0], : p.shape[1], : p.shape[2]] = torch.clamp(p, min=0) / total
    canvas = torch.roll(canvas, [-c for c in centre], dims=(0, 1, 2))
    if device is not None:
        canvas = canvas.to(device)
    return torch.fft.fftn(canvas)


def rl_corrections_registered(
    view_a: torch.Tensor,
    view_b: torch.Tensor,
    otf_a: torch.Tensor,
    otf_b: torch.Tensor,
    weight_a: torch.Tensor | None = None,
    weight_b: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The dual-view RL step with OTFs from :func:`exact_otf` (no shift) and optional coverage weights.

    The first estimate is the coverage-weighted mean of the views (their plain mean without weights); each
    view's ratio is ``1 + w · (view / blur − 1)`` — neutral where the view has no data — and is back-projected
    with the adjoint (flipped) PSF. Shapes as :func:`rl_corrections`; weights broadcast against the views.
    """
    if view_a.shape != view_b.shape:
        raise ValueError(f"views must have one shape, got A {tuple(view_a.shape)}, B {tuple(view_b.shape)}")
    dims = (-3, -2, -1)
    if weight_a is None or weight_b is None:
        estimate = (view_a + view_b) / 2
    else:
        wsum = weight_a + weight_b
        mean = (view_a + view_b) / 2
        estimate = torch.where(wsum > 1e-3, (weight_a * view_a + weight_b * view_b) / torch.clamp(wsum, min=1e-6), mean)
    spectrum = torch.fft.fftn(estimate, dim=dims)
    out = []
    for view, otf, w in ((view_a, otf_a, weight_a), (view_b, otf_b, weight_b)):
        blur = torch.fft.ifftn(spectrum * otf, dim=dims).real + EPS
        ratio = torch.clamp(view / blur, min=EPS)
        if w is not None:
            ratio = 1 + w * (ratio - 1)
        out.append(torch.fft.ifftn(torch.fft.fftn(ratio, dim=dims) * otf.conj(), dim=dims).real)
    return out[0], out[1]
