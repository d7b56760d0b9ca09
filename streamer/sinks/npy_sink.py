"""Each fused volume as ``DIR/<acquisition>/t00000_c0.npy``: the simplest resumable output, and the one tests diff.

A file appears under its final name only when complete (written as ``.npy.tmp``, then renamed), so a restarted
service rewrites exactly the volumes it reprocesses, one file each. A write that fails (a full disk) removes its
temporary file and says which file and why. A skipped volume leaves ``t00000_c0.skipped.txt`` with its reason.
Only the arrays: the voxel size and provenance live in the OME formats (``zarr``, ``tiff``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from streamer.sinks.base import (
    DoneListener,
    DoneListeners,
    SinkSetupError,
    SinkStateError,
    SinkStats,
    SinkWriteError,
    VolumeIndex,
    VolumeMeta,
    describe_os_error,
)
from streamer.sinks.config import NpyConfig

log = logging.getLogger(__name__)


class NpyDirSink(DoneListeners):
    """Synchronous ``.npy`` writer (one file per volume).

    Parameters
    ----------
    directory
        Folder (or an :class:`~streamer.sinks.config.NpyConfig`); each acquisition gets a sub-folder.
    """

    def __init__(self, directory: str | os.PathLike[str] | NpyConfig) -> None:
        cfg = directory if isinstance(directory, NpyConfig) else NpyConfig(directory=Path(directory))
        self.config = cfg
        self.directory = Path(cfg.directory)
        self.name = "npy"
        self.stats = SinkStats()
        self._dir: Path | None = None
        self._listeners: list[DoneListener] = []

    def setup(self, meta: VolumeMeta) -> None:
        """Create ``DIR/<acquisition>/``; remove the temporary files of an interrupted run."""
        d = self.directory / meta.acquisition_id
        try:
            d.mkdir(parents=True, exist_ok=True)
            for stale in d.glob("*.tmp"):
                stale.unlink()
        except OSError as err:
            raise SinkSetupError(f"{self.name}: cannot write into {d}: {describe_os_error(err)}") from err
        self._dir = d

    def _path(self, index: VolumeIndex, suffix: str) -> Path:
        if self._dir is None:
            raise SinkStateError(f"{self.name}: {index.label()} before setup() or after close()")
        return self._dir / f"t{index.timepoint:05d}_c{index.channel}{suffix}"

    @staticmethod
    def _write_text(path: Path, text: str) -> None:
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(text, encoding="utf-8", errors="backslashreplace")
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise

    def append(self, volume: np.ndarray, index: VolumeIndex) -> None:
        """Write ``volume`` to its file.

        Raises
        ------
        SinkWriteError
            Naming the file and what the disk said ("disk full"); the temporary file is removed.
        """
        path = self._path(index, ".npy")
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "wb") as fh:
                np.save(fh, volume)
            os.replace(tmp, path)
            path.with_name(path.stem + ".skipped.txt").unlink(missing_ok=True)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            self.stats.errors += 1
            msg = f"{self.name}: {describe_os_error(err)} while writing {index.label()} to {path}"
            self.stats.last_error = msg
            raise SinkWriteError(msg, index=index, cause=err) from err
        self.stats.written += 1
        self.stats.bytes_written += volume.nbytes
        self._done(index, True)

    def skip(self, index: VolumeIndex, reason: str) -> None:
        """Leave ``t…_c….skipped.txt`` with the reason (unless an earlier run wrote the volume)."""
        if self._path(index, ".npy").exists():
            self._done(index, True)  # a skip never hides data that exists
            return
        path = self._path(index, ".skipped.txt")
        try:
            self._write_text(path, reason + "\n")
        except OSError as err:
            self.stats.errors += 1
            raise SinkWriteError(f"{self.name}: {describe_os_error(err)} while writing {path}", index=index,
                                 cause=err) from err
        self.stats.skipped[index] = reason
        self._done(index, False)

    def close(self) -> None:
        self._dir = None
