"""The simplest resumable output: each volume as ``DIR/<acquisition>/t00000_c0.npy``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from streamer.sinks.base import SinkStats, VolumeIndex, VolumeMeta


class NpyDirSink:
    """Each volume as ``DIR/<acquisition>/t00000_c0.npy`` (written under a temporary name, then renamed).

    A restarted service rewrites exactly the files that are missing, and tests compare live and replayed outputs
    file by file.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.name = "npy"
        self.stats = SinkStats()
        self._dir: Path | None = None

    def setup(self, meta: VolumeMeta) -> None:
        self._dir = self.directory / meta.acquisition_id
        self._dir.mkdir(parents=True, exist_ok=True)

    def _path(self, index: VolumeIndex, suffix: str) -> Path:
        assert self._dir is not None
        return self._dir / f"t{index.timepoint:05d}_c{index.channel}{suffix}"

    def append(self, volume: np.ndarray, index: VolumeIndex) -> None:
        path = self._path(index, ".npy")
        tmp = path.with_suffix(".npy.tmp")
        with open(tmp, "wb") as fh:
            np.save(fh, volume)
        os.replace(tmp, path)
        self.stats.written += 1
        self.stats.bytes_written += volume.nbytes

    def skip(self, index: VolumeIndex, reason: str) -> None:
        self._path(index, ".skipped.txt").write_text(reason + "\n")
        self.stats.skipped[index] = reason

    def close(self) -> None:
        self._dir = None
