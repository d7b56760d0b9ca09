"""The simulated reflective lattice light-sheet microscope: sample → optics → mirror → skew → band → camera.

Forward model of one raw stack at timepoint ``t``::

    emitters  = sample(t) ∪ reflectance · mirror(sample(t))            (mirror frame, h → −h)
    photons   = scale · (splat_raw(emitters) ⊛ K_raw) · sheet_envelope   (K_raw: system PSF sheared onto raw grid)
              + band(k, u)                                              (epi-fluorescence where the mirror crosses)
    counts    = camera(photons)                                         (Poisson, gain, read noise, offset, uint16)

so after deskew the real image lies on one side of the tilted mirror plane and the virtual image, with the
same PSF in the detection frame (hence the complementary orientation once view B is flipped), on the other.
``scale`` makes the brightest voxel of the sample's image at timepoint 0 equal ``peak_photons`` and is then
kept for the whole series, so intensities are comparable between timepoints.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engines.simulate.config import SimConfig, SimulationError, Structure
from engines.simulate.geometry import Geometry, splat
from engines.simulate.noise import camera
from engines.simulate.optics import FFTConvolver, raw_kernel, system_psf
from engines.simulate.samples import Sample, make_sample


@dataclass(frozen=True)
class SimStack:
    """One simulated timepoint."""

    timepoint: int
    raw: np.ndarray  # uint16 (nz, ny, nx): what the camera records
    ground_truth: np.ndarray  # float32 (nz, ny, nx_deskewed): real emitters on the deskewed grid (photon units)
    photons: np.ndarray | None = field(default=None, repr=False)  # float32 expected photons (noise-free raw)


class Microscope:
    """A configured instrument with its sample: renders any timepoint deterministically.

    Parameters
    ----------
    cfg
        The simulation configuration.
    seed
        Seeds the sample, its motion and the camera noise (each timepoint has its own noise stream).
    device
        Where the convolution runs: None/``"cpu"`` (scipy; the bit-reproducible reference), ``"cuda"``, or
        ``"auto"`` (CUDA when present). Noise is always drawn on the host from the seeded generators.
    """

    def __init__(self, cfg: SimConfig, seed: int = 0, device: str | None = None) -> None:
        if seed < 0:
            raise SimulationError(f"seed must be ≥ 0, got {seed}")
        self.cfg = cfg
        self.seed = int(seed)
        self.device = device
        self.geometry = Geometry.from_config(cfg)
        self.sample: Sample = make_sample(cfg, self.seed, self.geometry)
        self._conv: FFTConvolver | None = None
        self._scale: float | None = None
        self._first: np.ndarray | None = None
        self._static: np.ndarray | None = None

    # --- pieces -------------------------------------------------------------------------------------------
    @property
    def convolver(self) -> FFTConvolver:
        if self._conv is None:
            g = self.geometry
            h = system_psf(self.cfg, g.dz_deskewed_um, g.dx_um)
            self._conv = FFTConvolver(raw_kernel(h, g.shear), (g.nz, g.ny, g.nx), self.device)
        return self._conv

    def emitters(self, timepoint: int) -> tuple[np.ndarray, np.ndarray]:
        """Real and virtual emitters at ``timepoint``: raw-grid indices (N, 3) and weights (N,)."""
        pts = self.sample.at(timepoint, self.cfg)
        g = self.geometry
        idx = np.concatenate([g.mirror_to_raw(pts), g.mirror_to_raw(g.reflect(pts))])
        w = np.concatenate([self.sample.weights, self.sample.weights * self.cfg.mirror_reflectance])
        return idx, w

    def sheet_envelope(self) -> np.ndarray:
        """Excitation along the sheet's propagation (rows), shape (1, ny, 1); ones when the sheet is uniform."""
        g = self.geometry
        if self.cfg.sheet_length_um is None:
            return np.ones((1, g.ny, 1), np.float32)
        y = (np.arange(g.ny) - (g.ny - 1) / 2.0) * g.dx_um
        env = np.exp(-4.0 * math.log(2.0) * (y / self.cfg.sheet_length_um) ** 2)
        return env.astype(np.float32)[None, :, None]

    def band_center(self) -> np.ndarray:
        """Raw column of the epi-fluorescence band in each plane (the mirror line, plus any coverslip drift)."""
        g = self.geometry
        k = np.arange(g.nz, dtype=np.float64)
        return g.mirror_column + self.cfg.band_drift_px_per_plane * (k - (g.nz - 1) / 2.0)

    def band(self) -> np.ndarray:
        """Expected band photons, shape (nz, ny or 1, nx): narrow and wide Gaussians across the mirror line."""
        c = self.cfg
        u = np.arange(self.geometry.nx, dtype=np.float64)[None, :]
        d = u - self.band_center()[:, None]
        prof = np.exp(-0.5 * (d / c.band_sigma_px) ** 2) + c.band_wide_fraction * np.exp(
            -0.5 * (d / c.band_wide_sigma_px) ** 2
        )
        prof *= c.band_photons / (1.0 + c.band_wide_fraction)
        return (prof[:, None, :] * self.sheet_envelope()).astype(np.float32)

    @property
    def photon_scale(self) -> float:
        """Photons per unit emitter weight at the image peak; fixed by timepoint 0."""
        if self._scale is None:
            img = self._sample_image(0)
            self._first = img  # the first acquire(0) reuses it instead of rendering t=0 twice
            peak = float(img.max())
            if peak <= 0:
                raise SimulationError("the sample is not visible in the stack (no emitter inside the field of view)")
            self._scale = self.cfg.effective_peak_photons() / peak
        return self._scale

    def _sample_image(self, timepoint: int) -> np.ndarray:
        idx, w = self.emitters(timepoint)
        conv = self.convolver
        # Emitters just outside the field or the scanned planes still blur into it: render on a grid
        # extended by the kernel's reach and keep the part the camera sees.
        img = conv.extended(splat(conv.extended_shape, idx + np.array(conv.margins), w))
        np.maximum(img, 0.0, out=img)  # FFT round-off leaves tiny negatives where there is no light
        return img

    # --- outputs ------------------------------------------------------------------------------------------
    def expected_photons(self, timepoint: int) -> np.ndarray:
        """Noise-free raw stack in photons (float32, (nz, ny, nx))."""
        if self._static is not None:
            return self._static.copy()
        scale = np.float32(self.photon_scale)
        img = self._first if timepoint == 0 and self._first is not None else self._sample_image(timepoint)
        self._first = None
        img = img * scale
        img *= self.sheet_envelope()
        img += self.band()
        if self.is_static:
            # Nothing moves: every timepoint has the same expected image, only the noise differs.
            self._static = img.copy()
        return img

    @property
    def is_static(self) -> bool:
        """True when the sample does not move between timepoints (no drift, and no jitter or beads)."""
        c = self.cfg
        still = c.jitter_um == 0 or self.sample.structure is Structure.beads
        return still and not any(c.drift_um_per_timepoint)

    def ground_truth(self, timepoint: int) -> np.ndarray:
        """Real emitters (no mirror image, no blur) on the deskewed grid, in photon units (float32)."""
        g = self.geometry
        pts = self.sample.at(timepoint, self.cfg)
        return splat(g.deskewed_shape, g.mirror_to_deskewed(pts), self.sample.weights * self.photon_scale)

    def acquire(self, timepoint: int, *, with_ground_truth: bool = True, keep_photons: bool = False) -> SimStack:
        """Simulate what the camera records at ``timepoint`` (noise from its own seeded stream)."""
        photons = self.expected_photons(timepoint)
        rng = np.random.default_rng([self.seed, 2, timepoint])
        c = self.cfg
        raw = camera(photons, rng, offset=c.optics.camera_offset, gain=c.gain, read_noise=c.read_noise_counts)
        gt = self.ground_truth(timepoint) if with_ground_truth else np.zeros((0, 0, 0), np.float32)
        return SimStack(timepoint, raw, gt, photons if keep_photons else None)

    def series(self, timepoints: int, **kwargs: Any) -> Iterator[SimStack]:
        """Timepoints ``0 … timepoints−1`` one after the other."""
        for t in range(timepoints):
            yield self.acquire(t, **kwargs)

    # --- truth for consumers and tests --------------------------------------------------------------------
    def bead_positions(self, timepoint: int = 0) -> dict[str, list[list[float]]]:
        """Bead (or object) centres in the mirror frame (µm), raw and deskewed voxel indices, real and virtual."""
        if self.sample.structure is not Structure.beads:
            return {}
        g = self.geometry
        pts = self.sample.at(timepoint, self.cfg)
        virt = g.reflect(pts)
        return {
            "mirror_um": pts.tolist(),
            "raw_index": g.mirror_to_raw(pts).tolist(),
            "deskewed_index": g.mirror_to_deskewed(pts).tolist(),
            "virtual_raw_index": g.mirror_to_raw(virt).tolist(),
            "virtual_deskewed_index": g.mirror_to_deskewed(virt).tolist(),
        }

    def metadata(self, timepoints: int | None = None) -> dict[str, Any]:
        """Everything needed to reproduce the run and to check a reconstruction against the truth (JSON-able)."""
        g = self.geometry
        sin = abs(math.sin(math.radians(g.angle_deg)))
        beads = {}
        if self.sample.structure is Structure.beads:
            n = timepoints or 1
            beads = {str(t): self.bead_positions(t) for t in range(n)}
        return {
            "format": "rllsm-simulation",
            "version": 1,
            "seed": self.seed,
            "timepoints": timepoints,
            "config": self.cfg.model_dump(mode="json"),
            "optics": self.cfg.optics.model_dump(mode="json"),
            "photon_scale": self.photon_scale,
            "raw_shape": [g.nz, g.ny, g.nx],
            "deskewed_shape": list(g.deskewed_shape),
            "deskewed_voxel_um": [g.dz_deskewed_um, g.dx_um, g.dx_um],
            "mirror": {
                "raw_column": g.mirror_column,
                "virtual_side": self.cfg.virtual_side,
                "deskewed_x_at_plane0": float(g.mirror_deskewed_x(0)),
                "deskewed_x_per_plane": g.shear,
                "tilt_deg_in_deskewed_xz": math.degrees(math.atan2(g.dz_deskewed_um, abs(g.shear) * g.dx_um)),
                "height_um_per_raw_column": g.dx_um * sin,
                "reflectance": self.cfg.mirror_reflectance,
            },
            "band": {
                "raw_column_per_plane": self.band_center().tolist(),
                "sigma_px": self.cfg.band_sigma_px,
                "wide_sigma_px": self.cfg.band_wide_sigma_px,
                "peak_photons": self.cfg.band_photons,
            },
            "beads": beads,
            "n_objects": self.sample.n_groups,
        }


def simulate_stack(cfg: SimConfig, seed: int = 0, timepoint: int = 0) -> tuple[SimStack, dict[str, Any]]:
    """One raw stack and the metadata of its run (convenience for scripts and tests)."""
    mic = Microscope(cfg, seed)
    stack = mic.acquire(timepoint)
    return stack, mic.metadata(timepoint + 1)
