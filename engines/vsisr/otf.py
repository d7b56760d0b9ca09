"""Optical transfer functions for the Wiener recombination of Step 2.

The published pipeline ships measured, normalised OTFs per excitation line as 16-bit TIFFs
(``<dir>/<wavelength>/OTF0.tif``, ``OTF1.tif``) plus an apodisation mask ``apo_0.9_1.5.tif``.  No absolute
pixel size is stored: each map spans the frequency grid of the super-resolved image and is resized to
the image size before use.  :class:`OTFSet` holds them *decoded*:

* ``otf0`` – wide-field (order-0) OTF magnitude, file value / 65535 × 2;
* ``otf1`` – effective OTF of one virtual-SIM orientation, file value / 65535, extended along the
  first axis (rows); the recombination turns it by 90° and then by 0/60/120°;
* ``apo`` – apodisation mask in [0, 1], raised to ``apo_factor`` later.

Where no measured OTFs exist, :func:`generate_otfs` builds an approximation from the optics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engines.config import OpticsConfig
from engines.errors import RllsmValueError
from engines.vsisr.network import SCALE

#: Excitation lines for which the reference ships OTFs; others fall back to the nearest.
KNOWN_LINES_NM = (488, 560, 642)
APO_NAME = "apo_0.9_1.5.tif"


class OTFError(RllsmValueError):
    """OTF files missing, unreadable or of the wrong shape."""


@dataclass(frozen=True)
class OTFSet:
    """Decoded OTFs of one excitation line (see module docstring for units)."""

    otf0: np.ndarray
    otf1: np.ndarray
    apo: np.ndarray
    source: str = "memory"

    def __post_init__(self) -> None:
        for name in ("otf0", "otf1", "apo"):
            a = getattr(self, name)
            if not isinstance(a, np.ndarray) or a.ndim != 2 or min(a.shape) < 4:
                shape = getattr(a, "shape", None)
                raise OTFError(f"{self.source}: {name} must be a 2-D array of at least 4×4, got shape {shape}")
            if not np.all(np.isfinite(a)):
                raise OTFError(f"{self.source}: {name} contains NaN or infinite values")


def _line_dir(otf_dir: Path, wavelength_nm: float) -> Path:
    """The folder holding OTF0/OTF1: ``otf_dir`` itself or its ``<line>`` sub-folder.

    The reference maps 560 → '560', 642 → '642' and every other wavelength to '488'; we pick the
    nearest shipped line instead so that e.g. 561 nm does not silently use the 488 nm OTFs.
    """
    if (otf_dir / "OTF0.tif").is_file():
        return otf_dir
    line = min(KNOWN_LINES_NM, key=lambda l: abs(l - wavelength_nm))
    return otf_dir / str(line)


def load_otfs(otf_dir: str | Path, wavelength_nm: float) -> OTFSet:
    """Read the reference's OTF files for one excitation line.

    Parameters
    ----------
    otf_dir
        Folder with ``OTF0.tif``, ``OTF1.tif`` (and ``apo_0.9_1.5.tif``), or a parent with one such
        folder per line (``488/``, ``560/``, ``642/``).  The apodisation mask may sit in the line folder
        or in its parent.
    wavelength_nm
        Excitation wavelength; selects the sub-folder nearest to it.

    Raises
    ------
    OTFError
        Naming every file that was looked for and not found.
    """
    import tifffile

    base = Path(otf_dir)
    if not base.is_dir():
        raise OTFError(f"OTF folder not found: {base}")
    line = _line_dir(base, wavelength_nm)
    wanted = {"OTF0": [line / "OTF0.tif"], "OTF1": [line / "OTF1.tif"], "apo": [line / APO_NAME, line.parent / APO_NAME]}
    found: dict[str, Path] = {}
    missing: list[str] = []
    for key, candidates in wanted.items():
        hit = next((p for p in candidates if p.is_file()), None)
        if hit is None:
            missing.append(" or ".join(str(p) for p in candidates))
        else:
            found[key] = hit
    if missing:
        raise OTFError(f"OTF files for {wavelength_nm:g} nm not found: {'; '.join(missing)}")
    try:
        raw0 = tifffile.imread(found["OTF0"]).astype(np.float64)
        raw1 = tifffile.imread(found["OTF1"]).astype(np.float64)
        apo = tifffile.imread(found["apo"]).astype(np.float64)
    except Exception as err:  # tifffile raises several types for damaged files
        raise OTFError(f"cannot read OTF files in {line}: {err}") from None
    return OTFSet(otf0=raw0 / 65535.0 * 2.0, otf1=raw1 / 65535.0, apo=apo, source=str(line))


def _incoherent_otf(rho: np.ndarray) -> np.ndarray:
    """Diffraction-limited 2-D OTF of a circular pupil, ``rho`` = frequency / cut-off."""
    r = np.clip(rho, 0.0, 1.0)
    return (2.0 / math.pi) * (np.arccos(r) - r * np.sqrt(1.0 - r * r))


def generate_otfs(
    optics: OpticsConfig, shape: tuple[int, int] = (512, 512), shift_fraction: float = 0.5, apo_power: float = 1.2
) -> OTFSet:
    """Approximate OTF0/OTF1/apodisation from NA and wavelength, for users without measured OTFs.

    Approximation (documented in docs/lateral-sr.md):

    * the grid spans the frequency range of the super-resolved image (pixel = ``pixel_size_um / 1.5``), as
      the measured maps do;
    * ``otf0`` is the aberration-free incoherent OTF of the detection pupil, cut-off
      ``2 NA / λ_emission``, scaled to peak 2 like the decoded reference maps;
    * ``otf1`` is the order-0 OTF plus two copies shifted by ``± shift_fraction × cut-off`` along the
      first axis (the virtual structured-illumination side bands), peak-normalised to 1;
    * ``apo`` falls as ``(1 − k / k_max)^apo_power`` to zero at ``k_max`` = the extended cut-off.

    Real OTFs carry the lattice light-sheet's anisotropy and aberrations; expect a measured set to do better.

    Parameters
    ----------
    optics
        Uses ``na_detection``, ``emission_nm`` and ``pixel_size_um``.
    shape
        Size of the maps (they are resized to the image anyway).
    shift_fraction
        Side-band shift as a fraction of the cut-off (0.5 gives the 1.5× extension of the reference OTFs).
    apo_power
        Exponent of the apodisation fall-off.
    """
    ny, nx = shape
    if ny < 8 or nx < 8:
        raise OTFError(f"OTF grid must be at least 8×8, got {ny}×{nx}")
    if not 0.0 < shift_fraction <= 1.0:
        raise OTFError(f"shift_fraction must be in (0, 1], got {shift_fraction}")
    dx_sr = optics.pixel_size_um / SCALE
    cutoff = 2.0 * optics.na_detection / (optics.emission_nm * 1e-3)  # cycles/µm
    # fftshift-ed frequency coordinates of the super-resolved image grid (cycles/µm)
    fy = (np.arange(ny) - ny // 2) / (ny * dx_sr)
    fx = (np.arange(nx) - nx // 2) / (nx * dx_sr)
    ky, kx = np.meshgrid(fy, fx, indexing="ij")
    otf0 = _incoherent_otf(np.hypot(ky, kx) / cutoff)
    shift = shift_fraction * cutoff
    side = _incoherent_otf(np.hypot(ky - shift, kx) / cutoff) + _incoherent_otf(np.hypot(ky + shift, kx) / cutoff)
    otf1 = otf0 + side
    otf1 /= otf1.max()
    kmax = cutoff * (1.0 + shift_fraction)
    apo = np.clip(1.0 - np.hypot(ky, kx) / kmax, 0.0, 1.0) ** apo_power
    return OTFSet(otf0=2.0 * otf0, otf1=otf1, apo=apo, source=f"generated ({optics.emission_nm:g} nm, NA {optics.na_detection:g})")
