"""Classical dual-view fusion: joint Richardson–Lucy deconvolution of both views, no network.

For users without RL-DFN weights. Each iteration updates one estimate of the object from view A, then from
view B (the "sequential" joint RL of multiview light-sheet deconvolution):

``x ← x · (PSFᵀ_v ⊗ (view_v / (PSF_v ⊗ x)))``   for v = A, B

where ``⊗`` is convolution and ``PSFᵀ`` the flipped PSF (textbook RL; the reference's own RL step uses the
unflipped PSF, identical for point-symmetric PSFs). Because each view is sharp along directions where the
other is blurred, the estimate gathers the best resolution of both. Convolutions use real FFTs in float32
on the chosen device; the volume is mirror-padded by at least the PSF's half-size (up to a fast FFT length) so
that the FFT's wrap-around does not bleed one face into the opposite one.

Each view only updates the estimate where it has data (:mod:`engines.rldfn.coverage`): its ratio is neutral
outside its coverage and blends in over a few voxels at the edge, the first estimate is the coverage-weighted
mean of the views, and view B is brought to view A's brightness first. A region that only one view covers is
therefore deconvolved by that view alone. ``coverage=None`` gives the plain joint RL of both whole views.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from engines.device import pick_device
from engines.rldfn.coverage import blend_weight, coverage_mask, relative_gain
from engines.rldfn.errors import VolumeShapeError

#: Floor for the blurred estimate and the estimate itself: keeps ratios finite where both are zero.
EPS = 1e-6

#: Default Richardson–Lucy iterations (classical, sr-rl, single-view). Measured against the simulator's truth
#: (BENCHMARKS.md, "Resolution against the truth"): 30 coverage-weighted iterations sharpen beads from 180/300 nm
#: (10 iterations; best-matching blur, lateral/axial) to 155/250 nm without hot voxels; 10 left that unused.
DEFAULT_ITERATIONS = 30

_DIMS = (-3, -2, -1)

#: Total-variation weight λ of the Richardson–Lucy–TV update (Dey et al., Microsc. Res. Tech. 2006) available
#: where only one view has data (scaled by 1 − the second view's weight, so 0 where both views are trusted):
#: ``1 / (1 − λ·div(∇u/|∇u|))`` shrinks isolated peaks and keeps edges. Off by default: with the damped step and
#: the ceiling below it only cost correlation with the truth on the simulator (BENCHMARKS.md, "one-view regions").
DEFAULT_TV_ONE_VIEW = 0.0

#: Exponent α of the RL correction (``estimate · correction**α``) where only one view is trusted, blended
#: to 1 where two are: a damped RL step, so a one-view region gets fewer effective iterations than the
#: two-view region, whose two corrections per iteration it would otherwise chase with one noisy view.
DEFAULT_ONE_VIEW_STEP = 0.3

#: Ceiling κ of the estimate where only one view is trusted, in units of the views' 99.99th percentile (over the
#: voxels they trust): ``estimate ≤ κ·p / (1 − w₂)`` with w₂ the second-highest view weight, so the bound is κ·p
#: in a one-view region, relaxes smoothly across the blend zone and vanishes where two views are trusted. A
#: region seen through one elongated PSF cannot tell a sharp bright point from noise along that PSF, and RL
#: puts the flux into a few hot voxels; the bound is the box constraint of projected RL (the data say how
#: bright the sample is, so one view alone may not invent voxels far beyond that). Measured in BENCHMARKS.md.
DEFAULT_ONE_VIEW_CEILING = 1.8

#: Fraction of covered voxels above the percentile the ceiling is measured from (99.99th).
_CEILING_QUANTILE = 1e-4

#: |div(∇u/|∇u|)| ≤ 6 on a 3-D grid, so λ < 1/6 keeps the TV factor positive.
_MAX_TV = 1.0 / 6.0


def tv_divergence(u: torch.Tensor, eps: float) -> torch.Tensor:
    """div(∇u / |∇u|_ε) of a (Z, Y, X) volume: forward differences for ∇, backward ones for div (adjoint pair)."""
    g = [torch.diff(u, dim=d, append=u.narrow(d, u.shape[d] - 1, 1)) for d in range(-3, 0)]  # 0 at the far face
    norm = torch.sqrt(g[0] ** 2 + g[1] ** 2 + g[2] ** 2 + eps * eps)
    div = torch.zeros_like(u)
    for d, gd in zip(range(-3, 0), g):
        n = gd / norm
        div += torch.diff(n, dim=d, prepend=torch.zeros_like(n.narrow(d, 0, 1)))
    return div


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


def _reflect_index(n: int, lo: int, hi: int) -> np.ndarray:
    # indices of a symmetric ("reflect", edge not repeated) padding of any width, repeated as often as needed
    idx = np.arange(-lo, n + hi)
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    idx = np.mod(idx, period)
    return np.where(idx >= n, period - idx, idx)


def reflect_pad(x: torch.Tensor, pads: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Mirror-pad the last three axes of ``x`` by ``pads`` (like ``numpy.pad(mode="reflect")``), on its device."""
    for ax, (lo, hi) in zip((-3, -2, -1), pads):
        if lo or hi:
            idx = torch.from_numpy(_reflect_index(x.shape[ax], lo, hi)).to(x.device)
            x = torch.index_select(x, ax % x.ndim, idx)
    return x


Coverage = Literal["auto"] | Sequence[torch.Tensor] | None


def high_percentile(views: Sequence[torch.Tensor], weights: Sequence[torch.Tensor],
                    top: float = _CEILING_QUANTILE) -> float:
    """The largest of the views' upper percentiles (fraction ``top`` of their trusted voxels above it).

    ``torch.quantile`` refuses volumes over 2**24 voxels; the top-k of the trusted voxels is exact and cheap.
    """
    best = 0.0
    for v, w in zip(views, weights):
        vals = v[w > 0]
        if vals.numel():
            k = max(1, math.ceil(vals.numel() * top))
            best = max(best, float(vals.topk(k).values[-1]))
    return best


@dataclass(frozen=True)
class VolumeTerms:
    """What :func:`weighted_rl` measures on the whole volume before iterating: the later views' gains onto the
    first view's brightness, the views' upper percentile (the one-view ceiling's unit) and the TV floor. Given,
    a block of the volume is deconvolved on the whole volume's terms (:mod:`engines.rldfn.blocked_rl`)."""

    gains: tuple[float, ...]
    level: float
    tv_eps: float


def clean_views(views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``views`` as float32, non-finite values and negatives set to 0: what :func:`weighted_rl` deconvolves."""
    return [torch.clamp(torch.nan_to_num(v.float(), nan=0.0, posinf=0.0, neginf=0.0), min=0) for v in views]


def coverage_weights(views: Sequence[torch.Tensor], coverage: Coverage) -> list[torch.Tensor] | None:
    """Each cleaned view's coverage weight as :func:`weighted_rl` uses it: found from the data (``"auto"``), the
    given volumes on the views' device, or None (plain RL)."""
    if coverage is None:
        return None
    if isinstance(coverage, str):
        if coverage != "auto":
            raise VolumeShapeError(f"coverage must be 'auto', None or one weight volume per view, got {coverage!r}")
        return [blend_weight(coverage_mask(v)) for v in views]
    shape = tuple(views[0].shape)
    weights = [torch.as_tensor(w, dtype=torch.float32).to(views[0].device) for w in coverage]
    if len(weights) != len(views) or any(tuple(w.shape) != shape for w in weights):
        raise VolumeShapeError(f"coverage must give one weight volume of the views' shape {shape} per view")
    return weights


def volume_terms(views: Sequence[torch.Tensor], weights: Sequence[torch.Tensor]) -> VolumeTerms:
    """:class:`VolumeTerms` of whole ``views`` with their coverage ``weights``, as :func:`weighted_rl` finds them."""
    vs = clean_views(views)
    gains = tuple(float(relative_gain(vs[0], v, weights[0], w)) for v, w in zip(vs[1:], weights[1:]))
    scaled = [vs[0]] + [v * g for v, g in zip(vs[1:], gains)]
    wsum = sum(weights)
    start = sum(w * v for w, v in zip(weights, scaled)) / torch.clamp(wsum, min=1e-6)  # type: ignore[arg-type]
    return VolumeTerms(gains, high_percentile(scaled, weights), 1e-3 * float(start.mean()))


def weighted_rl(
    views: Sequence[torch.Tensor],
    psfs: Sequence[np.ndarray],
    iterations: int,
    coverage: Coverage = "auto",
    progress: Callable[[int, int], None] | None = None,
    tv_one_view: float = DEFAULT_TV_ONE_VIEW,
    one_view_step: float | None = None,
    one_view_ceiling: float | None = None,
    terms: VolumeTerms | None = None,
) -> torch.Tensor:
    """Richardson–Lucy of one or more registered (Z, Y, X) views, each weighted by its coverage, on their device.

    Each iteration updates the estimate from every view in turn. ``coverage``: ``"auto"`` finds each view's
    data (:func:`~engines.rldfn.coverage.coverage_mask`) and weights it with a smooth edge; one (Z, Y, X)
    weight volume in [0, 1] per view gives the weights; ``None`` treats every view as covering the whole
    volume (plain RL). With weights, every view is brought to the first view's brightness where both are
    trusted, and the result is in the first view's units. ``tv_one_view`` (λ of RL–TV, ≥ 0, < 1/6) regularises
    where fewer than two views are trusted (:data:`DEFAULT_TV_ONE_VIEW`); ``one_view_step`` (α in [0, 1], None for
    :data:`DEFAULT_ONE_VIEW_STEP`) damps the correction there to ``correction**α``; ``one_view_ceiling`` (κ > 0,
    ``math.inf`` for none, None for :data:`DEFAULT_ONE_VIEW_CEILING`) bounds the estimate there by κ × the views'
    99.99th percentile. All three need weights and two or more views; where two views are trusted the update is
    the plain one. ``terms`` (with weights only) replaces what is measured on ``views`` before iterating by the
    whole volume's, when ``views`` are a block of it.
    """
    if len(views) != len(psfs) or not views:
        raise VolumeShapeError(f"need one PSF per view, got {len(views)} views and {len(psfs)} PSFs")
    if not 0.0 <= float(tv_one_view) < _MAX_TV:
        raise VolumeShapeError(f"tv_one_view must be in [0, 1/6), got {tv_one_view}")
    if one_view_step is not None and not 0.0 <= float(one_view_step) <= 1.0:
        raise VolumeShapeError(f"one_view_step must be in [0, 1], got {one_view_step}")
    kappa = DEFAULT_ONE_VIEW_CEILING if one_view_ceiling is None else float(one_view_ceiling)
    if not kappa > 0:  # also refuses NaN
        raise VolumeShapeError(f"one_view_ceiling must be > 0 (math.inf for none), got {one_view_ceiling}")
    dev = views[0].device
    shape = tuple(views[0].shape)
    vs = clean_views(views)
    weights = coverage_weights(vs, coverage)
    if weights is not None:
        gains = terms.gains if terms is not None else [relative_gain(vs[0], v, weights[0], w)
                                                       for v, w in zip(vs[1:], weights[1:])]
        vs = [vs[0]] + [v * g for v, g in zip(vs[1:], gains)]
    pads = _pad_widths(shape, psfs)
    padded_views = [reflect_pad(v, pads) for v in vs]
    padded = tuple(padded_views[0].shape)
    otfs = [centred_otf(p, padded, dev) for p in psfs]

    def conv(x: torch.Tensor, otf: torch.Tensor, adjoint: bool = False) -> torch.Tensor:
        spec = torch.fft.rfftn(x, dim=_DIMS) * (otf.conj() if adjoint else otf)
        return torch.fft.irfftn(spec, s=padded, dim=_DIMS)

    with torch.inference_mode():
        if weights is None:
            estimate = torch.clamp(sum(padded_views) / len(padded_views), min=EPS)
            ws: list[torch.Tensor | None] = [None] * len(padded_views)
        else:
            ws = [reflect_pad(w, pads) for w in weights]
            wsum = sum(ws)
            hard = [(w > 0).float() for w in ws]
            # start from the coverage-weighted mean: in a one-view region that view, not a fraction of it
            soft = sum(w * v for w, v in zip(ws, padded_views)) / torch.clamp(wsum, min=1e-6)
            hard_mean = sum(h * v for h, v in zip(hard, padded_views)) / torch.clamp(sum(hard), min=1)
            estimate = torch.clamp(torch.where(wsum > 1e-3, soft, hard_mean), min=EPS)
        lam: torch.Tensor | None = None
        alpha: torch.Tensor | None = None
        ceiling: torch.Tensor | None = None
        step = DEFAULT_ONE_VIEW_STEP if one_view_step is None else float(one_view_step)
        if weights is not None and len(ws) > 1:
            stacked = torch.stack(ws)  # type: ignore[arg-type]
            second = stacked.topk(2, dim=0).values[1]  # 1 where two views are trusted, 0 where one or none
            del stacked
            if tv_one_view > 0:
                lam = tv_one_view * (1 - second)
                tv_eps = terms.tv_eps if terms is not None else 1e-3 * float(estimate.mean())
            if step != 1.0:
                alpha = 1 - (1 - step) * (1 - second)
            if math.isfinite(kappa):
                level = terms.level if terms is not None else high_percentile(vs, weights)  # type: ignore[arg-type]
                if level > 0:
                    ceiling = (kappa * level) / torch.clamp(1 - second, min=1e-6)
                    estimate = torch.minimum(estimate, ceiling)
        for it in range(int(iterations)):
            if lam is not None:
                estimate = estimate / (1 - lam * tv_divergence(estimate, tv_eps))
            for view, otf, w in zip(padded_views, otfs, ws):
                ratio = view / torch.clamp(conv(estimate, otf), min=EPS)
                if w is not None:
                    ratio = 1 + w * (ratio - 1)  # neutral where this view has no data
                corr = conv(ratio, otf, adjoint=True)
                if alpha is not None:  # damped step where one view is trusted: corr**α, α = 1 where two are
                    corr = torch.clamp(corr, min=EPS).pow_(alpha)
                estimate = torch.clamp(estimate * corr, min=EPS)
                if ceiling is not None:  # projected RL: the box constraint where one view is trusted
                    estimate = torch.minimum(estimate, ceiling)
            if progress is not None:
                progress(it + 1, int(iterations))
    inner = tuple(slice(lo, lo + n) for (lo, _), n in zip(pads, shape))
    return estimate[inner]


def joint_rl(
    view_a: torch.Tensor,
    view_b: torch.Tensor,
    psf_a: np.ndarray,
    psf_b: np.ndarray,
    iterations: int,
    coverage: Coverage = "auto",
    progress: Callable[[int, int], None] | None = None,
    tv_one_view: float = DEFAULT_TV_ONE_VIEW,
    one_view_step: float | None = None,
    one_view_ceiling: float | None = None,
) -> torch.Tensor:
    """Joint Richardson–Lucy of two views (:func:`weighted_rl`), on their device."""
    return weighted_rl([view_a, view_b], [psf_a, psf_b], iterations, coverage, progress, tv_one_view, one_view_step,
                       one_view_ceiling)


def classical_fuse(
    view_a: np.ndarray | torch.Tensor,
    view_b: np.ndarray | torch.Tensor,
    psf_a: np.ndarray,
    psf_b: np.ndarray,
    iterations: int = DEFAULT_ITERATIONS,
    device: str | torch.device | None = None,
    progress: Callable[[int, int], None] | None = None,
    coverage: Coverage = "auto",
    tv_one_view: float = DEFAULT_TV_ONE_VIEW,
    one_view_step: float | None = None,
    one_view_ceiling: float | None = None,
    memory_budget_bytes: int | None = None,
) -> np.ndarray:
    """Fuse two registered views by joint Richardson–Lucy deconvolution, each view weighted by its coverage.

    Parameters
    ----------
    view_a, view_b
        The two views on one grid, (Z, Y, X), background already subtracted (negative values are clipped);
        numpy arrays or torch tensors.
    psf_a, psf_b
        The views' PSFs on the same voxel grid, (Z, Y, X), bead at the centre voxel
        (e.g. from :func:`engines.rldfn.psf.dual_view_psfs`).
    iterations
        Joint iterations (each uses both views once); default :data:`DEFAULT_ITERATIONS`, measured against truth.
    device
        Torch device (default: :func:`engines.device.pick_device`).
    progress
        Called as ``progress(done, total)`` after each iteration.
    coverage
        ``"auto"`` (default): each view updates the estimate only where it has data (exact zeros outside it,
        as step 3 leaves them), with a smooth edge, and view B is scaled to view A's brightness; two (Z, Y, X)
        weight volumes in [0, 1] give the weights directly; ``None``: plain joint RL over the whole volume.
    memory_budget_bytes
        Deconvolve in overlapping blocks where the whole volume's estimated peak exceeds it
        (:mod:`engines.rldfn.blocked_rl`); ``None``: the whole volume at once.

    Returns
    -------
    np.ndarray
        float32 fused volume of the views' shape, in view A's intensity units.
    """
    from engines.rldfn.fuse import check_views  # one shape check for both modes

    check_views(view_a, view_b)
    for name, p in (("view-A PSF", psf_a), ("view-B PSF", psf_b)):
        if np.ndim(p) != 3:
            raise VolumeShapeError(f"{name} must be a 3-D stack (Z, Y, X), got shape {tuple(np.shape(p))}")
    if int(iterations) < 1:
        raise VolumeShapeError(f"iterations must be ≥ 1, got {iterations}")
    dev = pick_device(str(device) if device is not None else None)
    ta, tb = (torch.as_tensor(np.asarray(v, np.float32) if not isinstance(v, torch.Tensor) else v).to(dev)
              for v in (view_a, view_b))
    from engines.rldfn.blocked_rl import joint_rl_within

    out = joint_rl_within(ta, tb, np.asarray(psf_a), np.asarray(psf_b), int(iterations), coverage,
                          None if memory_budget_bytes is None else int(memory_budget_bytes), progress,
                          tv_one_view=tv_one_view, one_view_step=one_view_step, one_view_ceiling=one_view_ceiling)
    return out.cpu().numpy().astype(np.float32)
