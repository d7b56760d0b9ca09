"""Coordinates of the reflective sample-scan geometry, and rendering of point lists onto grids.

Three frames are used, all linear in each other:

*mirror frame* ``(a, y, h)`` in µm
    ``a`` along the mirror in the stage-scan direction, ``y`` along the camera rows, ``h`` height above the
    mirror (the reflective coverslip). The sample lives at ``h > 0``; its mirror image is ``h → −h``.
*deskewed frame* ``(k, y, x)`` in voxels
    the grid :func:`engines.deskew.deskew` produces (cudaDecon geometry): plane ``k`` at ``k·dz·|sin θ|``
    along the detection axis, rows and columns at the pixel size. It is Cartesian and aligned with the
    detection objective, so the detection PSF is axis-aligned in it.
*raw frame* ``(k, v, u)`` in pixels
    what the camera records: plane ``k`` is the sample moved by ``k·dz`` along the stage; columns ``u`` are
    the skew axis, ``x = u + f·(k − nz/2) + (nx_out − nx)/2`` with ``f = dz·cos θ / dx``.

The mirror is the plane ``h = 0``. The stage moves along it, so in every raw frame it crosses the same
column ``u_m`` (the line of the epi-fluorescence band), and after deskew it is a plane tilted by θ against
the deskewed x axis; rotating by the objective angle about y makes it horizontal (the reconstruction's Step 3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from engines.deskew import deskewed_width, shear_factor
from engines.simulate.config import SimConfig


@dataclass(frozen=True)
class Geometry:
    """Mappings between the mirror, deskewed and raw frames of one stack shape."""

    nz: int
    ny: int
    nx: int
    dx_um: float
    dz_um: float
    angle_deg: float
    mirror_column: float  # u_m, raw column of the mirror line (pixel centres at integers)
    virtual_high: bool

    @classmethod
    def from_config(cls, cfg: SimConfig) -> Geometry:
        nz, ny, nx = cfg.shape
        o = cfg.optics
        return cls(nz, ny, nx, o.pixel_size_um, o.stage_step_um, o.skew_angle_deg,
                   cfg.mirror_position * (nx - 1), cfg.virtual_side == "high")

    # --- derived constants ----------------------------------------------------------------------------------
    @property
    def shear(self) -> float:
        """Pixels of shift along the skew axis per plane (signed), as :func:`engines.deskew.shear_factor`."""
        return shear_factor(self.dx_um, self.dz_um, self.angle_deg)

    @property
    def nx_deskewed(self) -> int:
        return deskewed_width(self.nx, self.nz, self.dx_um, self.dz_um, self.angle_deg)

    @property
    def dz_deskewed_um(self) -> float:
        """Spacing of deskewed planes along the detection axis (µm)."""
        return self.dz_um * abs(math.sin(math.radians(self.angle_deg)))

    @property
    def deskewed_shape(self) -> tuple[int, int, int]:
        return (self.nz, self.ny, self.nx_deskewed)

    @property
    def _c0(self) -> float:
        return (self.nx_deskewed - self.nx) / 2.0

    def _axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Unit vectors ŝ (along the mirror) and n̂ (its normal, into the sample) in (Z, X), and the origin P0."""
        s = np.array([self.dz_deskewed_um, self.shear * self.dx_um]) / self.dz_um
        n = np.array([s[1], -s[0]])  # real side at lower X for a virtual image on the high side
        if not self.virtual_high:
            n = -n
        p0 = np.array([0.0, (self.mirror_column + self.shear * (0 - self.nz / 2.0) + self._c0) * self.dx_um])
        return s, n, p0

    # --- frame conversions (arrays of points, last axis = 3) -------------------------------------------------
    def mirror_to_deskewed(self, pts_um: np.ndarray) -> np.ndarray:
        """Mirror-frame points ``(a, y, h)`` µm → fractional deskewed voxel indices ``(k, y, x)``."""
        p = np.asarray(pts_um, dtype=np.float64)
        s, n, p0 = self._axes()
        zx = p0 + p[..., 0:1] * s + p[..., 2:3] * n
        return np.stack([zx[..., 0] / self.dz_deskewed_um, p[..., 1] / self.dx_um, zx[..., 1] / self.dx_um], -1)

    def deskewed_to_mirror(self, idx: np.ndarray) -> np.ndarray:
        """Deskewed voxel indices ``(k, y, x)`` → mirror-frame ``(a, y, h)`` µm."""
        q = np.asarray(idx, dtype=np.float64)
        s, n, p0 = self._axes()
        zx = np.stack([q[..., 0] * self.dz_deskewed_um, q[..., 2] * self.dx_um], -1) - p0
        return np.stack([zx @ s, q[..., 1] * self.dx_um, zx @ n], -1)

    def deskewed_to_raw(self, idx: np.ndarray) -> np.ndarray:
        """Deskewed ``(k, y, x)`` → raw ``(k, v, u)`` (same planes and rows; the columns are sheared back)."""
        q = np.array(idx, dtype=np.float64)
        q[..., 2] = q[..., 2] - self.shear * (q[..., 0] - self.nz / 2.0) - self._c0
        return q

    def raw_to_deskewed(self, idx: np.ndarray) -> np.ndarray:
        """Raw ``(k, v, u)`` → deskewed ``(k, y, x)``."""
        q = np.array(idx, dtype=np.float64)
        q[..., 2] = q[..., 2] + self.shear * (q[..., 0] - self.nz / 2.0) + self._c0
        return q

    def mirror_to_raw(self, pts_um: np.ndarray) -> np.ndarray:
        return self.deskewed_to_raw(self.mirror_to_deskewed(pts_um))

    def raw_to_mirror(self, idx: np.ndarray) -> np.ndarray:
        return self.deskewed_to_mirror(self.raw_to_deskewed(idx))

    def reflect(self, pts_um: np.ndarray) -> np.ndarray:
        """Mirror image of mirror-frame points (``h → −h``): where the camera sees the virtual image."""
        p = np.array(pts_um, dtype=np.float64)
        p[..., 2] = -p[..., 2]
        return p

    # --- the mirror and its band ----------------------------------------------------------------------------
    def mirror_deskewed_x(self, k: np.ndarray | float) -> np.ndarray:
        """Deskewed column where the mirror plane crosses plane(s) ``k``."""
        return self.mirror_column + self.shear * (np.asarray(k, dtype=np.float64) - self.nz / 2.0) + self._c0

    def height_of_raw_column(self, u: np.ndarray | float) -> np.ndarray:
        """Height above the mirror (µm, negative on the virtual side) imaged by raw column ``u``."""
        sign = -1.0 if self.virtual_high else 1.0
        sin = abs(math.sin(math.radians(self.angle_deg)))
        return sign * (np.asarray(u, dtype=np.float64) - self.mirror_column) * self.dx_um * sin

    def raw_column_of_height(self, h: np.ndarray | float) -> np.ndarray:
        sign = -1.0 if self.virtual_high else 1.0
        sin = abs(math.sin(math.radians(self.angle_deg)))
        return self.mirror_column + sign * np.asarray(h, dtype=np.float64) / (self.dx_um * sin)

    def mirror_range_um(self, heights: tuple[float, float]) -> tuple[float, float]:
        """Range of ``a`` the scanned stack covers for heights within ``heights`` (union over the corners)."""
        corners = []
        for h in heights:
            u = float(self.raw_column_of_height(h))
            for k in (0.0, self.nz - 1.0):
                corners.append(self.raw_to_mirror(np.array([k, 0.0, u]))[0])
        return (min(corners), max(corners))


def splat(shape: tuple[int, int, int], idx: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Render weighted points at fractional voxel indices onto a float32 grid by trilinear splatting.

    Trilinear weights conserve each point's total and its centroid exactly, so a point's rendered image
    (after a symmetric blur) is centred on its true sub-voxel position. Points partly outside lose the
    corners that fall outside.
    """
    idx = np.asarray(idx, dtype=np.float64).reshape(-1, 3)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    nz, ny, nx = shape
    if idx.size == 0:
        return np.zeros(shape, dtype=np.float32)
    base = np.floor(idx).astype(np.int64)
    frac = idx - base
    flats, vals = [], []
    for dz in (0, 1):
        wz = frac[:, 0] if dz else 1.0 - frac[:, 0]
        iz = base[:, 0] + dz
        for dy in (0, 1):
            wy = frac[:, 1] if dy else 1.0 - frac[:, 1]
            iy = base[:, 1] + dy
            for dxx in (0, 1):
                wx = frac[:, 2] if dxx else 1.0 - frac[:, 2]
                ix = base[:, 2] + dxx
                ok = (iz >= 0) & (iz < nz) & (iy >= 0) & (iy < ny) & (ix >= 0) & (ix < nx)
                flats.append((iz[ok] * ny + iy[ok]) * nx + ix[ok])
                vals.append((w * wz * wy * wx)[ok])
    # Sum per occupied voxel (float64, in input order), then write into a zero grid: emitters touch a small
    # fraction of the voxels, so a grid-sized float64 accumulator would cost more than the sums themselves.
    occupied, where = np.unique(np.concatenate(flats), return_inverse=True)
    sums = np.bincount(where, weights=np.concatenate(vals), minlength=len(occupied))
    out = np.zeros(nz * ny * nx, dtype=np.float32)
    out[occupied] = sums
    return out.reshape(shape)
