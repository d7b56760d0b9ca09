"""Versioned configuration of the simulated reflective lattice light-sheet microscope.

One :class:`SimConfig` fixes everything a simulated acquisition depends on: the optics (the shared
:class:`~engines.config.OpticsConfig`), the sample, the mirror, the light sheet, the epi-fluorescence band and
the camera. Together with the seed it reproduces a run bit for bit, so it is written into every output's
metadata.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import Field, ValidationError, model_validator

from engines.config import OpticsConfig, describe_validation_error
from engines.errors import RllsmValueError
from engines.support import StrictModel

SIM_CONFIG_VERSION = 1
MAX_VOXELS = 400_000_000  # raw stack voxels (e.g. 101 × 1990 × 1990)


class SimulationError(RllsmValueError):
    """A simulation cannot be run as configured; the text names the offending value."""


class Structure(StrEnum):
    """Kinds of simulated ground truth."""

    filaments = "filaments"  # F-actin-like worm-like chains lying near the coverslip
    puncta = "puncta"  # clathrin-coated-pit-like diffraction-limited spots on the membranes
    beads = "beads"  # isolated sub-resolution point emitters, for resolution and geometry checks
    tubules = "tubules"  # ER/mitochondria-like tubes of 60–180 nm radius, more flexible than actin
    rings = "rings"  # hollow rings of 0.15–0.5 µm radius lying on the membrane (coated pits, caveolae, vesicles)
    meshwork = "meshwork"  # dense short straight segments (cortical actin)


PositiveDim = Annotated[int, Field(ge=4, le=4096)]


class SimConfig(StrictModel):
    """Everything a simulated rLLSM acquisition depends on (besides the seed and the number of timepoints).

    Lengths are in µm unless the name says ``_px``; intensities are in detected photons unless the name says
    ``counts``. ``shape`` is the *raw* camera stack (planes, rows, columns); the skew axis is the one named by
    ``optics.skew_axis`` and the mirror crosses it at ``mirror_position`` (fraction of its length).
    """

    version: Literal[1] = SIM_CONFIG_VERSION
    optics: OpticsConfig = Field(default_factory=OpticsConfig)
    structure: Structure = Structure.filaments
    shape: tuple[PositiveDim, PositiveDim, PositiveDim] = Field(
        (64, 128, 128), description="Raw stack (planes, rows, columns)."
    )

    # --- sample ---------------------------------------------------------------------------------------------
    n_objects: int | None = Field(
        None, ge=1, le=100_000, description="Objects (filaments, beads …); None scales a default density with the field."
    )
    height_range_um: tuple[float, float] = Field(
        (0.4, 4.0), description="Heights above the mirror the sample occupies (cells sit on the reflective coverslip)."
    )
    drift_um_per_timepoint: tuple[float, float, float] = Field(
        (0.05, 0.03, 0.0), description="Drift of the whole sample per timepoint (along mirror, y, height)."
    )
    jitter_um: float = Field(0.03, ge=0.0, le=5.0, description="σ of each object's random walk per timepoint.")

    # --- mirror ---------------------------------------------------------------------------------------------
    mirror_position: float = Field(
        0.5, ge=0.1, le=0.9, description="Where the mirror crosses the raw frame, as a fraction of the skew axis."
    )
    virtual_side: Literal["high", "low"] = Field(
        "high", description="Side of the mirror line (higher or lower skew-axis index) holding the virtual image."
    )
    mirror_reflectance: float = Field(0.75, ge=0.0, le=1.0, description="Virtual image brightness relative to real.")

    # --- lattice light sheet --------------------------------------------------------------------------------
    sheet_fwhm_um: float = Field(1.0, ge=0.2, le=10.0, description="FWHM of the sheet's main lobe along detection.")
    sheet_sidelobe: float = Field(0.15, ge=0.0, le=1.0, description="Relative intensity of the lattice side lobes.")
    sheet_sidelobe_offset_um: float = Field(1.6, ge=0.2, le=20.0, description="Distance of the side lobes.")
    sheet_length_um: float | None = Field(
        None, ge=1.0, le=1000.0, description="FWHM of the sheet along its propagation (rows); None = uniform."
    )

    # --- epi-fluorescence band at the mirror -----------------------------------------------------------------
    band_photons: float = Field(40.0, ge=0.0, le=1e6, description="Peak of the band at the mirror (photons).")
    band_sigma_px: float = Field(12.0, gt=0.0, le=1000.0, description="σ of the band's narrow component (px).")
    band_wide_sigma_px: float = Field(40.0, gt=0.0, le=5000.0, description="σ of the band's wide component (px).")
    band_wide_fraction: float = Field(0.3, ge=0.0, le=1.0, description="Peak of the wide component vs the narrow.")
    band_drift_px_per_plane: float = Field(
        0.0, ge=-5.0, le=5.0, description="Band shift per plane along the skew axis (a tilted coverslip)."
    )

    # --- camera ---------------------------------------------------------------------------------------------
    peak_photons: float = Field(
        300.0, gt=0.0, le=1e6, description="Brightest voxel of the sample image (real + mirror, no band) at t = 0."
    )
    snr: float | None = Field(
        None, gt=0.0, le=1000.0, description="Peak SNR; when set it overrides peak_photons (see photons_for_snr)."
    )
    read_noise_counts: float = Field(2.0, ge=0.0, le=1000.0, description="σ of the Gaussian read noise (counts).")
    gain: float = Field(1.0, gt=0.0, le=100.0, description="Camera counts per detected photon.")

    # --- models ---------------------------------------------------------------------------------------------
    psf_model: Literal["vectorial", "scalar", "gaussian"] = Field("vectorial", description="psfmodels PSF model.")
    kernel_radius_um: float = Field(2.4, ge=0.5, le=10.0, description="Lateral half-size of the PSF kernel.")
    sr_factor: float = Field(
        1.6, ge=1.0, le=3.0, description="LLS-SIM resolution gain along the SR axis (training ground truth)."
    )
    sr_axis: Literal["x", "y"] = Field("x", description="Lateral axis the LLS-SIM ground truth is sharper along.")

    @model_validator(mode="after")
    def _consistent(self) -> SimConfig:
        lo, hi = self.height_range_um
        if not (0.0 <= lo < hi <= 100.0):
            raise ValueError(f"height_range_um must satisfy 0 ≤ low < high ≤ 100 µm, got ({lo}, {hi})")
        nz, ny, nx = self.shape
        if nz * ny * nx > MAX_VOXELS:
            # The render holds a few float32 copies of the padded stack; past this it would not fit in memory.
            raise ValueError(
                f"shape {nz}×{ny}×{nx} = {nz * ny * nx / 1e6:.0f} M voxels is more than the simulator handles "
                f"({MAX_VOXELS / 1e6:.0f} M); simulate a smaller field"
            )
        if self.optics.skew_axis.value != "x":
            # The band and mirror geometry are written for the skew axis on columns; a y-skewed camera is the same
            # physics transposed, which callers can do themselves until someone needs it.
            raise ValueError("the simulator supports skew_axis 'x' only (transpose the stack for a y-skewed camera)")
        if abs(self.optics.skew_angle_deg) < 1.0:
            raise ValueError(f"skew angle {self.optics.skew_angle_deg}° is too shallow for a sample-scan geometry")
        return self

    def effective_peak_photons(self) -> float:
        """``peak_photons``, or the photon count giving ``snr`` at the peak when ``snr`` is set."""
        if self.snr is None:
            return self.peak_photons
        return photons_for_snr(self.snr, self.read_noise_counts / self.gain)


def photons_for_snr(snr: float, read_noise_photons: float) -> float:
    """Signal ``s`` (photons) with ``s / sqrt(s + σ²) = snr`` for shot noise plus read noise σ (in photons)."""
    if snr <= 0:
        raise SimulationError(f"SNR must be positive, got {snr}")
    s2 = snr * snr
    return 0.5 * (s2 + math.sqrt(s2 * s2 + 4.0 * s2 * read_noise_photons**2))


def make_sim_config(**fields: object) -> SimConfig:
    """Validate ``fields`` into a :class:`SimConfig`, turning pydantic's report into a :class:`SimulationError`."""
    try:
        return SimConfig.model_validate(fields)
    except ValidationError as err:
        raise SimulationError(describe_validation_error(err, "simulation config")) from None
