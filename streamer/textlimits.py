"""Bounded text: what a hostile value may contribute to an error message, a status reply or a summary."""

from __future__ import annotations

from typing import Any

MAX_ERROR_CHARS = 300  # one error line in status, logs and the quarantine ledger


def clip(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``text`` cut to ``limit`` characters (saying how much was cut); lone surrogates made printable."""
    if len(text) > limit:
        text = f"{text[:limit]}… [{len(text) - limit} more characters]"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def show(value: Any, limit: int = 60) -> str:
    """A short ``repr`` of a received value for an error message (a 900 KB id must not make a 900 KB reply)."""
    return clip(repr(value), limit)
