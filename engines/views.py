"""Step 3 of the reconstruction: rotate the deskewed volume so the mirror is horizontal, then split it.

A reflective lattice light-sheet volume holds the sample (view A) and its mirror image (view B) on either
side of the mirror plane. In a deskewed volume that plane is tilted by the objective angle about y. What
:func:`split_views` does (the reference's ``isolattice_rotate``):

1. Rotate about y by the objective angle onto an isotropic grid (voxel size dx), using the z/xy anisotropy.
2. Project along x; for each small rotation about x in ``x_range_deg`` (step ``x_step_deg``) rotate the
   projection, blur it (σ = ``blur_px``) and score every mirror position within ``split_range`` by the
   overlap of the image with its mirror image about that position (``Σ P(z)·P(2m − z)``). The best pair
   gives the x-rotation and the mirror position ``m``.
3. Optionally (``y_range_deg`` not (0, 0)) refine the y-rotation the same way on the projection along y.
4. Rotate the original volume once with the combined rotation, and cut the two views at ``m``: view A is
   the slices below the mirror, view B the slices above it flipped along z, both ordered from far to near
   the mirror and cut to a common depth (at most ``max_depth``).

Convention for the angle: the same sign as the skew angle of the deskew (the mirror contains the stage-scan
direction); see :mod:`engines.rotate3d`.
"""

from __future__ import annotations

import math
from typing import Literal

from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from engines.errors import RllsmValueError
from engines.support import StrictModel

if TYPE_CHECKING:  # torch and scipy are imported where used, so the CLI can list options without them
    import torch

VIEWS_PARAMS_VERSION = 1

#: Below this mirror contrast (:func:`mirror_contrast`) a volume holds no mirror image. Measured on deskewed
#: volumes (before lateral SR): 0.82–0.96 on simulated rLLSM stacks (filaments and beads, with and without the
#: band), 0.32 on the first 16 planes of one (a truncated scan still shows its mirror, weakly); 0.04 on the whole
#: ordinary LLSM stack of the test data, but 0.21–0.31 on 96–128-pixel crops of it (a few puncta pair up by
#: chance). The threshold refuses clear cases only: a small or sparse field can pass it without a mirror.
MIRROR_THRESHOLD = 0.15


class ViewsError(RllsmValueError):
    """The volume cannot be rotated and split as given."""


class NoMirrorError(ViewsError):
    """The volume holds no mirror image: it is ordinary (single-view) LLSM data."""


class ViewsParams(StrictModel):
    """Parameters of the rotation and view split (defaults: the reference's Step 3, angle 30.8°)."""

    version: Literal[1] = VIEWS_PARAMS_VERSION
    angle_deg: float = Field(30.8, ge=-89.0, le=89.0, description="Objective angle: rotation about y (degrees).")
    x_range_deg: tuple[float, float] = Field((-0.9, 0.9), description="Searched rotations about x (degrees).")
    x_step_deg: float = Field(0.1, gt=0.0, le=10.0, description="Step of the x-rotation search (degrees).")
    y_range_deg: tuple[float, float] = Field((0.0, 0.0), description="Searched corrections of the y-rotation.")
    y_step_deg: float = Field(0.1, gt=0.0, le=10.0, description="Step of the y-rotation search (degrees).")
    split_range: tuple[int, int] = Field(
        (-30, 30), description="Searched mirror offsets, in half-slices from the centre of the rotated volume."
    )
    max_depth: int = Field(101, ge=1, le=100000, description="Largest depth of each view (slices).")
    blur_px: float = Field(1.0, ge=0.0, le=50.0, description="Gaussian blur of the projections before matching.")
    border_px: int = Field(0, ge=0, le=10000, description="Border excluded from the projections (px).")
    keep_shape: bool = Field(
        False, description="Crop the rotated volume to the input's voxel counts (as the reference) instead of "
        "keeping the whole rotated volume.",
    )
    refine_mirror: bool = Field(
        True, description="Refine the mirror position on the rotated volume itself (3-D overlap normalised by the "
        "data's support) after the projection search; the projection alone is biased on filaments.",
    )
    interpolate_gap: bool = Field(
        True, description="Interpolate view B to the mirror's exact position when it lies between two index sums "
        "(otherwise the views can be up to half a slice apart along z).",
    )
    mirror_threshold: float = Field(
        MIRROR_THRESHOLD, ge=0.0, le=1.0, description="Smallest mirror contrast accepted as a mirror; below it the "
        "split stops with NoMirrorError (0 accepts any volume).",
    )

    @model_validator(mode="after")
    def _ranges_ordered(self) -> ViewsParams:
        for name in ("x_range_deg", "y_range_deg", "split_range"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name} must be (low, high), got ({lo}, {hi})")
        for name in ("x_range_deg", "y_range_deg"):
            lo, hi = getattr(self, name)
            if max(abs(lo), abs(hi)) > 45:
                raise ValueError(f"{name} is a small correction: keep it within ±45°, got ({lo}, {hi})")
        return self


class ViewsReport(BaseModel):
    """Angles and split found by :func:`split_views`."""

    model_config = ConfigDict(frozen=True)

    angle_y_deg: float = Field(description="Total rotation about y applied (objective angle + correction).")
    angle_y_correction_deg: float
    angle_x_deg: float = Field(description="Rotation about x found by the mirror search.")
    split_index: float = Field(description="Mirror position in slices of the rotated volume (may be x.5).")
    split_offset: float = Field(description="Mirror offset from the rotated volume's centre, in half-slices.")
    projection_offset: float | None = Field(
        None, description="The projection search's offset (half-slices) before the 3-D refinement; None without it.",
    )
    depth: int = Field(description="Slices in each view.")
    rotated_shape: tuple[int, int, int]
    voxel_um: float = Field(description="Isotropic voxel size of the views (µm).")
    score: float = Field(description="Best normalised mirror overlap (1 for a perfectly symmetric volume).")
    mirror_contrast: float = Field(
        1.0, description="Correlation of the fine structure with its mirror image at the found plane (1: a perfect "
        "mirror; ordinary LLSM data ≈ 0); below mirror_threshold the volume holds no mirror.",
    )


def _steps(lo: float, hi: float, step: float) -> np.ndarray:
    n = int(math.floor((hi - lo) / step + 1e-9))
    # Rounded so that 0° is exactly 0 (no needless interpolation) and reports read 0.2, not 0.20000000000000007.
    return np.round(lo + step * np.arange(n + 1), 9)


def mirror_search(
    proj: np.ndarray, angles: np.ndarray, split_range: tuple[int, int], blur: float
) -> tuple[float, float, float]:
    """Best (angle, offset, score) of a (Z, W) projection against its mirror image about ``c + offset/2``.

    ``offset`` is in half-slices from the centre ``c = (nz − 1)/2``; the score is ``Σ_w Σ_z P(z)·P(k − z) / Σ P²``
    with ``k = nz − 1 + offset`` (a convolution along z), i.e. the normalised overlap of P with its mirror.
    """
    from scipy.ndimage import gaussian_filter
    from scipy.signal import fftconvolve

    from engines.rotate3d import rotate_plane

    nz = proj.shape[0]
    best = (0.0, 0.0, -np.inf)
    lo, hi = split_range
    ks = np.arange(nz - 1 + lo, nz - 1 + hi + 1)
    ks = ks[(ks >= 0) & (ks <= 2 * nz - 2)]
    if len(ks) == 0:
        return best
    # Blur before rotating: bilinear interpolation of a smooth image loses little. What it still loses
    # depends on the angle (none at 0°), so the overlap is divided by the image energy, else the search
    # would prefer angles that interpolate least over the right one.
    base = gaussian_filter(proj.astype(np.float64), blur) if blur > 0 else proj.astype(np.float64)
    per_angle: list[tuple[float, float, float]] = []  # (angle, refined offset, refined score)
    for a in angles:
        p = rotate_plane(base, float(a)) if a != 0 else base
        energy = float(np.sum(p * p))
        if energy <= 0:
            per_angle.append((float(a), 0.0, -np.inf))
            continue
        conv = fftconvolve(p, p, axes=0).sum(axis=1)  # index k = z1 + z2, 0 … 2nz − 2
        scores = conv[ks] / energy
        i = int(np.argmax(scores))
        # Sub-slice vertex: on the integer grid of k a mirror between grid points would otherwise be
        # matched by tilting the projection instead (angle and position trade off).
        off, val = float(ks[i] - (nz - 1)), float(scores[i])
        if 0 < i < len(ks) - 1:
            d, val = _vertex(*scores[i - 1 : i + 2])
            off += d
        per_angle.append((float(a), off, val))
    j = int(np.argmax([v for _, _, v in per_angle]))
    angle, off, val = per_angle[j]
    if 0 < j < len(per_angle) - 1 and all(np.isfinite(per_angle[j + t][2]) for t in (-1, 1)):
        d, val = _vertex(per_angle[j - 1][2], val, per_angle[j + 1][2])
        step = per_angle[j + 1][0] - angle
        angle += d * step
        # The mirror offset at the refined angle: interpolate between the neighbouring angles' offsets.
        nb = per_angle[j + 1] if d > 0 else per_angle[j - 1]
        off += abs(d) * (nb[1] - off)
    return angle, off, val


def _vertex(ym: float, y0: float, yp: float) -> tuple[float, float]:
    """Offset (within ±0.5 steps) and value of the vertex of the parabola through three samples."""
    den = ym - 2 * y0 + yp
    if den >= 0:
        return 0.0, y0
    d = float(np.clip(0.5 * (ym - yp) / den, -0.5, 0.5))
    return d, float(y0 - 0.25 * (ym - yp) * d)


#: Index sums (half-slices) either side of the projection's mirror that the 3-D refinement scores.
REFINE_REACH = 2


def refine_mirror_3d(part: torch.Tensor, first: int, nz: int, offset: float,
                     reach: int = REFINE_REACH) -> float | None:
    """Sub-slice mirror offset (half-slices from the centre) from the rotated planes ``part`` themselves.

    ``part`` holds planes ``first …`` of a rotated volume of ``nz`` planes. For index sums ``k`` (mirror at
    ``k / 2``) within ``reach`` of the projection's ``offset`` the score is the volume's overlap with its mirror
    image over the data's support, ``Σ_z ⟨V_z, V_{k−z}⟩ / Σ_z ⟨V_z², S_{k−z}⟩`` (S: where the data are, as
    fusion's coverage masks find it). A max projection mixes structures at different depths and its support is
    not symmetric about the mirror, which moves the projection's peak by up to a slice on filaments; the 3-D
    overlap pairs each voxel with its own mirror voxel, and the normaliser only counts pairs that can match.
    Returns None when the scores have no interior maximum (the projection's offset then stands).
    """
    import torch

    from engines.rldfn.coverage import coverage_mask

    n = int(part.shape[0])
    if n < 3:
        return None
    v = part.float()
    sq = v * v
    flipped = torch.flip(v, [0]).flatten(1)
    support = torch.flip(coverage_mask(v), [0]).flatten(1).float()
    v, sq = v.flatten(1), sq.flatten(1)
    k0 = int(round(nz - 1 + offset))

    def score(k: int) -> float:
        kl = k - 2 * first  # z + z' = kl in part's own indices; part[z'] = flipped[n − 1 − z']
        z0, z1 = max(0, kl - (n - 1)), min(n - 1, kl)
        if z1 < z0:
            return -math.inf
        a = slice(z0, z1 + 1)
        b = slice(n - 1 - kl + z0, n - kl + z1)
        den = float(torch.dot(sq[a].reshape(-1), support[b].reshape(-1)))
        return float(torch.dot(v[a].reshape(-1), flipped[b].reshape(-1))) / den if den > 0 else -math.inf

    ks = list(range(k0 - reach - 1, k0 + reach + 2))
    vals = [score(k) for k in ks]
    inner = range(1, len(ks) - 1)
    i = max(inner, key=lambda j: vals[j])
    if not all(math.isfinite(vals[j]) for j in (i - 1, i, i + 1)) or vals[i] < max(vals[i - 1], vals[i + 1]):
        return None
    d, _ = _vertex(vals[i - 1], vals[i], vals[i + 1])
    return float(ks[i] + d - (nz - 1))


def mirror_contrast(proj: np.ndarray, angle: float, offset: float, blur: float, scale: float = 8.0) -> float:
    """How well the fine structure of a (Z, W) projection matches its mirror image about the found plane.

    The projection (rotated by ``angle``, blurred by ``blur``) is high-passed by subtracting its Gaussian blur of
    σ = ``scale`` px, then correlated with itself mirrored about ``c + offset/2`` and normalised by its energy.
    The plain overlap of :func:`mirror_search` is high for any compact cell (a blob resembles its own mirror
    image about its middle); the fine structure only matches when a real mirror made it twice.
    """
    from scipy.ndimage import gaussian_filter, map_coordinates

    from engines.rotate3d import rotate_plane

    p = np.asarray(proj, np.float64)
    p = rotate_plane(p, float(angle)) if angle != 0 else p
    p = gaussian_filter(p, blur) if blur > 0 else p
    hp = p - gaussian_filter(p, scale)
    energy = float(np.sum(hp * hp))
    if energy <= 0:
        return 0.0
    nz = p.shape[0]
    k = nz - 1 + float(offset)  # z ↔ k − z, sampled at fractional k by linear interpolation
    z = np.arange(nz, dtype=np.float64)
    zz, ww = np.meshgrid(k - z, np.arange(p.shape[1], dtype=np.float64), indexing="ij")
    mirrored = map_coordinates(hp, [zz, ww], order=1, mode="constant", cval=0.0)
    return float(np.sum(hp * mirrored) / energy)


def view_indices(nz: int, offset: float, max_depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Slices of view A and (mirrored, in the same order) view B in a rotated volume of ``nz`` planes."""
    k = int(round(nz - 1 + offset))  # index sum of mirror pairs: z_B = k − z_A
    m = k / 2.0
    z_hi = int(math.ceil(m)) - 1  # last slice strictly below the mirror (the mirror slice itself is dropped)
    depth = min(max_depth, z_hi + 1, nz - k + z_hi)
    if depth < 1:
        raise ViewsError(f"mirror at slice {m} of {nz} leaves no room for two views")
    a_idx = np.arange(z_hi - depth + 1, z_hi + 1)
    return a_idx, k - a_idx


def cut_views(rotated: np.ndarray, offset: float, max_depth: int) -> tuple[np.ndarray, np.ndarray]:
    """View A below the mirror, view B above it flipped along z; common depth, far → near the mirror."""
    a_idx, b_idx = view_indices(rotated.shape[0], offset, max_depth)
    return rotated[a_idx], rotated[b_idx]


def split_views(
    volume: np.ndarray,
    dx_um: float,
    dz_um: float,
    params: ViewsParams | None = None,
    *,
    skew_axis: Literal["x", "y"] = "x",
    device: str | torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray, ViewsReport]:
    """Rotate a deskewed volume so the mirror is horizontal, find the mirror and cut the two views.

    Parameters
    ----------
    volume
        Deskewed (and band-removed) volume (nz, ny, nx).
    dx_um
        Lateral voxel size (µm); also the isotropic voxel size of the output.
    dz_um
        Spacing of the deskewed planes (µm), i.e. stage step · sin(skew angle).
    params
        :class:`ViewsParams`; default the reference's.
    skew_axis
        Deskewed axis of ``volume``; for ``"y"`` the volume is split as its (z, x, y) transpose and the views
        are transposed back.
    device
        As for :func:`engines.device.pick_device`.

    Returns
    -------
    view_a, view_b : numpy.ndarray
        float32 (depth, ny', nx') each; B is flipped along z so that it overlays A.
    report : ViewsReport
    """
    from engines.device import pick_device, to_device, to_host

    params = params or ViewsParams()
    arr = np.asarray(volume)
    if arr.ndim != 3:
        raise ViewsError(f"volume must be 3-D (planes, rows, columns); got shape {arr.shape}")
    dev = pick_device(str(device) if device is not None else None)
    view_a, view_b, report = split_views_tensor(to_device(np.asarray(arr, dtype=np.float32), dev), dx_um, dz_um,
                                                params, skew_axis=skew_axis)
    return np.ascontiguousarray(to_host(view_a)), np.ascontiguousarray(to_host(view_b)), report


def split_views_tensor(
    volume: torch.Tensor,
    dx_um: float,
    dz_um: float,
    params: ViewsParams | None = None,
    *,
    skew_axis: Literal["x", "y"] = "x",
) -> tuple[torch.Tensor, torch.Tensor, ViewsReport]:
    """:func:`split_views` on a tensor's device: views come back as float32 tensors there.

    Only the 2-D projections the mirror search needs (and one finiteness flag) are read back to the host.
    """
    import torch

    from engines.device import probe_to_host
    from engines.rotate3d import iter_rotated_tensor, rot_x, rot_y, rotate_volume_tensor, rotated_shape

    params = params or ViewsParams()
    if volume.ndim != 3:
        raise ViewsError(f"volume must be 3-D (planes, rows, columns); got shape {tuple(volume.shape)}")
    if skew_axis not in ("x", "y"):
        raise ViewsError(f"skew axis must be 'x' or 'y', got {skew_axis!r}")
    if skew_axis == "y":
        a, b, rep = split_views_tensor(volume.transpose(1, 2), dx_um, dz_um, params)
        return a.transpose(1, 2).contiguous(), b.transpose(1, 2).contiguous(), rep
    shape = tuple(int(n) for n in volume.shape)
    if min(shape) < 2:
        raise ViewsError(f"volume {shape} is too small: need at least 2 voxels per axis")
    for name, val in (("dx", dx_um), ("dz", dz_um)):
        if not (math.isfinite(val) and val > 0):
            raise ViewsError(f"voxel size {name} must be a positive number of µm, got {val!r}")
    arr = volume.to(torch.float32).contiguous()  # once, not in every resampling pass
    bad = int(arr.numel() - int(torch.isfinite(arr).sum()))
    if bad:
        # else the mirror search sees no signal and reports a misleading "no room for two views"
        raise ViewsError(f"volume {shape} holds {bad} NaN or infinite voxels; cannot find the mirror plane")
    spacing = (float(dz_um), float(dx_um), float(dx_um))
    r0 = rot_y(params.angle_deg)
    full = rotated_shape(shape, spacing, r0, dx_um)
    oshape = shape if params.keep_shape else full
    b = params.border_px

    def trimmed(v: torch.Tensor) -> torch.Tensor:
        return v[:, b : v.shape[1] - b or None, b : v.shape[2] - b or None] if b else v

    def projection(rot: np.ndarray, axis: int) -> np.ndarray:
        # Max projection of the rotated volume, built chunk by chunk: the whole rotated volume (often several
        # times the input) is never held, only the planes the views keep are resampled at the end.
        parts = [trimmed(c).amax(dim=axis) for _, c in iter_rotated_tensor(arr, spacing, rot, out_spacing=dx_um,
                                                                            out_shape=oshape)]
        return probe_to_host(torch.cat(parts, dim=0))

    if b and (oshape[1] <= 2 * b or oshape[2] <= 2 * b):
        raise ViewsError(f"border_px={b} removes the whole {oshape[1]}×{oshape[2]} projection")
    with torch.no_grad():
        proj_x = projection(r0, 2)
        ax, offset, score = mirror_search(
            proj_x, _steps(*params.x_range_deg, params.x_step_deg), params.split_range, params.blur_px
        )
        rot = rot_x(ax) @ r0
        dy = 0.0
        if params.y_range_deg != (0.0, 0.0):
            dy, offset, score = mirror_search(
                projection(rot, 1), _steps(*params.y_range_deg, params.y_step_deg), params.split_range,
                params.blur_px
            )
            # The y correction was found on the x-corrected volume, so it is applied last.
            rot = rot_y(dy) @ rot
        contrast = mirror_contrast(proj_x, ax, offset, params.blur_px)
        if contrast < params.mirror_threshold:
            raise NoMirrorError(
                f"no mirror image found in this {'×'.join(map(str, shape))} volume (mirror contrast {contrast:.2f}, "
                f"below {params.mirror_threshold:g}): it looks like ordinary single-view LLSM data; reconstruct it "
                "with --mode single-view"
            )
        n_rot = oshape[0]
        a_idx, b_idx = view_indices(n_rot, offset, params.max_depth)
        lo, hi = int(a_idx.min()), int(b_idx.max()) + 1
        coarse: float | None = None
        if params.refine_mirror:
            # a few planes more at each end, so that a refined cut one or two planes away needs no new rotation
            m = REFINE_REACH + 1
            lo, hi = max(lo - m, 0), min(hi + m, n_rot)
        part = rotate_volume_tensor(arr, spacing, rot, out_spacing=dx_um, out_shape=oshape, z_slices=(lo, hi))
        if params.refine_mirror:
            refined = refine_mirror_3d(part, lo, n_rot, offset)
            if refined is not None:
                coarse, offset = offset, refined
                a_idx, b_idx = view_indices(n_rot, offset, params.max_depth)
        # the mirror lies between index sums: view B's planes sit ``frac`` planes beyond b_idx
        frac = (n_rot - 1 + offset) - int(round(n_rot - 1 + offset)) if params.interpolate_gap else 0.0
        step = 1 if frac > 0 else -1
        need_lo = min(int(a_idx.min()), int(b_idx.min()) + min(step, 0))
        need_hi = max(int(a_idx.max()), int(b_idx.max()) + max(step, 0)) + 1
        need_lo, need_hi = max(need_lo, 0), min(need_hi, n_rot)
        if need_lo < lo or need_hi > hi:  # the cut moved past the margin
            lo, hi = need_lo, need_hi
            part = rotate_volume_tensor(arr, spacing, rot, out_spacing=dx_um, out_shape=oshape, z_slices=(lo, hi))
        ia = torch.from_numpy(a_idx - lo).to(part.device)
        ib = torch.from_numpy(b_idx - lo).to(part.device)
        view_a, view_b = part.index_select(0, ia), part.index_select(0, ib)
        if abs(frac) > 1e-6:
            # linear interpolation to the true mirror planes, so that the views are registered to a fraction of
            # a voxel instead of up to half a slice apart; a plane beyond the rotated volume repeats the last one
            ib2 = torch.from_numpy(np.clip(b_idx + step, lo, hi - 1) - lo).to(part.device)
            view_b = view_b * (1 - abs(frac)) + part.index_select(0, ib2) * abs(frac)
    report = ViewsReport(
        angle_y_deg=params.angle_deg + dy,
        angle_y_correction_deg=dy,
        angle_x_deg=ax,
        split_index=(n_rot - 1 + offset) / 2.0,
        split_offset=offset,
        projection_offset=coarse,
        depth=int(view_a.shape[0]),
        rotated_shape=(int(oshape[0]), int(oshape[1]), int(oshape[2])),
        voxel_um=float(dx_um),
        score=score,
        mirror_contrast=contrast,
    )
    return view_a, view_b, report


def check_mirror_tensor(volume: torch.Tensor, dx_um: float, dz_um: float, params: ViewsParams | None = None) -> float:
    """Mirror contrast of a deskewed volume (skew axis last) on its device; :class:`NoMirrorError` below threshold.

    The chain calls this on the preprocessed volume *before* lateral SR, where the data are what the camera saw:
    a network (above all an untrained one) may scramble the fine structure the contrast compares, and
    :func:`split_views_tensor` is then called with ``mirror_threshold=0``.
    """
    import torch

    from engines.device import probe_to_host
    from engines.rotate3d import iter_rotated_tensor, rot_y, rotated_shape

    params = params or ViewsParams()
    shape = tuple(int(n) for n in volume.shape)
    if len(shape) != 3 or min(shape) < 2:
        raise ViewsError(f"volume must be 3-D with at least 2 voxels per axis; got shape {shape}")
    arr = volume.to(torch.float32).contiguous()
    spacing = (float(dz_um), float(dx_um), float(dx_um))
    r0 = rot_y(params.angle_deg)
    oshape = shape if params.keep_shape else rotated_shape(shape, spacing, r0, dx_um)
    with torch.no_grad():
        parts = [c.amax(dim=2) for _, c in iter_rotated_tensor(arr, spacing, r0, out_spacing=dx_um, out_shape=oshape)]
        proj = probe_to_host(torch.cat(parts, dim=0))
    ax, offset, _ = mirror_search(proj, _steps(*params.x_range_deg, params.x_step_deg), params.split_range,
                                  params.blur_px)
    contrast = mirror_contrast(proj, ax, offset, params.blur_px)
    if contrast < params.mirror_threshold:
        raise NoMirrorError(
            f"no mirror image found in this {'×'.join(map(str, shape))} volume (mirror contrast {contrast:.2f}, "
            f"below {params.mirror_threshold:g}): it looks like ordinary single-view LLSM data; reconstruct it "
            "with --mode single-view"
        )
    return contrast
