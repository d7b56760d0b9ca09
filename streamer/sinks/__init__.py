"""Outputs of the live service: OME-Zarr, OME-TIFF and the display stream, all behind one :class:`Sink` protocol."""

from streamer.sinks.base import (
    Sink,
    SinkError,
    SinkFailed,
    SinkSetupError,
    SinkStateError,
    SinkStats,
    SinkWriteError,
    VolumeIndex,
    VolumeMeta,
)
from streamer.sinks.config import DisplayConfig, OmeTiffConfig, OmeZarrConfig, TiffCompression, ZarrCompression
from streamer.sinks.threaded import ThreadedSink

__all__ = [
    "DisplayConfig", "OmeTiffConfig", "OmeZarrConfig", "Sink", "SinkError", "SinkFailed", "SinkSetupError",
    "SinkStateError", "SinkStats", "SinkWriteError", "ThreadedSink", "TiffCompression", "VolumeIndex", "VolumeMeta",
    "ZarrCompression", "open_sink",
]


def open_sink(config: OmeZarrConfig | OmeTiffConfig) -> Sink:
    """The synchronous sink for a disk config (wrap it in :class:`ThreadedSink` for the live path)."""
    if isinstance(config, OmeZarrConfig):
        from streamer.sinks.zarr_sink import OmeZarrSink

        return OmeZarrSink(config)
    if isinstance(config, OmeTiffConfig):
        from streamer.sinks.tiff_sink import OmeTiffSink

        return OmeTiffSink(config)
    raise SinkSetupError(f"no disk sink for settings of type {type(config).__name__}")
