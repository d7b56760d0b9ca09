"""Turning fused float volumes into stored intensities that a scientist can compare and measure on.

The rule for 16-bit output: **one fixed gain per acquisition**, set from the first volume, so that the first
volume's robust bright level — its 99.99th percentile of covered voxels, :data:`REFERENCE_PERCENTILE` (voxels below 1e-5 of the maximum count as empty) — lands
at a quarter of the 16-bit range (:data:`REFERENCE_FRACTION`). Every later volume of the acquisition uses the
same gain, so a voxel's count means the same intensity at every timepoint; the headroom (4×) keeps
deconvolved peaks and a brightening sample unsaturated; and a few hot voxels cannot crush the data into a few
hundred counts, as scaling each volume by its own maximum did. Values beyond the range clip at 65535 (counted
in :attr:`VolumeScaler.clipped`). ``float32`` output keeps the fusion's own units and needs no rule.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

#: Percentile of a volume's non-zero voxels that defines its robust bright level.
REFERENCE_PERCENTILE = 99.99

#: Fraction of the 16-bit range given to that level (the rest is headroom).
REFERENCE_FRACTION = 0.25

UINT16_MAX = 65535

#: Voxels below this fraction of the maximum count as empty (outside the data), not as dim data.
_FLOOR = 1e-5

#: Larger volumes are sampled on a regular stride for the percentile: it is a level, not an exact statistic.
_SAMPLE = 4_000_000


class ScalingError(ValueError):
    """A volume cannot be scaled as asked (no finite positive voxel to set the gain from, a bad gain)."""


class OutputScaling(BaseModel):
    """How fused volumes are stored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = 1
    dtype: Literal["uint16", "float32"] = Field("uint16", description="Stored pixel type.")
    percentile: float = Field(REFERENCE_PERCENTILE, gt=50.0, le=100.0,
                              description="Percentile of the first volume's non-zero voxels that sets the gain.")
    fraction: float = Field(REFERENCE_FRACTION, gt=0.0, le=1.0,
                            description="Fraction of 0–65535 that percentile is mapped to (the rest is headroom).")
    gain: float | None = Field(None, gt=0.0, description="Fixed counts per unit of intensity; None: from the "
                               "first volume.")


def robust_level(volume: np.ndarray, percentile: float = REFERENCE_PERCENTILE) -> float:
    """The ``percentile`` of the finite, non-zero voxels of ``volume`` (numpy array or torch tensor).

    Raises
    ------
    ScalingError
        When the volume holds no finite positive voxel.
    """
    v = volume.detach().cpu().numpy() if hasattr(volume, "detach") else np.asarray(volume)
    flat = v.reshape(-1)
    if flat.size > _SAMPLE:
        flat = flat[:: flat.size // _SAMPLE + 1]
    flat = flat[np.isfinite(flat) & (flat > 0)]
    if flat.size:
        # "non-zero" relative to the volume: a deconvolution floors empty space at a tiny epsilon, not at 0
        flat = flat[flat > _FLOOR * flat.max()]
    if flat.size == 0:
        raise ScalingError(f"volume {'×'.join(map(str, v.shape))} holds no finite positive voxel to scale by")
    return float(np.percentile(flat.astype(np.float64), percentile))


def uint16_gain(volume: np.ndarray, percentile: float = REFERENCE_PERCENTILE,
                fraction: float = REFERENCE_FRACTION) -> float:
    """Counts per unit intensity that put ``volume``'s robust level at ``fraction`` of the 16-bit range."""
    return fraction * UINT16_MAX / robust_level(volume, percentile)


def to_uint16(volume: np.ndarray, gain: float) -> tuple[np.ndarray, int]:
    """``round(volume · gain)`` clipped to 0–65535 (NaN → 0); returns the volume and how many voxels clipped high."""
    if not (np.isfinite(gain) and gain > 0):
        raise ScalingError(f"gain must be a positive finite number, got {gain!r}")
    v = np.nan_to_num(np.asarray(volume, np.float32), nan=0.0, posinf=np.inf, neginf=0.0) * np.float32(gain)
    clipped = int(np.count_nonzero(v > UINT16_MAX))
    return np.clip(np.rint(v), 0, UINT16_MAX).astype(np.uint16), clipped


class VolumeScaler:
    """Stores the volumes of one acquisition with one gain, set from its first volume (or given).

    Call it on each fused volume in acquisition order; ``gain`` and ``clipped`` say what it did.
    """

    def __init__(self, params: OutputScaling | None = None) -> None:
        self.params = params or OutputScaling()
        self.gain: float | None = self.params.gain
        self.clipped = 0

    def __call__(self, volume: np.ndarray) -> np.ndarray:
        if self.params.dtype == "float32":
            return np.asarray(volume, np.float32)
        if self.gain is None:
            self.gain = uint16_gain(volume, self.params.percentile, self.params.fraction)
        out, clipped = to_uint16(volume, self.gain)
        self.clipped += clipped
        return out
