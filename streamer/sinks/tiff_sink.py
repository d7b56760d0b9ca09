"""One OME-TIFF per timepoint and channel, written with tifffile.

Each file is written under a ``.partial`` name and renamed when complete, so a folder watcher (Fiji, PetaKit5D's
streaming mode, a sync tool) never opens half a file and never has to wait "a minute without modification" to know a
file is done. OME-XML carries ``PhysicalSizeX/Y/Z`` in µm, the channel name, the timepoint and the time increment.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from streamer.sinks.base import (
    SinkSetupError,
    SinkStateError,
    SinkStats,
    SinkWriteError,
    VolumeIndex,
    VolumeMeta,
    check_volume,
    describe_os_error,
)
from streamer.sinks.config import OmeTiffConfig, TiffCompression

log = logging.getLogger(__name__)


def tiff_name(acquisition_id: str, index: VolumeIndex) -> str:
    """File name of one volume: ``<acquisition>_t00012_c0.ome.tif``."""
    return f"{acquisition_id}_t{index.timepoint:05d}_c{index.channel}.ome.tif"


def ome_metadata(meta: VolumeMeta, index: VolumeIndex) -> dict[str, Any]:
    """The ``metadata=`` mapping tifffile turns into OME-XML for one ``(z, y, x)`` volume."""
    dz, dy, dx = (float(v) for v in meta.voxel_size_um)
    md: dict[str, Any] = {
        "axes": "ZYX",
        "Name": f"{meta.acquisition_id} t={index.timepoint} c={index.channel}",
        "PhysicalSizeX": dx, "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": dy, "PhysicalSizeYUnit": "µm",
        "PhysicalSizeZ": dz, "PhysicalSizeZUnit": "µm",
        "Channel": {"Name": [str(meta.channels[index.channel])]},
    }
    if meta.time_interval_s:
        md["TimeIncrement"] = float(meta.time_interval_s)
        md["TimeIncrementUnit"] = "s"
    if meta.optics is not None:
        md["Channel"]["ExcitationWavelength"] = [float(meta.optics.wavelength_nm)]
        md["Channel"]["ExcitationWavelengthUnit"] = ["nm"]
        md["Channel"]["EmissionWavelength"] = [float(meta.optics.emission_nm)]
        md["Channel"]["EmissionWavelengthUnit"] = ["nm"]
    return md


class OmeTiffSink:
    """Synchronous OME-TIFF writer (one file per volume).

    Parameters
    ----------
    config
        Folder, overwrite policy and compression.
    """

    def __init__(self, config: OmeTiffConfig) -> None:
        self.config = config
        self.name = "ome-tiff"
        self.stats = SinkStats()
        self.directory = Path(config.directory)
        self._meta: VolumeMeta | None = None
        self._closed = False
        self.paths: list[Path] = []

    def setup(self, meta: VolumeMeta) -> None:
        """Create the folder and check it is writable.

        Raises
        ------
        SinkSetupError
            If the folder cannot be created or written, or a file of this acquisition exists and overwrite is off.
        """
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise SinkSetupError(f"{self.name}: cannot create {self.directory}: {describe_os_error(err)}") from err
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise SinkSetupError(f"{self.name}: cannot write into {self.directory}: no permission")
        if not self.config.overwrite:
            existing = sorted(self.directory.glob(f"{meta.acquisition_id}_t*_c*.ome.tif"))
            if existing:
                raise SinkSetupError(f"{self.name}: {existing[0]} already exists (and {len(existing) - 1} more); "
                                     "choose another folder or set overwrite")
        self._meta = meta

    def append(self, volume: np.ndarray, index: VolumeIndex) -> None:
        """Write ``volume`` to its own OME-TIFF.

        Raises
        ------
        SinkWriteError
            Naming the file and what the disk said; the partial file is removed.
        """
        import tifffile

        if self._closed:
            raise SinkStateError(f"{self.name}: append({index.label()}) after close()")
        check_volume(self._meta, volume, index, self.name)
        assert self._meta is not None
        path = self.directory / tiff_name(self._meta.acquisition_id, index)
        tmp = path.with_name(path.name + ".partial")
        compression = None if self.config.compression is TiffCompression.none else "zlib"
        try:
            tifffile.imwrite(tmp, volume, ome=True, photometric="minisblack", compression=compression,
                             metadata=ome_metadata(self._meta, index))
            os.replace(tmp, path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            self.stats.errors += 1
            msg = f"{self.name}: {describe_os_error(err)} while writing {index.label()} to {path}"
            self.stats.last_error = msg
            raise SinkWriteError(msg, index=index, cause=err) from err
        self.paths.append(path)
        self.stats.written += 1
        self.stats.bytes_written += volume.nbytes

    def skip(self, index: VolumeIndex, reason: str) -> None:
        """Record a missing volume; listed in ``<acquisition>_skipped.txt`` at close."""
        self.stats.skipped[index] = reason

    def close(self) -> None:
        """Write the list of skipped volumes, if any (a missing file must be explained, not guessed)."""
        if self._closed:
            return
        self._closed = True
        if self._meta is None or not self.stats.skipped:
            return
        path = self.directory / f"{self._meta.acquisition_id}_skipped.txt"
        lines = [f"{i.label()}\t{r}\n" for i, r in sorted(self.stats.skipped.items())]
        try:
            path.write_text("".join(lines))
        except OSError as err:
            raise SinkWriteError(f"{self.name}: {describe_os_error(err)} while writing {path}", cause=err) from err
