"""The resume ledger beside a recording: which stacks are output (``done.log``) and what was quarantined
(``quarantine.log``), so that a restart or an offline replay neither redoes nor re-trips on them.

Both files are JSON lines, appended and flushed line by line (a kill -9 loses at most a torn last line, which is
ignored: that stack is simply redone). The writer threads of the outputs confirm volumes through
:meth:`ResumeLedger.mark_done`, so every method is thread-safe.

``done.log``        ``[acquisition, timepoint, channel, stored]``
``quarantine.log``  ``{"record": i, "acquisition": id, "stack": [acq, t, c] | null, "reason": text}``
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import IO, Any

from streamer.assembly import StackKey
from streamer.textlimits import clip

log = logging.getLogger(__name__)

DONE_LOG = "done.log"
QUARANTINE_LOG = "quarantine.log"


class ResumeLedger:
    """Done stacks and quarantined records/stacks/acquisitions of one recording.

    Parameters
    ----------
    directory
        The recording folder; None keeps the ledger in memory only (tests, throw-away replays).
    write
        False: read the ledger but never append (an offline replay must not change the live run's ledger).
    """

    def __init__(self, directory: str | os.PathLike[str] | None, *, write: bool = True) -> None:
        self.directory = Path(directory) if directory is not None else None
        self._lock = threading.Lock()
        self.done: set[StackKey] = set()
        self.stacks: dict[StackKey, str] = {}  # quarantined stacks → reason
        self.records: dict[int, str] = {}  # quarantined messages (by recording index) → reason
        self.acquisitions: dict[str, str] = {}  # quarantined whole acquisitions → reason
        self._done_fh: IO[str] | None = None
        self._q_fh: IO[str] | None = None
        if self.directory is None:
            return
        self._read()
        if write:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._done_fh = open(self.directory / DONE_LOG, "a", buffering=1)
            self._q_fh = open(self.directory / QUARANTINE_LOG, "a", buffering=1)

    def _read(self) -> None:
        assert self.directory is not None
        path = self.directory / DONE_LOG
        if path.exists():
            for line in path.read_text(errors="replace").splitlines():
                try:  # the last line may be torn by a kill; that stack is simply redone
                    acq, t, c, _ = json.loads(line)
                    self.done.add(StackKey(str(acq), int(t), int(c)))
                except (ValueError, TypeError, RecursionError):
                    continue
        path = self.directory / QUARANTINE_LOG
        if path.exists():
            for line in path.read_text(errors="replace").splitlines():
                try:
                    doc = json.loads(line)
                    self._apply(doc)
                except (ValueError, TypeError, KeyError, RecursionError):
                    continue

    def _apply(self, doc: dict[str, Any]) -> None:
        reason = str(doc["reason"])
        if doc.get("stack") is not None:
            acq, t, c = doc["stack"]
            self.stacks[StackKey(str(acq), int(t), int(c))] = reason
        elif doc.get("acquisition") is not None:
            self.acquisitions[str(doc["acquisition"])] = reason
        elif doc.get("record") is not None:
            self.records[int(doc["record"])] = reason

    # --- done ---------------------------------------------------------------------------------------------------

    def is_done(self, key: StackKey) -> bool:
        return key in self.done

    def mark_done(self, key: StackKey, stored: bool) -> None:
        """The stack's critical outputs durably hold it (``stored``) or its skip; called from writer threads too."""
        with self._lock:
            if key in self.done:
                return
            self.done.add(key)
            if self._done_fh is not None:
                try:
                    self._done_fh.write(json.dumps([key.acquisition_id, key.timepoint, key.channel, stored]) + "\n")
                except (OSError, ValueError) as err:  # ledger lost: a restart redoes the stack (no harm, said once)
                    log.warning("cannot append to %s (%s); a restart would redo these stacks", DONE_LOG, err)
                    self._done_fh = None

    # --- quarantine ---------------------------------------------------------------------------------------------

    def quarantine(self, reason: str, *, record: int = -1, stack: StackKey | None = None,
                   acquisition: str | None = None) -> None:
        """Remember that this record / stack / acquisition fails, and why, so later runs skip it with the reason."""
        reason = clip(reason)
        doc: dict[str, Any] = {"record": record if record >= 0 else None, "acquisition": acquisition,
                               "stack": [stack.acquisition_id, stack.timepoint, stack.channel] if stack else None,
                               "reason": reason}
        with self._lock:
            if stack is not None:
                if stack in self.stacks:
                    return
                doc["acquisition"] = None
            elif acquisition is not None:
                if acquisition in self.acquisitions:
                    return
            elif record < 0 or record in self.records:
                return
            self._apply(doc)
            if self._q_fh is not None:
                try:
                    self._q_fh.write(json.dumps(doc) + "\n")
                except (OSError, ValueError) as err:
                    log.warning("cannot append to %s: %s", QUARANTINE_LOG, err)
                    self._q_fh = None

    def skip_reason(self, *, record: int = -1, key: StackKey | None = None, acquisition: str | None = None) -> str | None:
        """Why a message must be skipped on resume ("done", a quarantine reason) or None to process it."""
        if record >= 0 and record in self.records:
            return self.records[record]
        if key is not None:
            if key in self.stacks:
                return self.stacks[key]
            if key in self.done:
                return "done"
            acquisition = key.acquisition_id
        if acquisition is not None and acquisition in self.acquisitions:
            return self.acquisitions[acquisition]
        return None

    @property
    def n_quarantined(self) -> int:
        return len(self.stacks) + len(self.records) + len(self.acquisitions)

    def quarantined(self, limit: int = 20) -> list[dict[str, Any]]:
        """The most recent quarantine entries (bounded, for status and summaries)."""
        out: list[dict[str, Any]] = []
        with self._lock:
            out += [{"record": r, "reason": why} for r, why in list(self.records.items())[-limit:]]
            out += [{"acquisition": a, "reason": why} for a, why in list(self.acquisitions.items())[-limit:]]
            out += [{"stack": k.label(), "reason": why} for k, why in list(self.stacks.items())[-limit:]]
        return out[-limit:]

    def close(self) -> None:
        with self._lock:
            for fh in (self._done_fh, self._q_fh):
                if fh is not None:
                    try:
                        fh.close()
                    except OSError:
                        pass
            self._done_fh = self._q_fh = None

    @property
    def is_open(self) -> bool:
        return self._done_fh is not None
