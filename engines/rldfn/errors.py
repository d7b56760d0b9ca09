"""Typed errors of the fusion step, each with a message a microscopist can act on."""

from __future__ import annotations

from engines.errors import RllsmValueError


class FusionError(RllsmValueError):
    """Base class: the fusion inputs or settings cannot produce a result."""


class CheckpointError(FusionError):
    """An RL-DFN checkpoint is missing, unreadable or laid out differently from what we know."""


class VolumeShapeError(FusionError):
    """The two views, a PSF or a patch have unusable shapes."""


class MemoryBudgetError(FusionError):
    """Not even one tile fits in the memory budget."""
