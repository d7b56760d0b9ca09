"""The errors of distributed runs (under the package's one root, :class:`engines.errors.RllsmError`)."""

from __future__ import annotations

from engines.errors import RllsmRuntimeError, RllsmValueError


class DistributedError(RllsmRuntimeError):
    """A distributed run cannot start or go on (no scheduler, unusable output, mismatched resume); says why."""


class VolumeRejected(RllsmValueError):
    """One volume cannot be made from its input (bad data, a shape the output was not made for); not retried."""
