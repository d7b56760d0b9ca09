"""Live viewing of the fused stream and of datasets being written (``rllsm view``, the napari plugin).

Three layers, as in ndv: :mod:`.model` is pure (frozen dataclasses in, frozen dataclasses out: which layers, their
scale in µm, contrast with its lock, follow/pause, the text shown) and testable without any GUI; :mod:`.sources`
reads the display stream or an OME-Zarr dataset into :class:`~streamer.viewer.model.Frame` objects without any GUI
either; only :mod:`.napari_app` and :mod:`.plugin` import napari and Qt, and only when a viewer is opened. Nothing
in ``streamer``, ``engines`` or ``export`` imports this package's GUI half.
"""

from __future__ import annotations

from streamer.viewer.model import (
    ContrastState,
    Follower,
    Frame,
    LayerSpec,
    ServiceStatusView,
    Target,
    ViewerError,
    auto_contrast,
    frame_text,
    resolve_layers,
    resolve_target,
    service_status_view,
)

__all__ = [
    "ContrastState", "Follower", "Frame", "LayerSpec", "ServiceStatusView", "Target", "ViewerError",
    "auto_contrast", "frame_text", "resolve_layers", "resolve_target", "service_status_view",
]
