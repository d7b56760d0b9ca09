"""Deskew (and its inverse, skew) of sample-scan lattice light-sheet stacks.

In a sample-scan acquisition the stage moves the sample by ``dz`` between camera frames along a direction
tilted by ``angle`` against the detection plane, so each plane is displaced by ``dz·cos(angle)/dx`` pixels
along one camera axis (the *skew axis*) relative to the previous one. Deskewing shifts every plane back
by that amount, which is a pure 1-D resampling along the skew axis with one shift per plane.

Output geometry follows cudaDecon (the de facto standard of the field), so that our volumes overlay the
ones users already have::

    nx_out = nx + floor(nz · dz · |cos θ| / dx)
    x_in   = (x_out − nx_out/2) − f·(z − nz/2) + nx/2,     f = sign(θ) · cos θ · dz / dx

A negative angle means the stage scanned the other way (cudaDecon adds 180° to it, which flips the sign
of ``f``). Voxels whose source lies outside the raw frame get the ``pad`` value.

Public functions
----------------
``deskew(stack, dx_um, dz_um, angle_deg, *, skew_axis="x", interp="cubic", pad=0.0, device=None)``
    raw (nz, ny, nx) → deskewed float32 (nz, ny, nx_out) for skew axis x, or (nz, ny_out, nx) for y.
``skew(volume, dx_um, dz_um, angle_deg, *, width=None, skew_axis="x", interp="cubic", pad=0.0, device=None)``
    the exact inverse geometry: deskewed/object (nz, ny, nx_vol) → raw sample-scan float32 (nz, ny, width),
    ``width`` defaulting to ``nx_vol − floor(nz·dz·|cos θ|/dx)`` so that ``skew`` undoes ``deskew``'s
    widening. A simulator renders an object on the deskewed grid and calls ``skew`` to get what the camera
    records.
``deskewed_width(nx, nz, dx_um, dz_um, angle_deg)``
    the output width, for callers that allocate buffers ahead of time.

Both run on the CPU or a CUDA device (``device`` as for :func:`engines.device.pick_device`); the sampling
positions and weights are computed once on the host in float64, so both devices apply the same weights and
agree to float32 rounding.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import numpy as np

from engines.errors import RllsmValueError

if TYPE_CHECKING:  # torch is imported where used: the geometry helpers here are imported by light modules
    import torch

Interp = Literal["linear", "cubic"]
SkewAxisName = Literal["x", "y"]


class DeskewError(RllsmValueError):
    """The stack or the acquisition parameters cannot be deskewed as given."""


def shear_factor(dx_um: float, dz_um: float, angle_deg: float) -> float:
    """Pixels of shift along the skew axis per plane (signed: negative angles scan the other way)."""
    _check_geometry(dx_um, dz_um, angle_deg)
    c = math.cos(math.radians(angle_deg))
    return math.copysign(c, angle_deg) * dz_um / dx_um if angle_deg != 0 else dz_um / dx_um


def deskewed_width(nx: int, nz: int, dx_um: float, dz_um: float, angle_deg: float) -> int:
    """Width of the deskewed axis: ``nx + floor(nz·dz·|cos θ|/dx)`` (cudaDecon's convention)."""
    _check_geometry(dx_um, dz_um, angle_deg)
    extra = nz * dz_um * abs(math.cos(math.radians(angle_deg))) / dx_um
    # A tiny tolerance so that e.g. 224.9999999 from rounding of cos does not lose a column.
    return int(nx + math.floor(extra + 1e-9))


def deskew(
    stack: np.ndarray,
    dx_um: float,
    dz_um: float,
    angle_deg: float,
    *,
    skew_axis: SkewAxisName = "x",
    interp: Interp = "cubic",
    pad: float = 0.0,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Deskew a sample-scan stack into the cudaDecon output geometry.

    Parameters
    ----------
    stack
        Raw stack, shape (nz, ny, nx), any real dtype.
    dx_um
        Camera pixel size in the sample (µm).
    dz_um
        Stage step between planes (µm).
    angle_deg
        Angle between the stage-scan direction and the detection plane (degrees, |θ| < 90; negative
        for the opposite scan direction).
    skew_axis
        Camera axis along which planes are displaced: ``"x"`` (last axis) or ``"y"`` (middle axis).
    interp
        ``"linear"`` (bit-compatible with cudaDecon before its float→uint16 truncation) or ``"cubic"``
        (Keys cubic convolution, a = −0.5, as MATLAB's ``interp2(..., 'cubic')`` used by the reference).
    pad
        Value of output voxels whose source lies outside the raw frame (cudaDecon uses the camera
        background, e.g. 98 or 100).
    device
        ``"cpu"``, ``"cuda"``, a torch device, or None for :func:`engines.device.pick_device`.

    Returns
    -------
    numpy.ndarray
        float32, (nz, ny, nx_out) for skew axis x, (nz, ny_out, nx) for skew axis y, with
        ``n_out = n + floor(nz·dz·|cos θ|/dx)``.

    Raises
    ------
    DeskewError
        If the stack is not 3-D, is empty, or the parameters are out of range.
    """
    arr = _check_stack(stack, "stack")
    nz = arr.shape[0]
    n_in = arr.shape[2] if skew_axis == "x" else arr.shape[1]
    n_out = deskewed_width(n_in, nz, dx_um, dz_um, angle_deg)
    f = shear_factor(dx_um, dz_um, angle_deg)
    z = np.arange(nz, dtype=np.float64)
    # Source coordinate of output column 0 for every plane (cudaDecon's formula with x_out = 0).
    origin = -n_out / 2.0 - f * (z - nz / 2.0) + n_in / 2.0
    return _shear(arr, origin, n_out, skew_axis=skew_axis, interp=interp, pad=pad, device=device)


def skew(
    volume: np.ndarray,
    dx_um: float,
    dz_um: float,
    angle_deg: float,
    *,
    width: int | None = None,
    skew_axis: SkewAxisName = "x",
    interp: Interp = "cubic",
    pad: float = 0.0,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Shear a deskewed (sample-frame) volume into what a sample-scan acquisition records.

    Exact inverse geometry of :func:`deskew`: ``deskew(skew(v, …), …)`` returns ``v`` (up to interpolation
    and the corners that fall outside the raw frame) when ``v`` has the deskewed width.

    Parameters
    ----------
    volume
        Volume on the deskewed grid, shape (nz, ny, nx_vol) (skew axis x) or (nz, ny_vol, nx) (skew axis y).
    dx_um, dz_um, angle_deg, skew_axis, interp, pad, device
        As for :func:`deskew`.
    width
        Raw frame size along the skew axis. Default ``n_vol − floor(nz·dz·|cos θ|/dx)``, i.e. the raw
        width that :func:`deskew` would widen back to ``n_vol``. Must be ≥ 1.

    Returns
    -------
    numpy.ndarray
        float32 raw stack (nz, ny, width) for skew axis x, (nz, width, nx) for skew axis y.
    """
    arr = _check_stack(volume, "volume")
    nz = arr.shape[0]
    n_vol = arr.shape[2] if skew_axis == "x" else arr.shape[1]
    extra = deskewed_width(0, nz, dx_um, dz_um, angle_deg)
    n_raw = n_vol - extra if width is None else int(width)
    if n_raw < 1:
        raise DeskewError(
            f"volume is {n_vol} px along {skew_axis} but the shear over {nz} planes spans {extra} px; "
            f"give a wider volume or an explicit width"
        )
    # The deskew geometry is defined for the deskewed width of this raw width, not n_vol (they may differ
    # when the caller asks for a custom width); centre both on their middles as cudaDecon does.
    f = shear_factor(dx_um, dz_um, angle_deg)
    z = np.arange(nz, dtype=np.float64)
    # x_vol = x_raw + f·(z − nz/2) + n_vol/2 − n_raw/2, the inverse of deskew's mapping.
    origin = f * (z - nz / 2.0) + n_vol / 2.0 - n_raw / 2.0
    return _shear(arr, origin, n_raw, skew_axis=skew_axis, interp=interp, pad=pad, device=device)


# --------------------------------------------------------------------------------------------------------
# implementation


def _check_geometry(dx_um: float, dz_um: float, angle_deg: float) -> None:
    if not (math.isfinite(dx_um) and dx_um > 0):
        raise DeskewError(f"pixel size dx must be a positive number of µm, got {dx_um!r}")
    if not (math.isfinite(dz_um) and dz_um > 0):
        raise DeskewError(f"stage step dz must be a positive number of µm, got {dz_um!r}")
    if not (math.isfinite(angle_deg) and abs(angle_deg) < 89.9):
        raise DeskewError(f"skew angle must be between -89.9° and 89.9°, got {angle_deg!r}")


def _check_stack(stack: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(stack)
    if arr.ndim != 3:
        raise DeskewError(f"{what} must be 3-D (planes, rows, columns); got {arr.ndim}-D array of shape {arr.shape}")
    if 0 in arr.shape:
        raise DeskewError(f"{what} is empty: shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise DeskewError(f"{what} must hold real numbers, got dtype {arr.dtype}")
    return arr


def _keys_weights(t: np.ndarray) -> np.ndarray:
    """Keys cubic-convolution weights (a = −0.5) for taps at offsets −1, 0, 1, 2 given fraction ``t``."""
    a = -0.5

    def near(d: np.ndarray) -> np.ndarray:  # |d| ≤ 1
        return (a + 2) * d**3 - (a + 3) * d**2 + 1

    def far(d: np.ndarray) -> np.ndarray:  # 1 < |d| < 2
        return a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a

    return np.stack([far(1 + t), near(t), near(1 - t), far(2 - t)], axis=0)


def sampling_plan(
    origin: np.ndarray, n_in: int, n_out: int, interp: Interp
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Taps, weights and validity of a per-plane shift resampling.

    Output column ``j`` of plane ``z`` samples the input at ``origin[z] + j``.

    Returns
    -------
    idx : int64 (k, nz, n_out)   input column of each tap (clamped into the frame)
    w   : float32 (k, nz, n_out) tap weights
    ok  : bool (nz, n_out)       False where the sample lies outside the frame (→ pad)
    """
    if interp not in ("linear", "cubic"):
        raise DeskewError(f"interpolation must be 'linear' or 'cubic', got {interp!r}")
    # cudaDecon evaluates the source coordinate in float32; doing the same keeps the linear weights (and so
    # the truncated uint16 output) identical to its output.
    xin = (origin[:, None] + np.arange(n_out, dtype=np.float64)[None, :]).astype(np.float32).astype(np.float64)
    base = np.floor(xin)
    t = xin - base
    base = base.astype(np.int64)
    if interp == "linear":
        # cudaDecon's rule: valid when 0 ≤ x < n−1 (so the right tap exists).
        ok = (xin >= 0) & (xin < n_in - 1)
        offs = np.array([0, 1])
        w = np.stack([1.0 - t, t], axis=0)
    else:
        # MATLAB interp2 counts the last sample as inside; missing outer taps replicate the edge sample.
        ok = (xin >= 0) & (xin <= n_in - 1)
        offs = np.array([-1, 0, 1, 2])
        w = _keys_weights(t)
    if n_in == 1:
        ok = xin == 0
    idx = np.clip(base[None, :, :] + offs[:, None, None], 0, n_in - 1)
    return idx, w.astype(np.float32), ok


def _shear(
    arr: np.ndarray,
    origin: np.ndarray,
    n_out: int,
    *,
    skew_axis: SkewAxisName,
    interp: Interp,
    pad: float,
    device: str | torch.device | None,
) -> np.ndarray:
    from engines.device import pick_device, to_device, to_host

    dev = pick_device(str(device) if device is not None else None)
    t_in = to_device(np.asarray(arr, dtype=np.float32), dev)
    return to_host(shear_tensor(t_in, origin, n_out, skew_axis=skew_axis, interp=interp, pad=pad))


def deskew_tensor(
    stack: torch.Tensor, dx_um: float, dz_um: float, angle_deg: float, *, skew_axis: SkewAxisName = "x",
    interp: Interp = "cubic", pad: float = 0.0,
) -> torch.Tensor:
    """:func:`deskew` of a tensor, on the tensor's device, returning a float32 tensor there (no host copy)."""
    _check_tensor(stack, "stack")
    nz = stack.shape[0]
    n_in = stack.shape[2] if skew_axis == "x" else stack.shape[1]
    n_out = deskewed_width(n_in, nz, dx_um, dz_um, angle_deg)
    f = shear_factor(dx_um, dz_um, angle_deg)
    z = np.arange(nz, dtype=np.float64)
    origin = -n_out / 2.0 - f * (z - nz / 2.0) + n_in / 2.0
    return shear_tensor(stack, origin, n_out, skew_axis=skew_axis, interp=interp, pad=pad)


def _check_tensor(t: torch.Tensor, what: str) -> None:
    if t.ndim != 3:
        raise DeskewError(f"{what} must be 3-D (planes, rows, columns); got {t.ndim}-D tensor of shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise DeskewError(f"{what} is empty: shape {tuple(t.shape)}")
    import torch

    if t.is_complex() or t.dtype == torch.bool:
        raise DeskewError(f"{what} must hold real numbers, got dtype {t.dtype}")


def shear_tensor(
    t_in: torch.Tensor,
    origin: np.ndarray,
    n_out: int,
    *,
    skew_axis: SkewAxisName,
    interp: Interp,
    pad: float,
) -> torch.Tensor:
    """Per-plane shift resampling of a tensor on its own device (the core of :func:`deskew` and :func:`skew`)."""
    import torch

    if skew_axis not in ("x", "y"):
        raise DeskewError(f"skew axis must be 'x' or 'y', got {skew_axis!r}")
    if not math.isfinite(pad):
        raise DeskewError(f"pad value must be finite, got {pad!r}")
    dev = t_in.device
    # Work with the skew axis last; for y that is a transposed view.
    src = t_in if skew_axis == "x" else t_in.transpose(1, 2)
    nz, ny, n_in = src.shape
    idx, w, ok = sampling_plan(origin, n_in, n_out, interp)

    with torch.no_grad():
        src = src.to(torch.float32).contiguous()
        # The plan is tiny next to the volume (taps × planes × columns) and built on the host in float64.
        t_idx = torch.from_numpy(idx).to(dev)
        t_w = torch.from_numpy(w).to(dev)
        t_ok = torch.from_numpy(ok).to(dev)
        out: torch.Tensor | None = None
        # One gather per tap over the whole volume. The (nz, 1, n_out) index is expanded over rows as a
        # stride-0 view, so every plane gets its own shift without materialising a full-size index array.
        for k in range(idx.shape[0]):
            tap = src.gather(2, t_idx[k][:, None, :].expand(nz, ny, n_out))
            wk = t_w[k][:, None, :]
            out = tap.mul_(wk) if out is None else out.addcmul_(tap, wk)
        assert out is not None
        out.masked_fill_(~t_ok[:, None, :], float(pad))
    if skew_axis == "y":
        out = out.transpose(1, 2).contiguous()
    return out
