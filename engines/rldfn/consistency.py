"""Is a network's fused volume rigidly registered to its views? Measured per stack, reported, warned about.

:func:`engines.rldfn.align.align_to_views` removes one rigid shift, measured against the views' joint
Richardson–Lucy estimate. A fusion network may also move different parts of the volume by different amounts (a
network trained on other data, or too briefly): no rigid shift removes that, and structures in the fused volume
then sit up to a voxel or more from where the views put them. This measures the shift left after alignment, against
the same estimate, on the whole trusted region and on each half of the volume along every axis (halves overlap by
:data:`OVERLAP` voxels); the spread between halves tells a rigid residual from a warped output. On the simulator
(64×128×128 raw, seed 0) the shipped demo RL-DFN spreads 0.1–0.25 voxel between halves: rigid.
"""

from __future__ import annotations

import logging

import torch
from pydantic import BaseModel, ConfigDict, Field

from engines.rldfn.align import measure_shift

log = logging.getLogger(__name__)

#: Spread (voxels) between the halves' shifts above which the fused volume is called warped against its views.
SPREAD_LIMIT = 0.5

#: Voxels each half reaches past the volume's middle, so that both halves keep structure on the cut.
OVERLAP = 8

Shift = tuple[float, float, float]


class RegistrationReport(BaseModel):
    """How the fused volume sits on its views (voxels, z/y/x; the shift takes the views onto the fused volume)."""

    model_config = ConfigDict(frozen=True)

    removed_voxels: Shift = Field(description="Rigid shift measured and removed by the alignment.")
    residual_voxels: Shift | None = Field(description="Shift left over the whole trusted region, against the "
                                          "views' joint Richardson–Lucy estimate (None: not measurable, e.g. "
                                          "too little structure).")
    halves_voxels: dict[str, Shift | None] = Field(description="Shift left in each half of the volume "
                                                   "(z0 = first half along z, z1 = second, …).")
    spread_voxels: float | None = Field(description="Largest difference between the halves' shifts along one axis.")
    consistent: bool | None = Field(description=f"spread ≤ {SPREAD_LIMIT} voxel: the fused volume differs from its "
                                    "views by one rigid shift at most; False: warped (the network does not fit "
                                    "this data); None: not measurable.")


def check_registration(fused: torch.Tensor, estimate: torch.Tensor, weight: torch.Tensor,
                       removed: Shift = (0.0, 0.0, 0.0)) -> RegistrationReport:
    """Measure ``fused`` against ``estimate`` (the views' joint RL estimate) where ``weight`` (both views'
    coverage) trusts both views; see the module."""
    trusted = (weight > 0.99).float()
    whole = measure_shift(fused, estimate, trusted)
    halves: dict[str, Shift | None] = {}
    for ax, name in enumerate("zyx"):
        # halves of the trusted region's extent, not of the volume: a half with no two-view data measures nothing
        idx = torch.nonzero(trusted.sum(dim=tuple(d for d in range(3) if d != ax)) > 0)
        if idx.numel() == 0:
            halves[f"{name}0"] = halves[f"{name}1"] = None
            continue
        first, last = int(idx[0]), int(idx[-1]) + 1
        mid = (first + last) // 2
        for k, (lo, hi) in enumerate(((0, min(last, mid + OVERLAP)), (max(first, mid - OVERLAP), fused.shape[ax]))):
            sl = tuple(slice(lo, hi) if d == ax else slice(None) for d in range(3))
            halves[f"{name}{k}"] = measure_shift(fused[sl], estimate[sl], trusted[sl])
    found = [s for s in halves.values() if s is not None]
    spread = (max(max(s[ax] for s in found) - min(s[ax] for s in found) for ax in range(3))
              if len(found) >= 2 else None)
    report = RegistrationReport(
        removed_voxels=tuple(float(s) for s in removed), residual_voxels=whole, halves_voxels=halves,
        spread_voxels=spread, consistent=None if spread is None else spread <= SPREAD_LIMIT)
    if report.consistent is False:
        log.warning("the fusion network's output is warped against its views: parts of the volume sit %.2f voxel "
                    "apart (limit %.1f); the network does not fit this data — fine-tune it on this sample or use "
                    "mode sr-rl", spread, SPREAD_LIMIT)
    return report
