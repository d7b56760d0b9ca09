"""Discriminator used only while (meta-)training VSI-SR.

Same shape as the published one: a 3×3 stem, five double-conv stages without down-sampling whose widths
double from ``base`` to ``16·base`` (published ``base`` = 32), LeakyReLU(0.1), global mean, two linear
layers. It returns a *logit*; the adversarial loss uses ``binary_cross_entropy_with_logits``, which is
the published sigmoid + BCE computed stably.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from engines.support import StrictModel


class DiscriminatorConfig(StrictModel):
    """Width of the VSI-SR discriminator (published: in 3 channels, base 32)."""

    version: Literal[1] = 1
    in_channels: int = Field(3, ge=1, le=16)
    base: int = Field(32, ge=2, le=128, description="Channels of the stem; stages use 1,2,4,8,16 × base.")


class VSIDiscriminator(nn.Module):
    """Image-level real/fake critic for ``(N, C, H, W)`` super-resolved planes."""

    def __init__(self, config: DiscriminatorConfig | None = None) -> None:
        super().__init__()
        self.config = config or DiscriminatorConfig()
        b = self.config.base
        self.stem = nn.Conv2d(self.config.in_channels, b, 3, padding=1)
        widths = [b, b, 2 * b, 4 * b, 8 * b, 16 * b]
        self.stages = nn.ModuleList(
            nn.ModuleList([nn.Conv2d(widths[i], widths[i + 1], 3, padding=1),
                           nn.Conv2d(widths[i + 1], widths[i + 1], 3, padding=1)])
            for i in range(5)
        )
        self.fc1 = nn.Linear(16 * b, 8 * b)
        self.fc2 = nn.Linear(8 * b, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.stem(x), 0.1)
        for a, b in self.stages:
            x = F.leaky_relu(b(F.leaky_relu(a(x), 0.1)), 0.1)
        x = x.mean(dim=(2, 3))
        return self.fc2(F.leaky_relu(self.fc1(x), 0.1))


def adversarial_loss(logits: torch.Tensor, real: bool) -> torch.Tensor:
    """BCE of discriminator logits against all-real (1) or all-fake (0) labels."""
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits, target)
