"""Where each view has data, and how much to trust it: coverage masks and blending weights for fusion.

After step 3 each view holds data only inside the part of the rotated volume that the deskewed stack reached
(and the deskew itself leaves empty wedges); everywhere else the view is exactly zero. A joint Richardson–Lucy
update that treats those zeros as measurements pulls the estimate towards zero where the *other* view sees
signal, and the two views fight along the edges: speckle, hot voxels, bright lines, background steps. As in
multi-view deconvolution (Preibisch et al., Nat. Methods 2014, weighted updates), each view here gets a
weight that is 1 inside its data, falls smoothly to 0 towards the edge of its data and is 0 outside, and its
Richardson–Lucy ratio is made neutral (1) where its weight is 0 — so a region seen by one view is
deconvolved by that view alone, like a single-view deconvolution.

Everything is torch on the tensors' own device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Gaps of empty voxels inside the data smaller than this (voxels) still count as data: background-subtracted
#: data are clipped at zero, so a noisy background holds many exact zeros, but never a whole 7-voxel run.
CLOSING_VOXELS = 7

#: Width (voxels) of the raised-cosine ramp from the edge of a view's data to full weight.
EDGE_VOXELS = 6


def coverage_mask(view: torch.Tensor, closing: int = CLOSING_VOXELS) -> torch.Tensor:
    """Boolean mask of the voxels of a (Z, Y, X) view that lie inside its data.

    A voxel is covered when it is non-zero or lies in a gap of zeros narrower than ``closing`` voxels
    (a morphological closing of ``view != 0``); the volume's own faces are never treated as an edge.
    """
    if view.ndim != 3:
        raise ValueError(f"coverage_mask expects a (Z, Y, X) volume, got shape {tuple(view.shape)}")
    k = max(1, int(closing) | 1)  # odd
    m = (view != 0).float()[None, None]
    if k > 1:
        m = -_max_filter(-_max_filter(m, k), k)  # dilation then erosion; -inf padding keeps the faces covered
    return m[0, 0] > 0.5


def _max_filter(x: torch.Tensor, k: int) -> torch.Tensor:
    # a cube's max filter is three 1-D ones: k³ → 3k comparisons per voxel
    for kernel in ((k, 1, 1), (1, k, 1), (1, 1, k)):
        x = F.max_pool3d(x, kernel, stride=1, padding=tuple(n // 2 for n in kernel))
    return x


def _box_blur(x: torch.Tensor, k: int) -> torch.Tensor:
    # separable box filter with edge replication, so that the volume's faces never look like an edge
    out = x[None, None]
    for ax in range(3):
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - ax)] = pad[2 * (2 - ax) + 1] = k // 2
        out = F.pad(out, pad, mode="replicate")
        kernel = [1, 1, 1]
        kernel[ax] = k
        out = F.avg_pool3d(out, kernel, stride=1)
    return out[0, 0]


def blend_weight(mask: torch.Tensor, edge: int = EDGE_VOXELS) -> torch.Tensor:
    """float32 weight of a covered region: 0 on and outside its edge, a raised cosine up to 1 ``edge`` voxels in."""
    m = mask.float()
    if edge <= 0:
        return m
    # the box mean of a half-space is 0.5 at its edge and 1 at ``edge`` voxels inside: map [0.5, 1] → [0, 1]
    r = torch.clamp(2 * _box_blur(m, 2 * int(edge) + 1) - 1, 0, 1) * m
    return 0.5 - 0.5 * torch.cos(torch.pi * r)


def relative_gain(view_a: torch.Tensor, view_b: torch.Tensor, weight_a: torch.Tensor,
                  weight_b: torch.Tensor) -> float:
    """Factor that brings view B to view A's brightness, from where both are fully trusted (1.0 if nowhere).

    The mirror reflects less than all the light (about 75 %), so the virtual view is dimmer; fused without
    this, a region seen only by view B would be dimmer than its neighbour seen by both.
    """
    both = (weight_a > 0.99) & (weight_b > 0.99)
    if int(both.sum()) < 64:
        return 1.0
    sa, sb = float(view_a[both].double().sum()), float(view_b[both].double().sum())
    if not (sa > 0 and sb > 0):
        return 1.0
    return sa / sb
