"""VSI-SR network: the 2-D virtual-structured-illumination super-resolution generator.

Seven adjacent lateral planes go in (the centre plane and three on each side); the network predicts the three
"virtual SIM" orientation components of the centre plane on a grid 1.5× finer in y and x.

Architecture (same arithmetic as the published generator, written with ordinary registered sub-modules so that
``torch.onnx.export`` / ``torch.export`` see a plain graph):

* 3×3 conv, 7 → 64 channels, no activation;
* 4 residual groups, each a chain of 4 residual channel-attention blocks (RCAB).  An RCAB is
  conv3×3 → LeakyReLU(0.2) → conv3×3 → LeakyReLU(0.2) → channel attention, plus the block input.
  Channel attention = global mean → 1×1 conv (64 → 4) → ReLU → 1×1 conv (4 → 64) → sigmoid → scale.
  There is no skip connection around a group and none around the whole trunk;
* bilinear resize by exactly 1.5 (half-pixel centres, i.e. ``align_corners=False``);
* conv3×3 64 → 256, LeakyReLU(0.2), conv3×3 256 → 3, LeakyReLU(0.2).

The parameter order of :meth:`VSISR.reference_parameters` matches the flat list used by the published
checkpoints, which is how :mod:`engines.vsisr.checkpoint` maps between the two layouts.
"""

from __future__ import annotations

from pydantic import Field
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from engines.support import StrictModel

#: Upsampling factor in y and x; fixed by the trained weights, not a tunable.
SCALE = 1.5


class VSISRConfig(StrictModel):
    """Hyper-parameters of the VSI-SR generator (defaults = the published model)."""

    version: Literal[1] = 1
    in_channels: int = Field(7, ge=1, le=64, description="Adjacent planes fed to the network.")
    out_channels: int = Field(3, ge=1, le=16, description="Orientation components predicted.")
    features: int = Field(64, ge=16, le=512, description="Feature channels in the trunk.")
    n_groups: int = Field(4, ge=1, le=16, description="Residual groups.")
    n_blocks: int = Field(4, ge=1, le=16, description="RCABs per residual group.")
    reduction: int = Field(16, ge=1, le=64, description="Channel-attention squeeze ratio.")
    head_features: int = Field(256, ge=16, le=1024, description="Channels of the conv after upsampling.")


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    """LeakyReLU(0.2), in place when no autograd graph is being recorded.

    Every call site feeds it a freshly computed conv output, so overwriting is safe; in place it is also
    ~10× faster on channels-last tensors (the out-of-place kernel writes a differently strided copy).
    Under autograd (training) it stays out of place so that no saved tensor is modified.
    """
    return F.leaky_relu(x, 0.2, inplace=not torch.is_grad_enabled())


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation gate: rescales each channel by a weight from the global mean of all channels."""

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(channels, channels // reduction, 1)
        self.excite = nn.Conv2d(channels // reduction, channels, 1)

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """Per-channel gate in (0, 1), shape (N, C, 1, 1)."""
        # mean over (H, W) rather than adaptive_avg_pool2d: identical numbers, exports as ReduceMean.
        y = x.mean(dim=(2, 3), keepdim=True)
        return torch.sigmoid(self.excite(F.relu(self.squeeze(y))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weights(x)


class RCAB(nn.Module):
    """Residual channel-attention block."""

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.ca = ChannelAttention(channels, reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _lrelu(self.conv1(x))
        y = _lrelu(self.conv2(y))
        # x + y·gate in one pass over memory instead of two (the trunk is partly memory-bound on CPU)
        return torch.addcmul(x, y, self.ca.weights(y))


class ResidualGroup(nn.Module):
    """A chain of RCABs (no group-level skip, as in the published network)."""

    def __init__(self, channels: int, n_blocks: int, reduction: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[RCAB(channels, reduction) for _ in range(n_blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class Upsample(nn.Module):
    """Fixed-factor bilinear resize.

    A constant ``scale_factor`` (not an output size computed from the input shape) so that the exported
    graph carries a constant-scale ``Resize`` and works for any input size.  ``recompute_scale_factor=False``
    keeps the sampling positions at ``(i + 0.5) / 1.5 - 0.5``, the same as the published model.
    """

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(
            x, scale_factor=(self.scale, self.scale), mode="bilinear", align_corners=False,
            recompute_scale_factor=False,
        )


class VSISR(nn.Module):
    """VSI-SR generator.

    Parameters
    ----------
    config
        Architecture; the default is the published 7-in / 3-out model.

    Notes
    -----
    Input ``(N, 7, H, W)`` float32, output ``(N, 3, floor(1.5 H), floor(1.5 W))``.
    """

    def __init__(self, config: VSISRConfig | None = None) -> None:
        super().__init__()
        self.config = config or VSISRConfig()
        c = self.config
        self.head = nn.Conv2d(c.in_channels, c.features, 3, padding=1)
        self.groups = nn.Sequential(
            *[ResidualGroup(c.features, c.n_blocks, c.reduction) for _ in range(c.n_groups)]
        )
        self.upsample = Upsample(SCALE)
        self.tail1 = nn.Conv2d(c.features, c.head_features, 3, padding=1)
        self.tail2 = nn.Conv2d(c.head_features, c.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.groups(self.head(x))
        x = self.upsample(x)
        x = _lrelu(self.tail1(x))
        return _lrelu(self.tail2(x))

    def reference_parameters(self) -> list[nn.Parameter]:
        """Parameters in the order of the published flat checkpoint (``vars.0`` … ``vars.N``).

        Per conv: weight then bias.  Order: head; for each group, for each RCAB: conv1, conv2,
        attention squeeze, attention excite; then tail1, tail2.
        """
        convs: list[nn.Conv2d] = [self.head]
        for group in self.groups:
            for block in group.blocks:
                convs += [block.conv1, block.conv2, block.ca.squeeze, block.ca.excite]
        convs += [self.tail1, self.tail2]
        out: list[nn.Parameter] = []
        for conv in convs:
            out += [conv.weight, conv.bias]
        return out


def output_shape(height: int, width: int) -> tuple[int, int]:
    """Lateral size of the network output for an ``height × width`` input (floor of 1.5×, as torch does)."""
    return int(height * SCALE), int(width * SCALE)
