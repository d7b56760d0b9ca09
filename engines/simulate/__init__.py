"""Simulated reflective lattice light-sheet microscope (``rllsm simulate``).

A forward model of exactly the geometry the reconstruction inverts: seeded samples above a mirror, their
mirror images, a detection PSF times a lattice light sheet, sample-scan skew, the mirror's epi-fluorescence
band, and an sCMOS camera. See ``docs/simulator.md``.
"""

from engines.simulate.config import SimConfig, SimulationError, Structure, make_sim_config, photons_for_snr
from engines.simulate.geometry import Geometry, splat
from engines.simulate.microscope import Microscope, SimStack, simulate_stack
from engines.simulate.pairs import simulate_training_pair

__all__ = [
    "Geometry", "Microscope", "SimConfig", "SimStack", "SimulationError", "Structure", "make_sim_config",
    "photons_for_snr", "simulate_stack", "simulate_training_pair", "splat",
]
