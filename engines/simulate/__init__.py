"""Simulated reflective lattice light-sheet microscope (``rllsm simulate``).

A forward model of exactly the geometry the reconstruction inverts: seeded samples above a mirror, their
mirror images, a detection PSF times a lattice light sheet, sample-scan skew, the mirror's epi-fluorescence
band, and an sCMOS camera. See ``docs/simulator.md``.

Names are imported lazily so that the CLI can read :mod:`engines.simulate.config` (the structure names for
``--help``) without loading scipy and torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SimConfig": "config", "SimulationError": "config", "Structure": "config", "make_sim_config": "config",
    "photons_for_snr": "config", "Geometry": "geometry", "splat": "geometry", "Microscope": "microscope",
    "SimStack": "microscope", "simulate_stack": "microscope", "simulate_training_pair": "pairs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
