"""Step 4 of Meta-rLLS-VSIM: fuse the two views into one isotropic volume.

Two modes: RL-DFN (one Richardson–Lucy step feeding a trained network, :class:`RLDFN`) and classical joint
dual-view Richardson–Lucy deconvolution (:func:`classical_fuse`) for users without trained weights.
Heavy submodules are imported lazily by callers; this package only re-exports names.
"""

from engines.rldfn.errors import CheckpointError, FusionError, MemoryBudgetError, VolumeShapeError

__all__ = ["CheckpointError", "FusionError", "MemoryBudgetError", "VolumeShapeError"]
