"""Rigid rotation of anisotropically sampled volumes onto an isotropic grid (CPU or CUDA, same numbers).

Conventions, used by every caller so that the pieces agree:

* Arrays are (z, y, x); physical coordinates (Z, Y, X) are measured in µm from the centre of the array,
  ``(n − 1)/2`` voxels along each axis.
* :func:`rot_y` (angle *a*): ``Z' = Z·cos a − X·sin a``, ``X' = Z·sin a + X·cos a``. With *a* equal to the
  (signed) skew angle it makes the coverslip/mirror plane of a deskewed volume horizontal: in our deskew
  convention the stage scans along (Z, X) ∝ (sin θ, cos θ), and ``Z'`` of that direction is 0.
* :func:`rot_x` (angle *b*): ``Z' = Z·cos b − Y·sin b``, ``Y' = Z·sin b + Y·cos b``.
* :func:`rotate_plane` applies the same formula to a 2-D (Z, W) image, so a rotation found on a projection
  along x (W = Y) or along y (W = X) is the 3-D rotation about that axis.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where used, so importing this module stays light
    import torch


def rot_y(angle_deg: float) -> np.ndarray:
    """Rotation about y acting on (Z, Y, X) column vectors."""
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    return np.array([[c, 0.0, -s], [0.0, 1.0, 0.0], [s, 0.0, c]])


def rot_x(angle_deg: float) -> np.ndarray:
    """Rotation about x acting on (Z, Y, X) column vectors."""
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def rotated_shape(shape: tuple[int, int, int], spacing: tuple[float, float, float], rot: np.ndarray,
                  out_spacing: float) -> tuple[int, int, int]:
    """Shape of the isotropic grid (spacing ``out_spacing``) that holds the whole rotated volume."""
    half = np.array([(n - 1) / 2.0 * s for n, s in zip(shape, spacing)])
    corners = np.array(np.meshgrid(*[[-h, h] for h in half], indexing="ij")).reshape(3, -1)
    extent = np.abs(rot @ corners).max(axis=1)
    # No parity constraint: an axis the rotation leaves alone keeps its voxel count, so its samples land
    # exactly on the input's (an odd-count rule would shift even axes by half a voxel and blur them).
    return tuple(int(math.ceil(2 * e / out_spacing - 1e-6)) + 1 for e in extent)  # type: ignore[return-value]


def rotate_volume(
    vol: np.ndarray,
    spacing: tuple[float, float, float],
    rot: np.ndarray,
    *,
    out_spacing: float | None = None,
    out_shape: tuple[int, int, int] | None = None,
    device: str | torch.device | None = None,
    z_slices: tuple[int, int] | None = None,
    max_chunk_bytes: int = 64 << 20,
) -> np.ndarray:
    """Resample ``vol`` rotated by ``rot`` onto an isotropic grid centred on the volume's centre.

    Parameters
    ----------
    vol
        (nz, ny, nx) array.
    spacing
        Voxel size (dz, dy, dx) in µm.
    rot
        3×3 rotation acting on (Z, Y, X) (e.g. ``rot_x(b) @ rot_y(a)``): output point p' shows input point
        ``rot.T @ p'``.
    out_spacing
        Output voxel size (µm); default the smallest input spacing.
    out_shape
        Output shape; default the bounding box of the rotated volume (nothing is cut).
    device
        As for :func:`engines.device.pick_device`.
    z_slices
        Compute only output planes ``[start, stop)`` of that grid (e.g. those a caller will keep).

    Returns
    -------
    numpy.ndarray
        float32 (trilinear interpolation, 0 outside the input), shape ``out_shape`` or its ``z_slices`` part.
    """
    from engines.device import pick_device, to_device, to_host

    arr = np.asarray(vol, dtype=np.float32)
    if arr.ndim != 3 or min(arr.shape) < 2:
        raise ValueError(f"volume must be 3-D with at least 2 voxels per axis, got shape {arr.shape}")
    dev = pick_device(str(device) if device is not None else None)
    return to_host(rotate_volume_tensor(to_device(arr, dev), spacing, rot, out_spacing=out_spacing,
                                        out_shape=out_shape, z_slices=z_slices, max_chunk_bytes=max_chunk_bytes))


def rotate_volume_tensor(
    vol: torch.Tensor,
    spacing: tuple[float, float, float],
    rot: np.ndarray,
    *,
    out_spacing: float | None = None,
    out_shape: tuple[int, int, int] | None = None,
    z_slices: tuple[int, int] | None = None,
    max_chunk_bytes: int = 64 << 20,
) -> torch.Tensor:
    """:func:`rotate_volume` of a tensor on its device; returns a float32 tensor there."""
    import torch

    chunks = [c for _, c in iter_rotated_tensor(vol, spacing, rot, out_spacing=out_spacing, out_shape=out_shape,
                                                z_slices=z_slices, max_chunk_bytes=max_chunk_bytes)]
    return chunks[0].contiguous() if len(chunks) == 1 else torch.cat(chunks, dim=0)


def iter_rotated(
    vol: np.ndarray,
    spacing: tuple[float, float, float],
    rot: np.ndarray,
    *,
    out_spacing: float | None = None,
    out_shape: tuple[int, int, int] | None = None,
    device: str | torch.device | None = None,
    z_slices: tuple[int, int] | None = None,
    max_chunk_bytes: int = 64 << 20,
) -> Iterator[tuple[int, np.ndarray]]:
    """:func:`rotate_volume` in chunks of output planes: yields ``(first plane, planes)``.

    A caller that only needs a projection of the rotated volume never holds all of it.
    """
    from engines.device import pick_device, to_device, to_host

    arr = np.asarray(vol, dtype=np.float32)
    if arr.ndim != 3 or min(arr.shape) < 2:
        raise ValueError(f"volume must be 3-D with at least 2 voxels per axis, got shape {arr.shape}")
    dev = pick_device(str(device) if device is not None else None)
    for z0, chunk in iter_rotated_tensor(to_device(arr, dev), spacing, rot, out_spacing=out_spacing,
                                         out_shape=out_shape, z_slices=z_slices, max_chunk_bytes=max_chunk_bytes):
        yield z0, np.ascontiguousarray(to_host(chunk))


def iter_rotated_tensor(
    vol: torch.Tensor,
    spacing: tuple[float, float, float],
    rot: np.ndarray,
    *,
    out_spacing: float | None = None,
    out_shape: tuple[int, int, int] | None = None,
    z_slices: tuple[int, int] | None = None,
    max_chunk_bytes: int = 64 << 20,
) -> Iterator[tuple[int, torch.Tensor]]:
    """:func:`iter_rotated` on a tensor's device: yields ``(first plane, float32 tensor of planes)``."""
    import torch

    if vol.ndim != 3 or min(vol.shape) < 2:
        raise ValueError(f"volume must be 3-D with at least 2 voxels per axis, got shape {tuple(vol.shape)}")
    dev = vol.device
    vol = vol.to(torch.float32)
    arr_shape = tuple(int(n) for n in vol.shape)
    osp = float(out_spacing or min(spacing))
    oshape = tuple(out_shape) if out_shape is not None else rotated_shape(arr_shape, spacing, rot, osp)
    sp = np.asarray(spacing, dtype=np.float64)
    n_in = np.asarray(arr_shape, dtype=np.float64)
    # Output index → input normalised coordinate is affine: q = A @ o + t (host, float64).
    # Input index = rot.T @ (o − c_out)·osp / sp + c_in; normalised = 2·index/(n − 1) − 1.
    c_out = (np.asarray(oshape, dtype=np.float64) - 1) / 2.0
    c_in = (n_in - 1) / 2.0
    to_index = (rot.T * osp) / sp[:, None]
    a_mat = to_index * (2.0 / (n_in - 1))[:, None]
    t_vec = (c_in - to_index @ c_out) * (2.0 / (n_in - 1)) - 1.0
    # grid_sample wants (x, y, z) order in the last grid dimension.
    a_t = torch.from_numpy(a_mat[::-1].copy()).to(dev, torch.float64)
    t_t = torch.from_numpy(t_vec[::-1].copy()).to(dev, torch.float64)
    z_lo, z_hi = z_slices if z_slices is not None else (0, oshape[0])
    if not 0 <= z_lo < z_hi <= oshape[0]:
        raise ValueError(f"z_slices {z_slices} outside the {oshape[0]} output planes")
    with torch.no_grad():
        # The grid is affine in the output index, so it is the sum of one small term per axis (computed in
        # float64, summed in float32): far cheaper than materialising index triples and a matrix product.
        cols = [torch.arange(n, device=dev, dtype=torch.float64)[:, None] * a_t[:, i][None, :]
                for i, n in enumerate(oshape)]
        pure_y = bool(np.allclose(rot[1], [0, 1, 0]) and np.allclose(rot[:, 1], [0, 1, 0])
                      and oshape[1] == arr_shape[1] and abs(osp - sp[1]) <= 1e-9 * osp)
        if pure_y:
            # A rotation about y with unchanged rows is a 2-D resampling of every (z, x) slice with one grid:
            # rows ride along as channels, and bilinear (4 taps) replaces trilinear (8 taps).
            src = vol.permute(1, 0, 2).contiguous()[None]
            gx = (cols[2][:, [0, 2]] + t_t[[0, 2]][None, :]).float()[None, :, :]
            per_plane = oshape[2] * (2 * 4 + oshape[1] * 4)
            step = max(1, int(max_chunk_bytes // per_plane))
            for z0 in range(z_lo, z_hi, step):
                gz = cols[0][z0 : min(z_hi, z0 + step)][:, [0, 2]].float()[:, None, :]
                res = torch.nn.functional.grid_sample(src, (gz + gx)[None], mode="bilinear", padding_mode="zeros",
                                                      align_corners=True)
                yield z0, res[0].permute(1, 0, 2)
            return
        src = vol.contiguous()[None, None]
        gy = cols[1].float()[None, :, None, :]
        gx = (cols[2] + t_t[None, :]).float()[None, None, :, :]
        per_plane = oshape[1] * oshape[2] * 3 * 4
        step = max(1, int(max_chunk_bytes // per_plane))
        for z0 in range(z_lo, z_hi, step):
            gz = cols[0][z0 : min(z_hi, z0 + step)].float()[:, None, None, :]
            grid = (gz + gy + gx)[None]
            res = torch.nn.functional.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
            yield z0, res[0, 0]


def rotate_plane(img: np.ndarray, angle_deg: float) -> np.ndarray:
    """Rotate a 2-D (Z, W) image about its centre with the convention of this module (bilinear, 0 outside)."""
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    rot = np.array([[c, -s], [s, c]])
    centre = (np.asarray(img.shape, dtype=np.float64) - 1) / 2.0
    from scipy.ndimage import affine_transform

    # affine_transform maps output index o to input index M @ o + offset; M = rot.T (inverse rotation).
    m = rot.T
    return affine_transform(np.asarray(img, dtype=np.float64), m, offset=centre - m @ centre, order=1, cval=0.0)
