"""Where only one view has data, RL-DFN's output gives way to the coverage-weighted Richardson–Lucy estimate.

RL-DFN fuses two correction volumes; it is trained on (and only defined for) voxels that both views see. In the
33–55 % of an rLLSM volume that only one view reaches, one of its inputs is an empty view's neutral correction and
the network's output there is whatever that input pattern makes of it — on the simulator it does not correlate
with the sample at all. A region seen by one view is a single-view deconvolution problem, which
:func:`engines.rldfn.classical.joint_rl` solves with each view weighted by its coverage (damped, bounded). This
module blends the two: the network where both views are trusted, the Richardson–Lucy estimate (brought to the
network's intensity scale) where one is, a raised cosine between (the views' own blend weights).
"""

from __future__ import annotations

import torch

#: Fewer trusted two-view voxels than this and the intensity match falls back to the plain ratio of means.
MIN_VOXELS = 64


def intensity_match(fused: torch.Tensor, estimate: torch.Tensor, both: torch.Tensor) -> tuple[float, float]:
    """Gain ``g`` and offset ``c`` with ``g·estimate + c`` on ``fused``'s scale, from the voxels in ``both``.

    Flux above background is matched (background: the median, which a sparse fluorescent sample leaves at its
    background level), not a least-squares slope: a slope shrinks with the two volumes' disagreement, a network
    being sharper than an RL estimate would make the one-view regions dimmer than their neighbours.
    """
    if int(both.sum()) < MIN_VOXELS:
        both = torch.ones_like(both)
    f, e = fused[both].double(), estimate[both].double()
    bf, be = float(f.median()), float(e.median())
    above_f, above_e = float(f.mean()) - bf, float(e.mean()) - be
    if above_f > 0 and above_e > 0:
        gain = above_f / above_e
    else:  # no structure above background: keep the mean level
        mean_e = float(e.mean())
        gain = float(f.mean()) / mean_e if mean_e > 0 else 1.0
        bf = be = 0.0
    return gain, bf - gain * be


def blend_one_view(fused: torch.Tensor, estimate: torch.Tensor, weight_a: torch.Tensor,
                   weight_b: torch.Tensor) -> torch.Tensor:
    """``fused`` where both views are trusted, the matched ``estimate`` where one is, blended by the weights.

    Parameters
    ----------
    fused
        The network's fused volume (Z, Y, X).
    estimate
        A reconstruction of the same views that handles one-view regions (coverage-weighted RL), same grid.
    weight_a, weight_b
        Each view's blend weight (:func:`engines.rldfn.coverage.blend_weight`): 1 inside its data, 0 outside.

    Returns
    -------
    torch.Tensor
        float32, ``fused``'s shape and device, ≥ 0; where neither view has data, what the estimate holds there
        (≈ 0: coverage-weighted RL leaves it at its floor), not the network's output.
    """
    two = torch.minimum(weight_a, weight_b)  # 1 where both views are trusted
    seen = torch.maximum(weight_a, weight_b)  # 1 where at least one is
    gain, offset = intensity_match(fused, estimate, two > 0.99)
    one = torch.clamp(gain * estimate + offset * seen, min=0)
    return (two * fused + (1 - two) * one).float()
