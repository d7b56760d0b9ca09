"""The learned part of RL-DFN (Richardson–Lucy dual-view fusion network), as plain ONNX-exportable modules.

RL-DFN fuses two views of the same volume. One Richardson–Lucy step (``engines.rldfn.rl``, FFTs, kept out
of these modules so that they export to ONNX/TensorRT) turns each view into a *correction volume*; the
networks here map the two correction volumes to the fused volume:

``fused = UNet( F(corr_a) * F(corr_b) )``

* :class:`FeatureNet` — per-view feature extractor: 1×1×1 conv to ``width`` channels, two 3×3×3
  conv+BatchNorm+ReLU, 1×1×1 conv to ``width`` channels, sigmoid (features in (0, 1), so their product is a
  soft gate).
* :class:`FusionUNet` — a two-level 3-D U-Net (max-pool ×2 down, transposed conv ×2 up, skip
  concatenations, BatchNorm+ReLU after every 3×3×3 conv) ending in two 1×1×1 convs and softplus, so the
  fused intensity is positive. Each spatial size must be a multiple of 4 (two poolings).
* :class:`DualViewFusionNet` — the two feature nets and the U-Net together.

Parameter names are laid out so that ``state_dict()`` keys equal those of the reference's checkpoint
files (``net_FA.pth``, ``net_FB.pth``, ``net_G.pth``): checkpoints load without renaming.

The reference passes **both** views through the view-A feature net — in its test-time forward and in its
training forward alike; the view-B net is built, handed to the optimiser and saved (``net_FB.pth``) but never
used, so its weights stay at their initialisation. ``DualViewFusionNet(share_view_a_features=True)`` — the
default — reproduces that, so that reference checkpoints give the reference's numbers.
"""

from __future__ import annotations

import torch
from torch import nn

#: Spatial sizes given to :class:`FusionUNet` must be multiples of this (two 2× poolings).
SIZE_MULTIPLE = 4

#: Channel width of the reference's feature nets and of the U-Net's first level.
REFERENCE_WIDTH = 64


class _ConvBlock(nn.Module):
    """``n`` × (3×3×3 conv, BatchNorm, ReLU), stored under ``convolution`` as the reference's blocks are.

    Inside the Sequential the layers sit at indices 0,1,2 / 3,4,5 / …, which is what makes checkpoint keys
    such as ``convolution.3.weight`` line up.
    """

    def __init__(self, in_channels: int, out_channels: int, n: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(n):
            layers += [
                nn.Conv3d(in_channels if i == 0 else out_channels, out_channels, kernel_size=3, padding=1),
                nn.BatchNorm3d(out_channels),
                nn.ReLU(),
            ]
        self.convolution = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convolution(x)


class FeatureNet(nn.Module):
    """Per-view feature extractor of RL-DFN ("Feature Extraction A/B" in the paper).

    Parameters
    ----------
    in_channels
        Channels of the input correction volume (1).
    out_channels
        Feature channels produced (``width`` of the U-Net that follows; 64 in the reference).
    """

    def __init__(self, in_channels: int = 1, out_channels: int = REFERENCE_WIDTH) -> None:
        super().__init__()
        hidden = 64 * in_channels  # the reference fixes the hidden width at 64 per input channel
        self.first_conv = nn.Conv3d(in_channels, hidden, kernel_size=1)
        self.mid_conv = _ConvBlock(hidden, hidden, 2)
        self.last_conv = nn.Conv3d(hidden, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.last_conv(self.mid_conv(self.first_conv(x))))


class FusionUNet(nn.Module):
    """Two-level 3-D U-Net of RL-DFN ("Feature Extraction U"), softplus output.

    Parameters
    ----------
    in_channels
        Channels of the gated feature volume (the feature nets' ``out_channels``; 64 in the reference).
    out_channels
        Channels of the fused volume (1).

    Notes
    -----
    The first level keeps ``in_channels`` channels, the second doubles, the bottom quadruples. Input sizes
    must be multiples of :data:`SIZE_MULTIPLE` along Z, Y and X.
    """

    def __init__(self, in_channels: int = REFERENCE_WIDTH, out_channels: int = 1) -> None:
        super().__init__()
        c = in_channels
        self.double_conv1 = _ConvBlock(c, c, 2)
        self.maxpool1 = nn.MaxPool3d(2)
        self.double_conv2 = _ConvBlock(c, 2 * c, 2)
        self.maxpool2 = nn.MaxPool3d(2)
        self.bottom_layer = _ConvBlock(2 * c, 4 * c, 3)
        self.t_conv2 = nn.ConvTranspose3d(4 * c, 2 * c, kernel_size=2, stride=2)
        self.ex_double_conv2 = _ConvBlock(4 * c, 2 * c, 2)
        self.t_conv1 = nn.ConvTranspose3d(2 * c, c, kernel_size=2, stride=2)
        self.ex_conv1_1 = _ConvBlock(2 * c, c, 1)
        self.one_by_one = nn.Conv3d(c, out_channels, kernel_size=1)
        self.one_by_one_2 = nn.Conv3d(out_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        level1 = self.double_conv1(x)
        level2 = self.double_conv2(self.maxpool1(level1))
        bottom = self.bottom_layer(self.maxpool2(level2))
        up2 = self.ex_double_conv2(torch.cat([level2, self.t_conv2(bottom)], dim=1))
        up1 = self.ex_conv1_1(torch.cat([level1, self.t_conv1(up2)], dim=1))
        return nn.functional.softplus(self.one_by_one_2(self.one_by_one(up1)))


class DualViewFusionNet(nn.Module):
    """The learned part of RL-DFN: two correction volumes in, the fused volume out.

    Parameters
    ----------
    width
        Feature channels (64 in the reference; smaller only for experiments).
    share_view_a_features
        Pass both views through the view-A feature net, as the reference does (default). ``False`` sends
        view B through the view-B net — a choice for new training only: reference checkpoints hold an
        untrained view-B net.

    Notes
    -----
    Inputs are ``(N, 1, Z, Y, X)`` float tensors whose Z, Y, X are multiples of :data:`SIZE_MULTIPLE`.
    No FFT or data-dependent control flow inside, so :func:`torch.onnx.export` traces it as is.
    """

    def __init__(self, width: int = REFERENCE_WIDTH, share_view_a_features: bool = True) -> None:
        super().__init__()
        self.width = width
        self.share_view_a_features = share_view_a_features
        self.feature_a = FeatureNet(1, width)
        self.feature_b = FeatureNet(1, width)
        self.unet = FusionUNet(width, 1)

    def forward(self, corr_a: torch.Tensor, corr_b: torch.Tensor) -> torch.Tensor:
        feat_b = self.feature_a(corr_b) if self.share_view_a_features else self.feature_b(corr_b)
        return self.unet(self.feature_a(corr_a) * feat_b)


def check_patch_shape(shape: tuple[int, ...]) -> None:
    """Raise :class:`ValueError` unless the last three sizes are positive multiples of :data:`SIZE_MULTIPLE`."""
    zyx = tuple(int(s) for s in shape[-3:])
    if len(zyx) != 3 or any(s <= 0 or s % SIZE_MULTIPLE for s in zyx):
        raise ValueError(
            f"RL-DFN patch of size Z×Y×X = {'×'.join(map(str, zyx))}: every size must be a positive multiple of "
            f"{SIZE_MULTIPLE} (the U-Net halves it twice); tile the volume or pad it"
        )
