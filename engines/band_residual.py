"""Step 3b of :mod:`engines.background`: measure and subtract the band the reference's mask leaves behind.

The reference attenuates the mirror's epi-fluorescence band with a preset mask (depth 1 − 2·``mod_amp``, widths
``gs_window_px`` and ``scale_factor``·``gs_window_px``) that never matches a given band exactly, so part of it
stays and shows as a bright slab next to the mirror in the views. Here the remainder is measured: the band is
present in every row along the fitted line, sparse structure is not, so a low quantile over rows at each
distance from the line gives the band's profile. See ``docs/geometry.md`` (step 3b) for measurements.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from engines.background import BackgroundParams, BandFit, band_distance

if TYPE_CHECKING:
    import torch


def residual_band(frames: torch.Tensor, fit: BandFit, params: BackgroundParams) -> torch.Tensor:
    """Step 3b: the band left in band-masked frames (nz, nv, nu), as a non-negative volume of the same shape.

    Per plane, the ``residual_quantile`` over rows of the pixels in each 1-px bin of signed distance from the
    band line gives a profile across the band; it is smoothed over planes and across the band, each side's
    floor (its minimum) is taken off, and the rest is spread back along the fitted line.
    """
    import torch
    import torch.nn.functional as F

    nz, nv, nu = frames.shape
    dev = frames.device
    d = band_distance(tuple(frames.shape), fit, dev)
    lo = math.floor(float(d.min()))
    nb = int(math.ceil(float(d.max()))) - lo + 1
    idx = (d - lo).round_().long().clamp_(0, nb - 1)
    key = (torch.arange(nz, device=dev)[:, None, None] * nb + idx).reshape(-1)
    del idx
    # Grouped quantile: sort by value, then stably by key, so each key's values are contiguous and ascending.
    vals = frames.reshape(-1)
    order = torch.argsort(vals)
    k_sorted = key[order]
    order2 = torch.argsort(k_sorted, stable=True)
    v_sorted = vals[order][order2]
    del order, order2
    counts = torch.bincount(key, minlength=nz * nb)
    starts = torch.cumsum(counts, 0) - counts
    pick = starts + (params.residual_quantile * (counts - 1).clamp(min=0).double()).floor().long()
    prof = v_sorted[pick.clamp(max=v_sorted.numel() - 1)].double()
    # Bins with few samples (the frame's corners, where the tilted line leaves it) are not trusted.
    weight = (counts >= max(4, nv // 8)).double()
    prof = (prof * weight).reshape(1, nz, nb)
    weight = weight.reshape(1, nz, nb)

    def smooth(x: torch.Tensor, sigma: float, dim: int) -> torch.Tensor:
        r = max(1, int(math.ceil(3 * sigma)))
        g = torch.exp(-0.5 * (torch.arange(-r, r + 1, device=dev, dtype=torch.float64) / sigma) ** 2)
        g = (g / g.sum()).reshape(1, 1, -1)
        y = x.transpose(dim, -1).reshape(-1, 1, x.shape[dim])
        y = F.conv1d(F.pad(y, (r, r)), g)  # zero padding: normalised by the smoothed weights below
        shape = list(x.transpose(dim, -1).shape)
        return y.reshape(shape).transpose(dim, -1)

    s_z = max(1.0, params.n_average / 2.0)
    prof = smooth(smooth(prof, s_z, 1), 1.5, 2)
    wsm = smooth(smooth(weight, s_z, 1), 1.5, 2)
    prof = torch.where(wsm > 1e-3, prof / wsm.clamp(min=1e-3), torch.zeros_like(prof))[0]  # (nz, nb)
    valid = wsm[0] > 0.5
    # Each side's own floor (the virtual side is dimmer): what rises above it is band.
    centre = -lo  # bin of d = 0
    big = torch.finfo(torch.float64).max
    side = torch.arange(nb, device=dev)[None, :] < centre
    floor_low = torch.where(valid & side, prof, torch.full_like(prof, big)).amin(dim=1, keepdim=True)
    floor_high = torch.where(valid & ~side, prof, torch.full_like(prof, big)).amin(dim=1, keepdim=True)
    floor_low = torch.where(floor_low < big, floor_low, floor_high)
    floor_high = torch.where(floor_high < big, floor_high, floor_low)
    floor = torch.where(side, floor_low, floor_high)
    res = torch.where(valid, (prof - floor).clamp(min=0.0), torch.zeros_like(prof)).float()
    # Spread back: linear interpolation of the profile at every pixel's distance.
    pos = (d - lo).clamp_(0, nb - 1)
    i0 = pos.floor().long().clamp_(max=nb - 2) if nb > 1 else pos.floor().long()
    t = pos - i0
    zi = torch.arange(nz, device=dev)[:, None, None].expand_as(i0)
    if nb == 1:
        return res[zi, i0]
    return res[zi, i0] * (1 - t) + res[zi, i0 + 1] * t
