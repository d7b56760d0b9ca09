"""One root for every error this package raises on purpose.

Every typed error of ``engines``, ``streamer`` and ``export`` derives from :class:`RllsmError`, so the command line
catches the root once and prints one line; the mixins keep the built-in bases, so a caller's ``except ValueError``
or ``except OSError`` still catches what it caught before. An exception that is *not* an :class:`RllsmError` is a
bug (or a failure nobody anticipated) and is reported as such.
"""

from __future__ import annotations


class RllsmError(Exception):
    """Root of the expected failures: the message says what was wrong and, where it can, what to do."""


class RllsmValueError(RllsmError, ValueError):
    """A value (an array, a parameter, a file's content) is outside what the step accepts."""


class RllsmTypeError(RllsmError, TypeError):
    """A value has the wrong type (an array's dtype, a non-array)."""


class RllsmIOError(RllsmError, OSError):
    """A file or folder cannot be read or written."""


class RllsmFileNotFoundError(RllsmIOError, FileNotFoundError):
    """A file or folder that was named does not exist."""


class RllsmRuntimeError(RllsmError, RuntimeError):
    """A step could not complete (a device, a worker, a peer failed) for a reason the message names."""


__all__ = [
    "RllsmError",
    "RllsmFileNotFoundError",
    "RllsmIOError",
    "RllsmRuntimeError",
    "RllsmTypeError",
    "RllsmValueError",
]
