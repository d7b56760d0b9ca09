"""One OME-TIFF per timepoint and channel, written with tifffile.

Each file is written under a ``.partial`` name and renamed when complete, so a folder watcher (Fiji, PetaKit5D's
streaming mode, a sync tool) never opens half a file and never has to wait "a minute without modification" to know a
file is done. OME-XML carries ``PhysicalSizeX/Y/Z`` in µm (the fused grid's voxel, as the stage chain declares it),
the channel name, the timepoint and the time increment, and a ``MapAnnotation`` (namespace ``rllsm-vsim/provenance``)
with the mode, software version, backend, precision, model files with their SHA-256, the optics and this volume's
placement in the acquisition's grid.

Exactly once: a file exists under its final name only when complete, and a volume written again (a restarted service
reprocessing it) replaces its file atomically — one file per volume whatever happens. Skips are recorded in
``<acquisition>_skipped.txt`` as they come (rewritten atomically) and merged with an earlier run's list.
"""

from __future__ import annotations

import glob
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from streamer.sinks.base import (
    DoneListener,
    DoneListeners,
    SinkError,
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


PROVENANCE_NAMESPACE = "rllsm-vsim/provenance"


def xml_text(text: str) -> str:
    """Text that XML and UTF-8 can hold: lone surrogates and control characters escaped, not a writer crash."""
    t = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return "".join(c if c in "\t\n\r" or ord(c) >= 0x20 else f"\\x{ord(c):02x}" for c in t)


def flat_provenance(prov: Any, prefix: str = "") -> dict[str, str]:
    """Nested provenance → ``{"models.checkpoint.sha256": "…"}`` string pairs (OME MapAnnotation values are text)."""
    out: dict[str, str] = {}
    if isinstance(prov, dict):
        for k, v in prov.items():
            out.update(flat_provenance(v, f"{prefix}{k}."))
    elif isinstance(prov, (list, tuple)) and not any(isinstance(v, (dict, list, tuple)) for v in prov):
        out[prefix.rstrip(".")] = " ".join(str(v) for v in prov)
    elif isinstance(prov, (list, tuple)):
        for i, v in enumerate(prov):
            out.update(flat_provenance(v, f"{prefix}{i}."))
    elif prov is not None:
        out[prefix.rstrip(".")] = str(prov)
    return out


def ome_metadata(meta: VolumeMeta, index: VolumeIndex) -> dict[str, Any]:
    """The ``metadata=`` mapping tifffile turns into OME-XML for one ``(z, y, x)`` volume."""
    dz, dy, dx = (float(v) for v in meta.voxel_size_um)
    md: dict[str, Any] = {
        "axes": "ZYX",
        "Name": xml_text(f"{meta.acquisition_id} t={index.timepoint} c={index.channel}"),
        "PhysicalSizeX": dx, "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": dy, "PhysicalSizeYUnit": "µm",
        "PhysicalSizeZ": dz, "PhysicalSizeZUnit": "µm",
        "Channel": {"Name": [xml_text(str(meta.channels[index.channel]))]},
    }
    if meta.time_interval_s:
        md["TimeIncrement"] = float(meta.time_interval_s)
        md["TimeIncrementUnit"] = "s"
    if meta.optics is not None:
        md["Channel"]["ExcitationWavelength"] = [float(meta.optics.wavelength_nm)]
        md["Channel"]["ExcitationWavelengthUnit"] = ["nm"]
        md["Channel"]["EmissionWavelength"] = [float(meta.optics.emission_nm)]
        md["Channel"]["EmissionWavelengthUnit"] = ["nm"]
    pairs = flat_provenance(dict(meta.provenance))
    row = meta.placements.get(index) if meta.placements is not None else None
    if row:
        pairs.update(flat_provenance({"placement": row}))
    if pairs:
        md["MapAnnotation"] = {"Namespace": PROVENANCE_NAMESPACE, **{xml_text(k): xml_text(v) for k, v in pairs.items()}}
    return md


class OmeTiffSink(DoneListeners):
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
        self._listeners: list[DoneListener] = []

    def _skipped_path(self) -> Path:
        assert self._meta is not None
        return self.directory / f"{self._meta.acquisition_id}_skipped.txt"

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
            existing = sorted(self.directory.glob(f"{glob.escape(meta.acquisition_id)}_t*_c*.ome.tif"))
            if existing:
                raise SinkSetupError(f"{self.name}: {existing[0]} already exists (and {len(existing) - 1} more); "
                                     "choose another folder or set overwrite")
        self._meta = meta
        try:
            for stale in self.directory.glob(f"{glob.escape(meta.acquisition_id)}_t*_c*.ome.tif.partial"):
                stale.unlink()  # a file an interrupted run did not finish: it is written again
            skipped = self._skipped_path()
            if skipped.exists():  # an earlier run's skips stay listed (unless this run writes those volumes)
                for line in skipped.read_text(errors="replace").splitlines():
                    label, _, reason = line.partition("\t")
                    idx = _parse_label(label)
                    if idx is not None:
                        self.stats.skipped[idx] = reason
        except OSError as err:
            raise SinkSetupError(f"{self.name}: cannot write into {self.directory}: {describe_os_error(err)}") from err

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
        if self.stats.skipped.pop(index, None) is not None:
            self._write_skips(index)
        self._done(index, True)

    def skip(self, index: VolumeIndex, reason: str) -> None:
        """Record a missing volume in ``<acquisition>_skipped.txt`` (at once; a file already written stays)."""
        if self._meta is None:
            raise SinkStateError(f"{self.name}: skip({index.label()}) before setup()")
        if (self.directory / tiff_name(self._meta.acquisition_id, index)).exists():
            self._done(index, True)  # an earlier run wrote it: a skip never hides data that exists
            return
        self.stats.skipped[index] = reason
        self._write_skips(index)
        self._done(index, False)

    def _write_skips(self, index: VolumeIndex | None) -> None:
        path = self._skipped_path()
        lines = [f"{i.label()}\t{r}\n" for i, r in sorted(self.stats.skipped.items())]
        try:
            if lines:
                _atomic_write(path, "".join(lines))
            else:
                path.unlink(missing_ok=True)
        except OSError as err:
            raise SinkWriteError(f"{self.name}: {describe_os_error(err)} while writing {path}", index=index,
                                 cause=err) from err

    def close(self) -> None:
        """Nothing left to write: every file and the list of skipped volumes are complete as they come."""
        self._closed = True


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    try:
        tmp.write_text(text, encoding="utf-8", errors="backslashreplace")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def _parse_label(label: str) -> VolumeIndex | None:
    """``"t=3 c=0"`` → ``VolumeIndex(3, 0)``; None for anything else."""
    try:
        t, c = label.split()
        return VolumeIndex(int(t.removeprefix("t=")), int(c.removeprefix("c=")))
    except (ValueError, SinkError):
        return None
