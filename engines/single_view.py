"""Ordinary (single-view) lattice light-sheet data: deskew → optional lateral SR → Richardson–Lucy.

Most LLSM data have no mirror: there is one view, the deskewed volume itself, sampled at (stage step ·
sin(skew angle), pixel, pixel) and blurred by the detection PSF whose long axis lies along its z. This mode
deconvolves that volume with Richardson–Lucy (:func:`engines.rldfn.classical.weighted_rl` with one view,
coverage-weighted so the deskew's empty wedges neither pull the estimate down nor ring at their edges) and a
PSF on the volume's own grid: a measured bead stack resampled to it, or one computed from NA, emission
wavelength and refractive index. When VSI-SR weights are given, the planes are super-resolved laterally
first (1.5× finer pixels) and the PSF is made for that grid.

The output keeps the deskewed geometry (as cudaDecon's does): anisotropic voxels ``(dz, dx, dx)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from engines.config import OpticsConfig
from engines.rldfn.errors import VolumeShapeError

#: Lateral half-size of a computed PSF, in µm (holds the main lobe and the first rings at NA ≥ 0.8).
PSF_HALF_LATERAL_UM = 1.2
#: Axial half-size of a computed PSF, in µm.
PSF_HALF_AXIAL_UM = 2.4


def single_view_voxel_um(optics: OpticsConfig, lateral_sr: bool, sr_scale: float = 1.5) -> tuple[float, float, float]:
    """(dz, dy, dx) of the deskewed volume (after lateral SR when ``lateral_sr``), µm."""
    dx = optics.pixel_size_um / (sr_scale if lateral_sr else 1.0)
    return (float(optics.deskewed_pixel_z_um), float(dx), float(dx))


def _odd(n: float) -> int:
    k = max(3, int(np.ceil(n)))
    return k if k % 2 else k + 1


def single_view_psf(
    optics: OpticsConfig,
    voxel_um: Sequence[float],
    psf: np.ndarray | None = None,
    psf_voxel_um: Sequence[float] | None = None,
) -> np.ndarray:
    """The detection PSF on the deskewed grid ``voxel_um`` = (dz, dy, dx), unit sum, centred in an odd box.

    Parameters
    ----------
    optics
        NA, emission wavelength and refractive index for a computed PSF.
    voxel_um
        Voxel size of the volume to deconvolve.
    psf
        A measured bead stack (Z, Y, X), detection axis along Z, camera offset included or not (its border
        median is subtracted); None computes the PSF.
    psf_voxel_um
        Voxel size of ``psf``; default ``voxel_um``.
    """
    from engines.rldfn.psf import clean_psf, computed_psf, rotate_psf

    vz, vy, vx = (float(v) for v in voxel_um)
    box = (_odd(2 * PSF_HALF_AXIAL_UM / vz), _odd(2 * PSF_HALF_LATERAL_UM / vy), _odd(2 * PSF_HALF_LATERAL_UM / vx))
    if psf is None:
        return computed_psf(box, (vz, vy, vx), optics.emission_nm, optics.na_detection, optics.refractive_index,
                            sheet_fwhm_um=optics.sheet_fwhm_um)
    cleaned = clean_psf(np.asarray(psf, np.float32))
    return rotate_psf(cleaned, 0.0, tuple(psf_voxel_um) if psf_voxel_um is not None else (vz, vy, vx),
                      (vz, vy, vx), box)


def single_view_rl(volume: torch.Tensor, psf: np.ndarray, iterations: int, coverage: str | None = "auto",
                   progress: Callable[[int, int], None] | None = None,
                   memory_budget_bytes: int | None = None) -> torch.Tensor:
    """Richardson–Lucy of one deskewed (Z, Y, X) volume on its device; returns the estimate there. In blocks when
    the whole volume's would exceed ``memory_budget_bytes`` (:mod:`engines.rldfn.blocked_rl`)."""
    from engines.rldfn.blocked_rl import rl_within

    if volume.ndim != 3 or min(volume.shape) < 1:
        raise VolumeShapeError(f"a single view must be a non-empty 3-D stack (Z, Y, X), got {tuple(volume.shape)}")
    if int(iterations) < 1:
        raise VolumeShapeError(f"iterations must be ≥ 1, got {iterations}")
    return rl_within([volume], [psf], int(iterations), coverage, memory_budget_bytes, progress)


def deconvolve_single_view(volume: np.ndarray | torch.Tensor, psf: np.ndarray, iterations: int = 30,
                           device: str | torch.device | None = None, coverage: str | None = "auto",
                           progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """numpy wrapper of :func:`single_view_rl`: float32 result of the volume's shape, in its units."""
    from engines.device import pick_device

    dev = pick_device(str(device) if device is not None else None)
    t = volume if isinstance(volume, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(volume, np.float32))
    out = single_view_rl(t.to(dev), np.asarray(psf, np.float32), iterations, coverage, progress)
    return out.cpu().numpy().astype(np.float32)
