"""Typed errors of the runtime backends, worded for the person at the microscope."""

from __future__ import annotations

from collections.abc import Mapping

from engines.errors import RllsmError

#: How to get TensorRT; repeated wherever its absence is reported so nobody has to search for it.
TENSORRT_INSTALL_HINT = "pip install tensorrt --extra-index-url https://pypi.nvidia.com"


class BackendError(RllsmError):
    """Base class of every error raised by :mod:`engines.backends`."""


class BackendUnavailableError(BackendError):
    """No backend could run the model; carries the reason each candidate was refused.

    Parameters
    ----------
    reasons
        Backend name → why it could not be used, in the order they were tried.
    """

    def __init__(self, reasons: Mapping[str, str], headline: str = "no inference backend can run this model") -> None:
        self.reasons = dict(reasons)
        lines = [f"{headline}:"] + [f"  - {name}: {why}" for name, why in self.reasons.items()]
        super().__init__("\n".join(lines))


class InputShapeError(BackendError, ValueError):
    """An input's shape is outside what the model (or the engine's optimisation profile) accepts."""


class InputDtypeError(BackendError, TypeError):
    """An input has the wrong element type or is not an array."""


class InputValueError(BackendError, ValueError):
    """An input holds values the network must not see (NaN or infinity)."""


class EngineFileError(BackendError):
    """A serialised TensorRT engine file is corrupt, truncated or not one of ours."""


class EngineMismatchError(BackendError):
    """A TensorRT engine was built for another TensorRT version, GPU, precision or profile."""


class ModelSourceError(BackendError, FileNotFoundError):
    """The model file or export directory handed to a backend is missing or of the wrong kind."""


class ExportFailedError(BackendError):
    """Exporting a checkpoint for a runtime backend failed (raised by an installed exporter)."""
