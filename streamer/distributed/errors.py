"""The errors of distributed runs."""

from __future__ import annotations


class DistributedError(RuntimeError):
    """A distributed run cannot start or go on (no scheduler, unusable output, mismatched resume); says why."""


class VolumeRejected(ValueError):
    """One volume cannot be made from its input (bad data, a shape the output was not made for); not retried."""
