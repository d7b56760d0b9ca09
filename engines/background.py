"""Step 1 of the reconstruction: remove the mirror's mid-plane fluorescence band, then deskew and normalise.

In reflective lattice light-sheet microscopy the sample sits on a mirror. Where the mirror crosses the
detection plane each raw frame shows a bright band of epi-fluorescence: a line running along the non-skewed
camera axis, at a (nearly) fixed position along the skew axis, slightly tilted and drifting slowly over the
stack. On one side of it lies the real image, on the other the dimmer virtual (mirror) image.

What :func:`preprocess` does, in order (the reference's ``PreProcess``/``RemoveMidFluorescence_v3``):

1. Fit the band on the mean projection over planes (offset subtracted): cross-correlate it with a Gaussian
   line template (σ = ``gs_window_px``) for every tilt in ±``max_tilt_deg`` (step ``delta_angle_deg``) and
   every position (step ``position_step_px``); keep the best pair, refined to sub-step by parabolic fits.
2. Track the band over z: average groups of ``n_average`` planes, locate the band in each (within
   ±``max_drift_px`` of the fit) and fit a straight line through the positions (drift in px/plane).
3. Attenuate the band with ``1 − M``, ``M = (w·G(σa) + G(σb)) / (w + 1) · (1 − 2·mod_amp)``, two Gaussians
   across the band of widths σa = ``gs_window_px`` and σb = ``scale_factor``·σa, centred on the fitted,
   tilted, drifting line.
3b. (Not in the reference; ``residual_band``, on by default, off for reference parity.) Subtract what the mask
   leaves of the band. The mask's depth (1 − 2·``mod_amp``) and widths are presets that never match a given
   band exactly, so 20–60 % of it stays and shows as a bright slab next to the mirror in the views. The rest is
   measured, not assumed: for every plane, the ``residual_quantile`` (default 25th percentile) over rows of all
   pixels at the same signed distance from the fitted band line gives a profile across the band (sparse
   structure does not reach a low percentile; the band, present in every row, does). Profiles are smoothed
   over z (Gaussian σ = ``n_average``/2 planes, the band changes slowly) and across the band (σ 1.5 px); each
   side's own floor (its profile minimum; the virtual side is dimmer) is taken off, so only what rises above
   the floor on each side is subtracted, the remainder is never negative, and structure is never removed
   where the band is absent.
4. Boost the virtual side by the measured intensity ratio of the real to the virtual side (at least 1), using
   a smooth step (Gaussian edge σa) at the band, measured on the middle half of the planes.
5. Deskew (:func:`engines.deskew.deskew`), clip at zero, normalise to [0, 1] by min/max (as the
   reference's ``XxNorm``) and crop the deskewed axis to the size of the other camera axis, centred.

The fit runs on the host in float64 (it only sees 2-D projections); the per-voxel work runs in torch on the
chosen device, so CPU and CUDA give the same numbers to float32 rounding.
"""

from __future__ import annotations

import math
from typing import Literal

from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from engines.config import OpticsConfig
from engines.errors import RllsmValueError
from engines.support import StrictModel

if TYPE_CHECKING:  # torch and scipy are imported where used, so the CLI can list options without them
    import torch

BACKGROUND_PARAMS_VERSION = 1


class BackgroundError(RllsmValueError):
    """The stack cannot be pre-processed as given (wrong shape, too few planes, inconsistent parameters)."""


class BackgroundParams(StrictModel):
    """Parameters of the mid-plane band removal and of the pre-processing around it.

    Defaults are the reference's ``Parameters_Lifeact``; :func:`background_preset` gives the others
    (ER, Lyso, MT, SKL). The reference's ``rotAngle`` and ``background`` live in :class:`OpticsConfig`
    (``skew_angle_deg``, ``camera_offset``); ``showFlag``/``saveRmFbgFlag`` are display options and
    ``maxIters`` is replaced by an exhaustive search over positions and tilts.
    """

    version: Literal[1] = BACKGROUND_PARAMS_VERSION
    gs_window_px: float = Field(30.0, gt=0.0, le=1000.0, description="σ of the narrow band mask and template (px).")
    scale_factor: float = Field(2.0, ge=1.0, le=50.0, description="Width of the wide band mask, in units of σ.")
    sigma_weight: float = Field(1.0, ge=0.0, le=100.0, description="Weight of the narrow mask against the wide one.")
    mod_amp: float = Field(
        0.2, ge=0.0, lt=0.5, description="Mask depth is 1 − 2·mod_amp (0 removes the band centre completely)."
    )
    position_step_px: float = Field(1.0, gt=0.0, le=10.0, description="Grid step of the band position search (px).")
    delta_angle_deg: float = Field(0.1, gt=0.0, le=5.0, description="Grid step of the band tilt search (degrees).")
    max_tilt_deg: float = Field(1.0, ge=0.0, le=45.0, description="Largest band tilt searched (degrees).")
    n_average: int = Field(21, ge=1, le=10001, description="Planes averaged per group when tracking drift over z.")
    max_drift_px: float = Field(50.0, gt=0.0, le=10000.0, description="Groups farther than this from the fit are ignored.")
    virtual_side: Literal["high", "low"] = Field(
        "high", description="Side of the band (higher or lower skew-axis index) holding the virtual image."
    )
    remove_band: bool = Field(True, description="False skips steps 1–4 (plain offset subtraction and deskew).")
    residual_band: bool = Field(
        True, description="Step 3b: subtract the band left after the mask (measured). False = the reference's math."
    )
    residual_quantile: float = Field(
        0.25, gt=0.0, lt=0.5, description="Low quantile over rows that measures the residual band (step 3b)."
    )
    deskew_interp: Literal["linear", "cubic"] = Field("cubic", description="Interpolation of the deskew.")
    normalize: bool = Field(True, description="Scale the result to [0, 1] by its min and max.")
    crop_square: bool = Field(True, description="Crop the deskewed axis to the size of the other camera axis.")

    @model_validator(mode="after")
    def _search_fits(self) -> BackgroundParams:
        if self.max_tilt_deg > 0 and self.delta_angle_deg > 2 * self.max_tilt_deg:
            raise ValueError(
                f"delta_angle_deg {self.delta_angle_deg} is larger than the searched range ±{self.max_tilt_deg}°"
            )
        return self


PRESETS: dict[str, dict[str, float | int]] = {
    # Values of the reference's MaskProc/Parameters_<name>.m; Lifeact is the default of BackgroundParams.
    "lifeact": {},
    "er": {"gs_window_px": 15.0, "scale_factor": 5.0},
    "lyso": {"gs_window_px": 21.0, "scale_factor": 5.0, "sigma_weight": 0.2, "n_average": 15},
    "mt": {"gs_window_px": 15.0, "scale_factor": 5.0, "mod_amp": 0.3},
    "skl": {"gs_window_px": 11.0, "scale_factor": 3.0, "sigma_weight": 0.5, "mod_amp": 0.3, "n_average": 15},
}


def background_preset(name: str, **overrides: object) -> BackgroundParams:
    """Parameters for a labelled structure: ``lifeact`` (F-actin), ``er``, ``lyso``, ``mt``, ``skl``."""
    key = name.lower().replace("-", "").replace("_", "")
    key = {"factin": "lifeact", "microtubules": "mt", "lysosomes": "lyso"}.get(key, key)
    if key not in PRESETS:
        raise BackgroundError(f"unknown background preset {name!r}; choose one of {', '.join(PRESETS)}")
    return BackgroundParams(**{**PRESETS[key], **overrides})


class BandFit(BaseModel):
    """Where the mid-plane band was found, in raw-frame pixels along the skew axis."""

    model_config = ConfigDict(frozen=True)

    position_px: float = Field(description="Band centre at the middle row and middle plane (skew-axis px).")
    tilt_deg: float = Field(description="Band tilt: the centre moves by tan(tilt) px per row of the other axis.")
    drift_px_per_plane: float = Field(description="Band motion along the skew axis per plane (linear fit).")
    group_planes: list[float] = Field(default_factory=list, description="Centre plane of each averaged group.")
    group_positions_px: list[float] = Field(default_factory=list, description="Band position found in each group.")
    groups_used: int = Field(0, description="Groups within max_drift_px that entered the drift fit.")


class PreprocessReport(BaseModel):
    """What :func:`preprocess` measured and did; serialisable to JSON for the run record."""

    model_config = ConfigDict(frozen=True)

    band: BandFit | None = Field(description="None when band removal was switched off.")
    intensity_ratio: float = Field(description="Real/virtual intensity ratio applied to the virtual side (≥ 1).")
    deskewed_shape: tuple[int, int, int]
    crop_start: int = Field(description="First kept index along the deskewed axis (0 when not cropped).")
    norm_min: float = Field(description="Value mapped to 0 by the normalisation.")
    norm_max: float = Field(description="Value mapped to 1 by the normalisation.")


# --------------------------------------------------------------------------------------------------------
# band fit (host, float64, 2-D only)


def _line_scores(smoothed: np.ndarray, tilts_deg: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Σ over rows of ``smoothed`` sampled along each tilted line; shape (n_tilts, n_positions)."""
    nv, nu = smoothed.shape
    v = np.arange(nv, dtype=np.float64) - (nv - 1) / 2.0
    padded = np.concatenate([smoothed, np.zeros((nv, 1))], axis=1)  # column nu reads as 0 (outside)
    rows = np.arange(nv)[:, None]
    out = np.empty((len(tilts_deg), len(positions)))
    for k, a in enumerate(tilts_deg):
        u = positions[None, :] + math.tan(math.radians(a)) * v[:, None]
        u0 = np.floor(u)
        t = u - u0
        i0 = u0.astype(np.int64)
        inside0 = (i0 >= 0) & (i0 < nu)
        inside1 = (i0 + 1 >= 0) & (i0 + 1 < nu)
        a0 = np.where(inside0, padded[rows, np.clip(i0, 0, nu)], 0.0)
        a1 = np.where(inside1, padded[rows, np.clip(i0 + 1, 0, nu)], 0.0)
        out[k] = ((1 - t) * a0 + t * a1).sum(axis=0)
    return out


def _parabolic(ym: float, y0: float, yp: float) -> float:
    """Offset (in steps, within ±0.5) of the vertex of the parabola through three equally spaced samples."""
    den = ym - 2 * y0 + yp
    if den >= 0:  # not a maximum: keep the grid point
        return 0.0
    return float(np.clip(0.5 * (ym - yp) / den, -0.5, 0.5))


def _refine(image: np.ndarray, pos0: float, tilt0: float, params: BackgroundParams) -> tuple[float, float]:
    """Local maximum of the exact template correlation around a grid optimum (Nelder–Mead).

    The grid search samples a smoothed image by linear interpolation, whose kinks at whole pixels bias
    sub-pixel positions and hence tilts; here the Gaussian template is evaluated at the exact offsets.
    """
    from scipy.optimize import minimize

    nv, nu = image.shape
    lim = params.max_tilt_deg
    v = np.arange(nv, dtype=np.float64)[:, None] - (nv - 1) / 2.0
    u = np.arange(nu, dtype=np.float64)[None, :]
    inv2s2 = 0.5 / params.gs_window_px**2

    def neg(x: np.ndarray) -> float:
        p, a = float(x[0]), float(np.clip(x[1], -lim, lim))
        d = u - p - math.tan(math.radians(a)) * v
        return -float(np.sum(image * np.exp(-inv2s2 * d * d)))

    res = minimize(
        neg,
        np.array([pos0, tilt0]),
        method="Nelder-Mead",
        options={
            "initial_simplex": np.array(
                [[pos0, tilt0], [pos0 + params.position_step_px, tilt0], [pos0, tilt0 + params.delta_angle_deg]]
            ),
            "xatol": 1e-3,
            "fatol": 1e-12,
            "maxiter": 400,
        },
    )
    pos, tilt = float(res.x[0]), float(np.clip(res.x[1], -lim, lim))
    # Trust the refinement only near its start: a far jump means a flat or multi-modal score.
    if not res.success or abs(pos - pos0) > max(2 * params.position_step_px, params.gs_window_px):
        return pos0, tilt0
    return float(np.clip(pos, 0, nu - 1)), tilt


def fit_band(frames: np.ndarray | torch.Tensor, params: BackgroundParams) -> BandFit:
    """Locate the mid-plane band in offset-subtracted frames (nz, nv, nu), skew axis last.

    Returns its position at the middle row and middle plane, its tilt and its linear drift over planes.
    """
    from scipy.ndimage import gaussian_filter1d

    nz, nv, nu = frames.shape
    n_groups = nz // params.n_average
    mean, groups = _projections(frames, params.n_average)
    # Correlating with a Gaussian line template = smoothing across the band, then summing along the line.
    sigma = params.gs_window_px
    smoothed = gaussian_filter1d(mean, sigma, axis=1, mode="constant", truncate=5.0)
    n_steps = int(round(params.max_tilt_deg / params.delta_angle_deg))
    tilts = np.arange(-n_steps, n_steps + 1) * params.delta_angle_deg
    positions = np.arange(0.0, nu - 1 + 1e-9, params.position_step_px)
    scores = _line_scores(smoothed, tilts, positions)
    k, j = np.unravel_index(int(np.argmax(scores)), scores.shape)
    # The grid optimum is biased (a wrongly tilted line can pass closer to an off-grid centre than the right
    # one at the nearest grid position), so refine position and tilt together on the continuous score.
    pos, tilt = _refine(mean, float(positions[j]), float(tilts[k]), params)

    # Drift: the same template on averages of n_average planes, near the fitted line only.
    centres: list[float] = []
    found: list[float] = []
    if groups is not None:
        window = np.arange(pos - params.max_drift_px, pos + params.max_drift_px + 1e-9, params.position_step_px)
        for g in range(n_groups):
            sm = gaussian_filter1d(groups[g].astype(np.float64), sigma, axis=1, mode="constant", truncate=5.0)
            s = _line_scores(sm, np.array([tilt]), window)[0]
            i = int(np.argmax(s))
            if 0 < i < len(window) - 1:  # a maximum on the window edge is something else than the band
                centres.append((params.n_average - 1) / 2.0 + g * params.n_average)
                found.append(window[i] + params.position_step_px * _parabolic(*s[i - 1 : i + 2]))
    slope = 0.0
    if len(found) >= 2:
        slope, _ = np.polyfit(np.array(centres), np.array(found), 1)
    return BandFit(
        position_px=float(pos),
        tilt_deg=float(tilt),
        drift_px_per_plane=float(slope),
        group_planes=centres,
        group_positions_px=[float(f) for f in found],
        groups_used=len(found),
    )


def _projections(frames: np.ndarray | torch.Tensor, n_average: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Mean over all planes (float64) and means of groups of ``n_average`` planes (None for fewer than 2 groups).

    For a device tensor both are computed there and only these 2-D images come back to the host.
    """
    nz, nv, nu = frames.shape
    n_groups = nz // n_average
    if not isinstance(frames, np.ndarray):
        import torch

        from engines.device import probe_to_host

        with torch.no_grad():
            mean = probe_to_host(frames.mean(dim=0, dtype=torch.float64))
            groups = None
            if n_groups >= 2:
                g = frames[: n_groups * n_average].reshape(n_groups, n_average, nv, nu).mean(dim=1)
                groups = probe_to_host(g)
        return mean, groups
    mean = frames.mean(axis=0, dtype=np.float64)
    groups = None
    if n_groups >= 2:
        groups = frames[: n_groups * n_average].reshape(n_groups, n_average, nv, nu).mean(axis=1)
    return mean, groups


# --------------------------------------------------------------------------------------------------------
# masking (torch, on the chosen device)


def band_distance(shape: tuple[int, int, int], fit: BandFit, device: torch.device) -> torch.Tensor:
    """Signed distance (px, float32) across the fitted (tilted, drifting) band of every pixel of frames ``shape``."""
    import torch

    nz, nv, nu = shape
    f64 = torch.float64
    ta = math.tan(math.radians(fit.tilt_deg))
    ct = math.cos(math.radians(fit.tilt_deg))
    # One float64 term per axis, summed in float32 (the full float64 volume would cost more than the masks).
    z = torch.arange(nz, dtype=f64, device=device) - (nz - 1) / 2.0
    v = torch.arange(nv, dtype=f64, device=device) - (nv - 1) / 2.0
    u = torch.arange(nu, dtype=f64, device=device)
    dz_term = (-fit.drift_px_per_plane * ct * z).float()[:, None, None]
    dv_term = (-ta * ct * v).float()[None, :, None]
    du_term = ((u - fit.position_px) * ct).float()[None, None, :]
    return du_term + dv_term + dz_term


def band_masks(
    shape: tuple[int, int, int], fit: BandFit, params: BackgroundParams, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attenuation mask ``M`` and virtual-side step ``B`` (both in [0, 1]) for frames of ``shape``."""
    import torch

    d = band_distance(shape, fit, device)
    sa = params.gs_window_px
    sb = params.gs_window_px * params.scale_factor
    w = params.sigma_weight
    mask = (w * torch.exp(-0.5 * (d / sa) ** 2) + torch.exp(-0.5 * (d / sb) ** 2)) * ((1 - 2 * params.mod_amp) / (w + 1))
    sign = 1.0 if params.virtual_side == "high" else -1.0
    step = torch.special.ndtr(sign * d / sa)
    return mask, step


def _intensity_ratio(masked: torch.Tensor, step: torch.Tensor) -> float:
    """Real/virtual intensity on the middle half of the planes, ≥ 1 (the reference's boost factor)."""
    import torch

    nz = masked.shape[0]
    lo, hi = max(0, int(math.floor(nz / 4 + 0.5)) - 1), int(math.floor(3 * nz / 4 + 0.5))
    m, s = masked[lo:hi].double(), step[lo:hi].double()
    # Weights as the reference: the real side counts where the step is below 0.9, the virtual above 0.1.
    real = torch.where(s > 0.9, torch.zeros_like(s), 1 - s)
    virt = torch.where(s < 0.1, torch.zeros_like(s), s)
    num, den = float((m * real).sum()), float((m * virt).sum())
    if not (den > 0 and math.isfinite(num)):
        return 1.0
    return max(1.0, num / den)


def remove_band(
    frames: np.ndarray, params: BackgroundParams, device: torch.device, fit: BandFit | None = None
) -> tuple[np.ndarray, BandFit, float]:
    """Steps 1–4 (3b when ``params.residual_band``) on offset-subtracted frames (nz, nv, nu), skew axis last. Returns (frames, fit, ratio)."""
    from engines.device import to_device, to_host

    t = to_device(np.ascontiguousarray(frames, dtype=np.float32), device)
    fit = fit or fit_band(frames, params)
    out, fit, ratio = remove_band_tensor(t, params, fit)
    return to_host(out), fit, ratio


def remove_band_tensor(
    frames: torch.Tensor, params: BackgroundParams, fit: BandFit | None = None
) -> tuple[torch.Tensor, BandFit, float]:
    """:func:`remove_band` on a float32 tensor, on its device; only 2-D projections go to the host for the fit."""
    import torch

    fit = fit or fit_band(frames, params)  # type: ignore[arg-type]
    with torch.no_grad():
        mask, step = band_masks(tuple(frames.shape), fit, params, frames.device)
        t = frames * (1 - mask)
        del mask
        if params.residual_band:
            from engines.band_residual import residual_band

            t.sub_(residual_band(t, fit, params))
        ratio = _intensity_ratio(t, step)
        t.mul_(1 + step * (ratio - 1))
    return t, fit, ratio


# --------------------------------------------------------------------------------------------------------
# the whole step


def square_crop_start(n_deskewed: int, n_other: int) -> int:
    """First index of the reference's centred crop of the deskewed axis to ``n_other`` (0 if shorter)."""
    if n_deskewed <= n_other:
        return 0
    # MATLAB round() (half away from zero) of the 1-based start, made 0-based.
    return max(0, int(math.floor((n_deskewed - n_other) / 2 + 0.5)) - 1)


def preprocess(
    raw: np.ndarray,
    optics: OpticsConfig,
    params: BackgroundParams | None = None,
    *,
    device: str | torch.device | None = None,
) -> tuple[np.ndarray, PreprocessReport]:
    """Band removal, deskew, offset subtraction, normalisation and crop of one raw sample-scan stack.

    Parameters
    ----------
    raw
        Raw stack (nz, ny, nx) as recorded (camera offset included).
    optics
        Uses ``pixel_size_um``, ``stage_step_um``, ``skew_angle_deg``, ``skew_axis``, ``camera_offset``.
    params
        Band-removal parameters; default :class:`BackgroundParams` (the reference's Lifeact preset).
    device
        As for :func:`engines.device.pick_device`.

    Returns
    -------
    volume : numpy.ndarray
        float32 deskewed volume, in [0, 1] when ``params.normalize``; for skew axis x of shape
        (nz, ny, min(nx_deskewed, ny)) when ``params.crop_square`` (the y axis case is the transpose).
    report : PreprocessReport
        Fitted band (position, tilt, drift), intensity ratio, crop and normalisation.

    Raises
    ------
    BackgroundError
        For a stack that is not 3-D or too small to fit a band in.
    """
    from engines.device import pick_device, to_device, to_host

    arr = np.asarray(raw)
    if arr.ndim != 3:
        raise BackgroundError(f"raw stack must be 3-D (planes, rows, columns); got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise BackgroundError(f"raw stack must hold real numbers, got dtype {arr.dtype}")
    dev = pick_device(str(device) if device is not None else None)
    vol, report = preprocess_tensor(to_device(arr, dev), optics, params)
    return to_host(vol), report


def preprocess_tensor(
    raw: torch.Tensor, optics: OpticsConfig, params: BackgroundParams | None = None
) -> tuple[torch.Tensor, PreprocessReport]:
    """:func:`preprocess` on a tensor, on its device: returns a contiguous float32 tensor on the same device.

    Only 2-D projections (for the band fit) and a few scalars are read back to the host.
    """
    import torch

    from engines.deskew import DeskewError, deskew_tensor

    params = params or BackgroundParams()
    if not isinstance(raw, torch.Tensor):
        raise BackgroundError(f"preprocess_tensor takes a torch tensor, got {type(raw).__name__}")
    if raw.ndim != 3:
        raise BackgroundError(f"raw stack must be 3-D (planes, rows, columns); got shape {tuple(raw.shape)}")
    if min(raw.shape) < 2:
        raise BackgroundError(f"raw stack {tuple(raw.shape)} is too small: need at least 2 planes, rows and columns")
    if raw.is_complex() or raw.dtype == torch.bool:
        raise BackgroundError(f"raw stack must hold real numbers, got dtype {raw.dtype}")
    axis = str(getattr(optics.skew_axis, "value", optics.skew_axis))
    with torch.no_grad():
        # Work with the skew axis last (the band runs along the other axis).
        src = raw if axis == "x" else raw.transpose(1, 2)
        frames = src.to(torch.float32).sub_(float(np.float32(optics.camera_offset))) if src.dtype != torch.float32 \
            else src - float(np.float32(optics.camera_offset))
        frames = frames.contiguous()
        fit: BandFit | None = None
        ratio = 1.0
        if params.remove_band:
            frames, fit, ratio = remove_band_tensor(frames, params)
        try:
            vol = deskew_tensor(frames, optics.pixel_size_um, optics.stage_step_um, optics.skew_angle_deg,
                                skew_axis="x", interp=params.deskew_interp, pad=0.0)
        except DeskewError as err:
            raise BackgroundError(str(err)) from None
        del frames
        vol.clamp_(min=0.0)
        deskewed_shape = tuple(int(n) for n in vol.shape)
        lo_hi = torch.stack([vol.min(), vol.max()]).double().cpu()  # two scalars
        lo, hi = float(lo_hi[0]), float(lo_hi[1])
        if params.normalize:
            if hi > lo:
                # in float32 as the numpy path: (v − lo)/(hi − lo) with float64 scalars rounds to float32 once
                vol.sub_(lo).div_(hi - lo)
            else:
                vol.zero_()
        start = 0
        if params.crop_square:
            start = square_crop_start(vol.shape[2], vol.shape[1])
            if start or vol.shape[2] > vol.shape[1]:
                vol = vol[:, :, start : start + vol.shape[1]]
        if axis == "y":
            vol = vol.transpose(1, 2)
            deskewed_shape = (deskewed_shape[0], deskewed_shape[2], deskewed_shape[1])
        vol = vol.contiguous()
    report = PreprocessReport(
        band=fit,
        intensity_ratio=ratio,
        deskewed_shape=deskewed_shape,  # type: ignore[arg-type]
        crop_start=start,
        norm_min=lo if params.normalize else 0.0,
        norm_max=hi if params.normalize else 1.0,
    )
    return vol, report
