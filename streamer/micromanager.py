"""Forward every camera frame from Micro-Manager to the service: pycro-manager and pymmcore-plus hooks.

Three lines in a user script (see docs/micromanager.md)::

    from streamer.micromanager import PycroManagerHook
    hook = PycroManagerHook(z_count=101, channels=["488"])
    with Acquisition(directory, name, image_process_fn=hook) as acq: ...

    from streamer.micromanager import PymmcorePlusHandler
    PymmcorePlusHandler().connect(mmc)

The hooks never raise into the acquisition. If the service is down or slow, or a frame's metadata is not understood,
they warn once, count, and return at once so the microscope keeps going. The pixels are handed to ZMQ as a buffer, so
the only copy is the one the camera driver (or pycro-manager's Java→Python transfer) already made.

Indices come from the metadata these libraries really deliver:

* pycro-manager: ``metadata["Axes"] = {"time": t, "z": z, "channel": name}`` plus Micro-Manager tags ``Width``,
  ``Height``, ``PixelType`` (``GRAY8``/``GRAY16``/``GRAY32``) and ``PixelSizeUm``; the number of planes per stack is not
  in a frame's metadata, so it is given to the hook.
* pymmcore-plus: ``event.index = {"t", "z", "c"}``, sizes from ``event.sequence.sizes``, channel names from
  ``event.sequence.channels``, the stage step from ``event.sequence.z_plan.step``, and ``meta["pixel_size_um"]``,
  ``meta["camera_device"]``, ``meta["exposure_ms"]``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from engines.config import OpticsConfig
from engines.errors import RllsmValueError
from streamer.sender import SenderConfig, StreamSender

log = logging.getLogger(__name__)

MM_PIXEL_TYPES = {"GRAY8": "uint8", "GRAY16": "uint16", "GRAY32": "float32"}


class HookError(RllsmValueError):
    """The hook was configured wrongly (raised when it is created, never during the acquisition)."""


class _Forwarder:
    """Shared part: lazy AcquisitionStart from the first frame, counting, never raising."""

    def __init__(self, sender: StreamSender | None, endpoint: str | None, optics: OpticsConfig | None,
                 metrics: Any | None) -> None:
        if sender is not None and endpoint is not None:
            raise HookError("give either a sender or an endpoint, not both")
        self.sender = sender or StreamSender(SenderConfig(endpoint=endpoint) if endpoint else None, metrics=metrics)
        self.metrics = metrics
        self.optics = optics
        self.frames_seen = 0
        self.frames_forwarded = 0
        self.frames_dropped = 0
        self.errors = 0
        self._warned: set[str] = set()

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg + " (further occurrences are counted, not logged)", *args)

    def _forward(self, image: np.ndarray, *, t: int, z: int, c: int, z_count: int,
                 start: Callable[[], dict[str, Any]], metadata: dict[str, Any]) -> None:
        if self.sender.closed:  # the hook is reused after finish(): a new acquisition
            self.new_acquisition()
        if not self.sender.started:
            # built only until it is sent: at camera rate every microsecond of the hook counts
            self.sender.start(**start())  # retried on every frame until the service takes it
        if not self.sender.started:
            self.frames_dropped += 1
            return
        if self.sender.send_frame(image, timepoint=t, z_index=z, z_count=z_count, channel=c, metadata=metadata):
            self.frames_forwarded += 1
        else:
            self.frames_dropped += 1

    def _optics(self, pixel_size_um: Any, stage_step_um: Any = None) -> OpticsConfig:
        if self.optics is not None:
            return self.optics
        fields: dict[str, float] = {}
        for name, value, lo, hi in (("pixel_size_um", pixel_size_um, 0.01, 2.0), ("stage_step_um", stage_step_um, 0, 10)):
            try:
                v = abs(float(value))
            except (TypeError, ValueError):
                continue
            # Micro-Manager reports 0 when no pixel-size configuration is defined; keep our default then
            if lo < v <= hi:
                fields[name] = v
        return OpticsConfig(**fields)

    def stats(self) -> dict[str, Any]:
        """Counters of this hook plus its sender's."""
        return {"seen": self.frames_seen, "forwarded": self.frames_forwarded, "dropped": self.frames_dropped,
                "errors": self.errors, "sender": self.sender.stats()}

    def new_acquisition(self) -> None:
        """Start a fresh acquisition (new id, new AcquisitionStart) if the current one was used; never raises."""
        try:
            if self.sender.started or self.sender.closed:
                old = self.sender
                if not old.closed:
                    self.finish("complete")
                self.sender = StreamSender(old.config, metrics=self.metrics)
        except Exception as err:  # pragma: no cover - must not break the user's script
            self._warn_once("new_acquisition", "could not open a new stream: %s", err)

    def finish(self, reason: str = "complete") -> None:
        """Send AcquisitionEnd (if anything was started) and close the sender; never raises."""
        try:
            if self.sender.started:
                self.sender.end(reason)  # type: ignore[arg-type]
            self.sender.close()
        except Exception as err:  # pragma: no cover - closing must not break the user's script
            self._warn_once("finish", "could not close the stream cleanly: %s", err)


class PycroManagerHook(_Forwarder):
    """A pycro-manager ``image_process_fn``: ``hook(image, metadata) -> (image, metadata)``, unchanged.

    Parameters
    ----------
    z_count
        Planes per stack (the length of the z range in ``multi_d_acquisition_events``).
    channels
        Channel names in index order, as they appear in ``metadata["Axes"]["channel"]``; None: single channel.
    n_timepoints
        Planned timepoints, or None when open-ended.
    optics
        Optics to announce; default: ours with the pixel size from the first frame's ``PixelSizeUm``.
    endpoint, sender
        Where the service listens (default ``tcp://127.0.0.1:5555``), or a ready :class:`StreamSender`.
    """

    def __init__(self, *, z_count: int, channels: Sequence[str] | None = None, n_timepoints: int | None = None,
                 optics: OpticsConfig | None = None, endpoint: str | None = None,
                 sender: StreamSender | None = None, metrics: Any | None = None) -> None:
        if int(z_count) < 1:
            raise HookError(f"z_count must be ≥ 1 planes per stack, got {z_count}")
        super().__init__(sender, endpoint, optics, metrics)
        self.z_count = int(z_count)
        self.channels = tuple(str(c) for c in channels) if channels else None
        self.n_timepoints = n_timepoints

    def _channel_index(self, value: Any) -> int:
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            return int(value)
        if self.channels is None:
            self.channels = (str(value),)
        try:
            return self.channels.index(str(value))
        except ValueError:
            raise KeyError(f"channel {value!r} is not one of {list(self.channels)}") from None

    def __call__(self, image: np.ndarray, metadata: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        self.frames_seen += 1
        try:
            axes: Mapping[str, Any] = metadata["Axes"]
            t = int(axes.get("time", 0))
            z = int(axes.get("z", 0))
            c = self._channel_index(axes.get("channel", 0))
            height = int(metadata.get("Height", image.shape[0]))
            width = int(metadata.get("Width", image.shape[1]))
            if (height, width) != tuple(image.shape[:2]):
                raise ValueError(f"metadata says {height}×{width}, image is {image.shape[0]}×{image.shape[1]}")
            mm_type = metadata.get("PixelType")
            dtype = MM_PIXEL_TYPES.get(mm_type, image.dtype.name) if mm_type else image.dtype.name
            if np.dtype(dtype) != image.dtype:
                raise ValueError(f"PixelType {mm_type} does not match the image's {image.dtype}")
            def start() -> dict[str, Any]:
                return dict(optics=self._optics(metadata.get("PixelSizeUm")), z_count=self.z_count,
                            frame_shape=(height, width), dtype=image.dtype.name, n_timepoints=self.n_timepoints,
                            channels=self.channels or ("0",),
                            metadata={k: metadata[k] for k in ("Camera", "Core-Camera", "Exposure") if k in metadata})

            frame_meta = {k: metadata[k] for k in ("ElapsedTime-ms", "ImageNumber", "ZPositionUm", "Exposure")
                          if k in metadata}
            self._forward(image, t=t, z=z, c=c, z_count=self.z_count, start=start, metadata=frame_meta)
        except Exception as err:  # never into the acquisition
            self.errors += 1
            self._warn_once(type(err).__name__, "rllsm hook could not forward a frame (%s); acquisition continues",
                            err)
        return image, metadata


class PymmcorePlusHandler(_Forwarder):
    """A pymmcore-plus MDA handler: connect :meth:`frameReady` to ``mmc.mda.events.frameReady``.

    It also implements ``sequenceStarted``/``sequenceFinished``, so ``mmc.run_mda(seq, output=handler)`` works too.

    Parameters
    ----------
    optics
        Optics to announce; default: ours with the pixel size from the frame metadata.
    endpoint, sender
        Where the service listens, or a ready :class:`StreamSender`.
    """

    def __init__(self, *, optics: OpticsConfig | None = None, endpoint: str | None = None,
                 sender: StreamSender | None = None, metrics: Any | None = None) -> None:
        super().__init__(sender, endpoint, optics, metrics)
        self._seq_cached: Any = object()
        self._z_count = 1
        self._n_t: int | None = None

    def connect(self, core: Any) -> PymmcorePlusHandler:
        """Connect to ``core.mda.events`` (sequenceStarted, frameReady, sequenceFinished); returns self."""
        events = core.mda.events
        events.sequenceStarted.connect(self.sequenceStarted)
        events.frameReady.connect(self.frameReady)
        events.sequenceFinished.connect(self.sequenceFinished)
        return self

    def sequenceStarted(self, sequence: Any, meta: Any = None) -> None:  # noqa: N802 - pymmcore-plus's name
        """A new MDA is a new acquisition; its AcquisitionStart goes out lazily with the first frame."""
        self.new_acquisition()

    def sequenceFinished(self, sequence: Any) -> None:  # noqa: N802
        self.finish("complete")

    def frameReady(self, img: np.ndarray, event: Any, meta: Mapping[str, Any]) -> None:  # noqa: N802
        self.frames_seen += 1
        try:
            index = event.index
            seq = event.sequence
            if seq is not self._seq_cached:  # sizes are per sequence: work them out once, not per frame
                sizes = {str(getattr(k, "value", k)): int(v) for k, v in (seq.sizes.items() if seq is not None else ())}
                self._z_count = max(sizes.get("z", 1), 1)
                self._n_t = sizes.get("t") or None
                self._seq_cached = seq
            z_count = self._z_count

            def start() -> dict[str, Any]:
                channels = tuple(ch.config for ch in seq.channels) if seq is not None and seq.channels else None
                if channels is None and event.channel is not None:
                    channels = (event.channel.config,)
                # in a sample-scan light-sheet acquisition the z step of the sequence is the stage step
                z_step = getattr(getattr(seq, "z_plan", None), "step", None)
                return dict(optics=self._optics(meta.get("pixel_size_um"), z_step), z_count=z_count,
                            frame_shape=tuple(img.shape[:2]), dtype=img.dtype.name, n_timepoints=self._n_t,
                            channels=channels or ("0",),
                            metadata={k: meta[k] for k in ("camera_device", "exposure_ms") if k in meta})

            frame_meta = {k: meta[k] for k in ("runner_time_ms", "exposure_ms") if k in meta}
            self._forward(img, t=int(index.get("t", 0)), z=int(index.get("z", 0)), c=int(index.get("c", 0)),
                          z_count=z_count, start=start, metadata=frame_meta)
        except Exception as err:  # never into the acquisition
            self.errors += 1
            self._warn_once(type(err).__name__, "rllsm handler could not forward a frame (%s); acquisition "
                            "continues", err)
