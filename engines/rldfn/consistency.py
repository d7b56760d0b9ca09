"""Is a network's fused volume rigidly registered to its views? Measured per stack, reported, warned about.

:func:`engines.rldfn.align.align_to_views` removes one rigid shift. A fusion network may also move different
parts of the volume by different amounts (a network trained on other data, or too briefly): no rigid shift
removes that, and structures in the fused volume then sit up to a voxel or more from where the views put them.
This measures the shift left after alignment on the whole trusted region and on each half of the volume along
every axis (halves overlap by :data:`OVERLAP` voxels); the spread between halves tells a rigid residual from a
warped output. Measured on the simulator (64×128×128 raw, seed 0): the network-free fusion of mode sr-rl spreads
0.06–0.25 voxel between halves (the measure's own noise on sparse beads), the shipped demo RL-DFN 1.4–1.8 voxel.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from engines.rldfn.align import forward_shift

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
    residual_voxels: Shift | None = Field(description="Shift left over the whole trusted region (None: "
                                          "not measurable, e.g. too little structure).")
    halves_voxels: dict[str, Shift | None] = Field(description="Shift left in each half of the volume "
                                                   "(z0 = first half along z, z1 = second, …).")
    spread_voxels: float | None = Field(description="Largest difference between the halves' shifts along one axis.")
    consistent: bool | None = Field(description=f"spread ≤ {SPREAD_LIMIT} voxel: the fused volume differs from its "
                                    "views by one rigid shift at most; False: warped (the network does not fit "
                                    "this data); None: not measurable.")


def check_registration(fused: torch.Tensor, view_a: torch.Tensor, view_b: torch.Tensor, weight: torch.Tensor,
                       psfs: tuple[np.ndarray, np.ndarray], removed: Shift = (0.0, 0.0, 0.0)) -> RegistrationReport:
    """Measure ``fused`` against its views where ``weight`` (both views' coverage) trusts both; see the module."""
    views = [view_a, view_b]
    whole = forward_shift(fused, views, list(psfs), weight)
    halves: dict[str, Shift | None] = {}
    for ax, name in enumerate("zyx"):
        n = fused.shape[ax]
        mid = n // 2
        for k, (lo, hi) in enumerate(((0, min(n, mid + OVERLAP)), (max(0, mid - OVERLAP), n))):
            sl = tuple(slice(lo, hi) if d == ax else slice(None) for d in range(3))
            halves[f"{name}{k}"] = forward_shift(fused[sl], [v[sl] for v in views], list(psfs), weight[sl])
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
