"""Geometry helpers of Step 2: in-plane rotations, centre crop and a bicubic resize.

The numbers must match the published pipeline, which rotates with ``scipy.ndimage.rotate`` (cubic B-spline,
prefiltered, zero outside, canvas enlarged to hold the rotated corners) and resizes filters with OpenCV's
bicubic ``resize``.  Rotations therefore go through scipy on the CPU, or through ``cupyx.scipy.ndimage``
(same algorithm) when a CuPy array is handed in.  The resize is written out here as two small
interpolation matrices, so it runs on any torch device and needs no OpenCV.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy import ndimage

#: Keys-cubic parameter used by OpenCV's INTER_CUBIC.
_CUBIC_A = -0.75


def _ndimage_for(arr: Any):
    """scipy.ndimage for numpy arrays, cupyx.scipy.ndimage for CuPy arrays (same arithmetic)."""
    if type(arr).__module__.startswith("cupy"):
        from cupyx.scipy import ndimage as cu_ndimage  # optional dependency, only reached with CuPy input

        return cu_ndimage
    return ndimage


def rotate_planes(volume: Any, angle_deg: float) -> Any:
    """Rotate every (y, x) plane of a ``(..., Y, X)`` array by ``angle_deg``, canvas enlarged to fit.

    Cubic B-spline with prefilter and zeros outside the image, identical to
    ``scipy.ndimage.rotate(volume, angle, axes=(-2, -1), reshape=True)``.
    """
    if angle_deg == 0:
        return volume
    nd = _ndimage_for(volume)
    return nd.rotate(volume, angle_deg, axes=(volume.ndim - 2, volume.ndim - 1), reshape=True, order=3)


def rotated_shape(ny: int, nx: int, angle_deg: float) -> tuple[int, int]:
    """Plane size after :func:`rotate_planes` (the enlarged canvas)."""
    from scipy import special

    c, s = special.cosdg(angle_deg), special.sindg(angle_deg)
    rot = np.array([[c, s], [-s, c]])
    bounds = rot @ [[0, 0, ny, ny], [0, nx, 0, nx]]
    out = (np.ptp(bounds, axis=1) + 0.5).astype(int)
    return int(out[0]), int(out[1])


def crop_window(ny: int, nx: int, crop_y: int, crop_x: int) -> tuple[slice, slice]:
    """Slices of the centred ``crop_y × crop_x`` window of an ``ny × nx`` image.

    The centre is ``round(n/2) - 1`` with Python's round-half-to-even, as the published code picks it;
    off-by-one choices here shift every back-rotated band by a pixel against the others.
    """
    if ny == crop_y and nx == crop_x:
        return slice(None), slice(None)
    if crop_y > ny or crop_x > nx:
        raise ValueError(f"cannot crop {crop_y}×{crop_x} out of {ny}×{nx}")

    def one(n: int, c: int) -> slice:
        mid = round(n / 2) - 1
        r = c // 2
        start = mid - r + 1 if c % 2 == 0 else mid - r
        return slice(start, mid + r + 1)

    return one(ny, crop_y), one(nx, crop_x)


def rotate_back_and_crop(images: Any, angle_deg: float, crop_y: int, crop_x: int) -> Any:
    """Undo a :func:`rotate_planes` on ``(..., Y', X')`` predictions and cut the original field of view."""
    back = rotate_planes(images, -angle_deg)
    sy, sx = crop_window(back.shape[-2], back.shape[-1], crop_y, crop_x)
    return back[..., sy, sx]


def cubic_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` matrix of OpenCV-style bicubic interpolation along one axis.

    Half-pixel centres, Keys kernel with a = -0.75, edge pixels replicated, no anti-aliasing when
    shrinking (OpenCV's INTER_CUBIC does none either).  Positions and weights are computed in float32
    as OpenCV does.
    """
    scale = n_in / n_out
    pos = ((np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    base = np.floor(pos).astype(np.int64)
    t = (pos - base.astype(np.float32)).astype(np.float32)
    a = np.float32(_CUBIC_A)
    x0 = t + np.float32(1)
    w0 = ((a * x0 - 5 * a) * x0 + 8 * a) * x0 - 4 * a
    w1 = ((a + 2) * t - (a + 3)) * t * t + 1
    x2 = np.float32(1) - t
    w2 = ((a + 2) * x2 - (a + 3)) * x2 * x2 + 1
    w3 = np.float32(1) - w0 - w1 - w2
    m = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.arange(n_out)
    for k, w in enumerate((w0, w1, w2, w3)):
        np.add.at(m, (rows, np.clip(base + k - 1, 0, n_in - 1)), w.astype(np.float64))
    return m


def resize_cubic(image: np.ndarray | torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic resize of the last two axes to ``height × width`` (OpenCV INTER_CUBIC numbers), float64.

    Works on numpy arrays or torch tensors on any device; returns a torch tensor on the input's device.
    """
    t = torch.as_tensor(image)
    t = t.to(torch.float64)
    my = torch.from_numpy(cubic_resize_matrix(t.shape[-2], height)).to(t.device)
    mx = torch.from_numpy(cubic_resize_matrix(t.shape[-1], width)).to(t.device)
    return my @ t @ mx.T
