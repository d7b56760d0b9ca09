"""A frozen snapshot of the processor: what the service's ``status`` reply, ``rllsm status`` and the demo read.

Readers never touch the processor's live containers (which its thread mutates); they get a
:class:`ProcessorStatus`, a consistent copy of bounded size whatever the input was.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from streamer.textlimits import clip

MAX_LISTED = 50  # entries of each list in a status reply or summary


class RunState(StrEnum):
    idle = "idle"  # nothing open
    running = "running"  # at least one acquisition open
    finished = "finished"  # finish() was called


@dataclass(frozen=True)
class ProcessorStatus:
    """What the processor did so far; every list is bounded (``MAX_LISTED``), the totals are exact."""

    state: RunState = RunState.idle
    errors_by_type: dict[str, int] = field(default_factory=dict)
    last_errors: tuple[str, ...] = ()
    incomplete_stacks: tuple[dict[str, Any], ...] = ()
    incomplete_total: int = 0
    quarantined: tuple[dict[str, Any], ...] = ()
    quarantined_total: int = 0
    open_stacks: int = 0
    open_acquisitions: tuple[str, ...] = ()
    gpu_in_flight: int = 0
    output_drops: dict[str, int] = field(default_factory=dict)
    done_stacks: int = 0
    summaries: tuple[dict[str, Any], ...] = ()
    summaries_total: int = 0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = str(self.state)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    def summary_of(self, acquisition_id: str) -> dict[str, Any] | None:
        """The end-of-acquisition summary of ``acquisition_id``, if it finished (and is among the last kept)."""
        return next((s for s in reversed(self.summaries) if s.get("acquisition_id") == acquisition_id), None)


def format_summary(s: dict[str, Any]) -> str:
    """One human-readable paragraph for the end of an acquisition."""
    c = s.get("counters", {})
    lat = s.get("latency_ms") or {}
    parts = [f"acquisition {clip(str(s.get('acquisition_id')), 140)} closed ({s.get('closed', 'ended')}):",
             f"{c.get('volumes_output', 0):g} volumes output, {c.get('stacks_complete', 0):g} stacks complete, "
             f"{c.get('stacks_incomplete', 0):g} incomplete, {c.get('messages_rejected', 0):g} messages rejected, "
             f"{s.get('quarantined_total', 0)} quarantined"]
    if s.get("sender_messages") is not None:
        parts.append(f"(sender sent {s['sender_messages']} messages)")
    if lat:
        parts.append(f"latency p50 {lat['p50']:.0f} ms, p99 {lat['p99']:.0f} ms")
    for inc in s.get("incomplete_stacks", [])[-3:]:
        parts.append(f"\n  incomplete {inc['stack']}: missing planes {inc.get('missing', '')} ({inc['reason']})")
    for q in s.get("quarantined", [])[-3:]:
        parts.append(f"\n  quarantined {q.get('stack') or q.get('acquisition') or 'record ' + str(q.get('record'))}: "
                     f"{q['reason']}")
    return " ".join(parts)
