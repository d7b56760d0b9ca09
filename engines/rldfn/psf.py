"""PSFs of the two views: from a measured bead stack or a computed model, rotated by ± the objective angle.

In reflective lattice light-sheet microscopy the detection objective sees the sample directly (view A) and
through the coverslip mirror (view B). After step 3 (rotation and calibration) both views lie on one grid and
each view's PSF is the detection PSF with its long (axial) axis tilted by the objective angle, one view each
way, in the Z–X plane. The reference ships such a pair (``PSF_A1.tif`` / ``PSF_B1.tif``) that we do not have;
:func:`dual_view_psfs` makes one from any single-view PSF.

Convention: view A is rotated by ``+angle`` (its long axis leans from +Z towards +X), view B by ``−angle``.
If the fused result looks doubled, the views' PSFs are swapped — exchange them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from engines.rldfn.errors import VolumeShapeError


def _border_median(psf: np.ndarray) -> float:
    shell = np.concatenate([psf[[0, -1]].ravel(), psf[:, [0, -1]].ravel(), psf[:, :, [0, -1]].ravel()])
    return float(np.median(shell))


def clean_psf(psf: np.ndarray, background: float | None = None, size: Sequence[int] | None = None) -> np.ndarray:
    """Make a measured bead stack usable as a PSF: background off, centred on the bead, unit sum.

    Parameters
    ----------
    psf
        Bead stack (Z, Y, X), camera counts.
    background
        Value to subtract (camera offset plus stray light). Default: median of the stack's outer faces.
    size
        Odd (Z, Y, X) box to cut around the bead's brightest voxel (smoothed, so a hot pixel cannot win);
        default: the largest odd box centred on it that fits in the stack.

    Returns
    -------
    np.ndarray
        float32 PSF, bead at the centre voxel, sums to 1.
    """
    p = np.asarray(psf, dtype=np.float32)
    if p.ndim != 3:
        raise VolumeShapeError(f"a PSF must be a 3-D stack (Z, Y, X), got shape {p.shape}")
    p = np.clip(p - (_border_median(p) if background is None else float(background)), 0, None)
    if not p.any():
        raise VolumeShapeError("the PSF stack holds no signal above its background; is it the right file?")
    peak = np.unravel_index(np.argmax(ndimage.uniform_filter(p, 3)), p.shape)
    if size is None:
        size = [2 * min(c, n - 1 - c) + 1 for c, n in zip(peak, p.shape)]
    if len(size) != 3 or any(int(s) % 2 == 0 or int(s) < 1 for s in size):
        raise VolumeShapeError(f"PSF box size must be three odd numbers, got {tuple(size)}")
    out = np.zeros([int(s) for s in size], np.float32)
    src, dst = [], []
    for c, n, s in zip(peak, p.shape, size):
        h = int(s) // 2
        lo, hi = max(c - h, 0), min(c + h + 1, n)
        src.append(slice(lo, hi))
        dst.append(slice(lo - (c - h), hi - (c - h)))
    out[tuple(dst)] = p[tuple(src)]
    return out / out.sum()


def computed_psf(
    shape: Sequence[int],
    voxel_size_um: Sequence[float],
    emission_nm: float = 525.0,
    na: float = 1.1,
    refractive_index: float = 1.33,
    model: str = "vectorial",
    sheet_fwhm_um: float = 0.0,
) -> np.ndarray:
    """Detection PSF computed with ``psfmodels`` (vectorial by default), times the light sheet; unit sum.

    Parameters
    ----------
    shape
        (Z, Y, X) in voxels; Y and X must be equal and odd.
    voxel_size_um
        (dz, dy, dx) in µm; dy must equal dx.
    emission_nm, na, refractive_index
        As :class:`engines.config.OpticsConfig` (``emission_nm``, ``na_detection``, ``refractive_index``).
    model
        ``"vectorial"``, ``"scalar"`` or ``"gaussian"`` (see ``psfmodels.make_psf``).
    sheet_fwhm_um
        FWHM (µm) of the excitation sheet across its plane, along the detection axis (Z); 0 gives the widefield
        PSF. A widefield PSF carries the same light in every defocused plane, so deconvolving light-sheet data
        with it leaves the axial position of each object to the volume's edges (on simulated beads it moved them
        by up to 0.9 plane); the sheet is what bounds the system PSF along Z.
    """
    try:
        import psfmodels
    except ImportError as err:  # optional dependency
        raise ImportError("computing a PSF needs the 'psfmodels' package (pip install psfmodels)") from err
    nz, ny, nx = (int(s) for s in shape)
    dz, dy, dx = (float(v) for v in voxel_size_um)
    if ny != nx or nx % 2 == 0 or abs(dy - dx) > 1e-9:
        raise VolumeShapeError(f"computed PSF needs odd, square XY ({ny}×{nx}) and dy = dx ({dy} vs {dx} µm)")
    p = psfmodels.make_psf(nz, nx, dxy=dx, dz=dz, NA=na, wvl=emission_nm / 1000.0, ns=refractive_index,
                           ni=refractive_index, ni0=refractive_index, model=model)
    p = np.clip(np.asarray(p, np.float32), 0, None)
    if sheet_fwhm_um > 0:
        z = (np.arange(nz) - (nz - 1) / 2) * dz
        p = p * np.exp(-4 * np.log(2) * (z / float(sheet_fwhm_um)) ** 2).astype(np.float32)[:, None, None]
    return p / p.sum()


def rotate_psf(
    psf: np.ndarray,
    angle_deg: float,
    voxel_size_um: Sequence[float] = (1.0, 1.0, 1.0),
    out_voxel_size_um: Sequence[float] | None = None,
    out_shape: Sequence[int] | None = None,
) -> np.ndarray:
    """Rotate a PSF about the Y axis by ``angle_deg`` (its +Z axis leans towards +X), in physical units.

    Parameters
    ----------
    psf
        (Z, Y, X), centred on its centre voxel (see :func:`clean_psf`).
    angle_deg
        Rotation in degrees.
    voxel_size_um
        Input voxel size (dz, dy, dx) — anisotropic stacks are handled, rotation is done in µm.
    out_voxel_size_um
        Output voxel size; default: the input's. Give the views' voxel size here.
    out_shape
        Output (Z, Y, X); default: an odd box holding the whole rotated input.

    Returns
    -------
    np.ndarray
        float32 PSF centred in ``out_shape``, unit sum (linear interpolation).
    """
    p = np.asarray(psf, dtype=np.float32)
    if p.ndim != 3:
        raise VolumeShapeError(f"a PSF must be a 3-D stack (Z, Y, X), got shape {p.shape}")
    vin = np.asarray(voxel_size_um, float)
    vout = vin if out_voxel_size_um is None else np.asarray(out_voxel_size_um, float)
    if vin.shape != (3,) or vout.shape != (3,) or (vin <= 0).any() or (vout <= 0).any():
        raise VolumeShapeError(f"voxel sizes must be three positive numbers (dz, dy, dx), got {vin} and {vout}")
    t = np.deg2rad(angle_deg)
    # rotation of physical (z, y, x) vectors: e_z → (cos t, 0, sin t)
    rot = np.array([[np.cos(t), 0, -np.sin(t)], [0, 1, 0], [np.sin(t), 0, np.cos(t)]])
    c_in = (np.array(p.shape) - 1) / 2
    if out_shape is None:
        half = (np.array(p.shape) - 1) / 2 * vin
        corners = np.array([[sz * half[0], sy * half[1], sx * half[2]]
                            for sz in (-1, 1) for sy in (-1, 1) for sx in (-1, 1)])
        reach = np.abs(corners @ rot.T).max(axis=0) / vout
        out_shape = tuple(2 * int(np.ceil(r)) + 1 for r in reach)
    out_shape = tuple(int(s) for s in out_shape)
    c_out = (np.array(out_shape) - 1) / 2
    # affine_transform maps output index → input index: in = diag(1/vin) · R⁻¹ · diag(vout) · (out − c_out) + c_in
    matrix = np.diag(1 / vin) @ rot.T @ np.diag(vout)
    offset = c_in - matrix @ c_out
    out = ndimage.affine_transform(p, matrix, offset=offset, output_shape=out_shape, order=1, mode="constant")
    out = np.clip(out, 0, None).astype(np.float32)
    total = out.sum()
    if total <= 0:
        raise VolumeShapeError("the rotated PSF is empty; is out_shape far too small for the PSF?")
    return out / total


def dual_view_psfs(
    psf: np.ndarray,
    angle_deg: float,
    voxel_size_um: Sequence[float] = (1.0, 1.0, 1.0),
    out_voxel_size_um: Sequence[float] | None = None,
    out_shape: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The two views' PSFs: ``psf`` rotated by ``+angle_deg`` (view A) and ``−angle_deg`` (view B).

    See :func:`rotate_psf` for the parameters; ``angle_deg`` is the objective angle
    (:attr:`engines.config.OpticsConfig.objective_angle_deg`, 30.8° on the reference system).
    """
    a = rotate_psf(psf, +angle_deg, voxel_size_um, out_voxel_size_um, out_shape)
    b = rotate_psf(psf, -angle_deg, voxel_size_um, out_voxel_size_um, a.shape)
    return a, b
