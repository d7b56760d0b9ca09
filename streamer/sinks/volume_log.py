"""The per-volume table of an OME-Zarr dataset: one JSON line per stored volume or skip, appended as they happen.

``<dataset>/0/rllsm_volumes.jsonl`` is the durable record of what the dataset holds (the chunk is written first, then
its line): a restart rebuilds from it which volumes are really stored, the skips with their reasons and each
volume's placement in the grid. Appending a line costs the same at the 10,000th volume as at the first, where
rewriting a growing attribute document after every volume would not (measured: 16 ms → 310 ms per volume over 2,000
volumes on the 2-core container); the attributes get the summary at close and every few seconds. A line torn by a
kill is cut when the log is reopened, so the next line starts clean.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# inside the array's folder: zarr readers list a group's members (and warn about a stray file there), never an
# array's folder, which they address key by key
LOG_NAME = "0/rllsm_volumes.jsonl"


def read_log(path: Path) -> list[dict[str, Any]]:
    """Every whole record of the log (a torn or foreign line is ignored); [] when there is none."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    out = []
    for line in data.split(b"\n"):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("t"), int) and isinstance(rec.get("c"), int):
            out.append(rec)
    return out


class VolumeLog:
    """Append-only writer of the log (opened on the dataset being written; survives the folder's rename)."""

    def __init__(self, path: Path) -> None:
        size = path.stat().st_size if path.exists() else 0
        if size:
            with open(path, "rb") as fh:
                data = fh.read()
            cut = data.rfind(b"\n") + 1
            if cut != size:  # a line torn by a kill: drop it, so the next record starts on its own line
                os.truncate(path, cut)
        self._fh = open(path, "ab", buffering=0)

    def append(self, record: dict[str, Any]) -> None:
        """Write one record with one write() (in the OS's hands when this returns: it survives a kill -9)."""
        self._fh.write(json.dumps(record, default=str).encode() + b"\n")

    def close(self) -> None:
        self._fh.close()
