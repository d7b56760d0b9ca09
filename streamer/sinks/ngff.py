"""The NGFF 0.5 ``ome`` attribute document of a ``(t, c, z, y, x)`` dataset: axes with units, the voxel size as a
scale transformation, channel names, colours and display windows. Pure functions, shared by every writer."""

from __future__ import annotations

from typing import Any

import numpy as np

from streamer.sinks.base import VolumeMeta

NGFF_VERSION = "0.5"
AXES = ("t", "c", "z", "y", "x")


def channel_color(name: str) -> str:
    """Display colour (RRGGBB) for a channel named by its excitation wavelength in nm; white if not a number."""
    try:
        nm = float(str(name).rstrip("nm").strip())
    except ValueError:
        return "FFFFFF"
    for limit, color in ((430, "8000FF"), (500, "00FFFF" if nm < 470 else "00FF00"), (570, "FFFF00"), (620, "FF8000")):
        if nm < limit:
            return color
    return "FF0000" if nm < 700 else "FF00FF"


def ngff_attributes(meta: VolumeMeta, *, dataset: str = "0", window: dict[int, tuple[float, float]] | None = None
                    ) -> dict[str, Any]:
    """The ``ome`` attribute document (NGFF 0.5) for a ``(t, c, z, y, x)`` dataset described by ``meta``.

    A pure function so that tests and other writers produce the very same metadata.
    """
    dz, dy, dx = (float(v) for v in meta.voxel_size_um)
    dt = float(meta.time_interval_s) if meta.time_interval_s else 1.0
    axes = [
        {"name": "t", "type": "time", "unit": "second"},
        {"name": "c", "type": "channel"},
        {"name": "z", "type": "space", "unit": "micrometer"},
        {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"},
    ]
    dtype = np.dtype(meta.dtype)
    if dtype.kind in "ui":
        lo, hi = float(np.iinfo(dtype).min), float(np.iinfo(dtype).max)
    else:
        lo, hi = 0.0, 1.0
    channels = []
    for i, name in enumerate(meta.channels):
        start, end = (window or {}).get(i, (lo, hi))
        channels.append({
            "label": str(name), "color": channel_color(name), "active": True,
            "window": {"min": lo if dtype.kind in "ui" else start, "max": hi if dtype.kind in "ui" else end,
                       "start": start, "end": end},
        })
    return {
        "version": NGFF_VERSION,
        "multiscales": [{
            "name": meta.acquisition_id,
            "axes": axes,
            "datasets": [{"path": dataset, "coordinateTransformations": [
                {"type": "scale", "scale": [dt, 1.0, dz, dy, dx]},
            ]}],
        }],
        "omero": {"channels": channels, "rdefs": {"model": "color" if len(channels) > 1 else "greyscale"}},
    }
