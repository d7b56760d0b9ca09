"""The napari half of the viewer: apply resolved layers to a viewer, read frames on a thread, the ``rllsm view`` window.

Imported only when a viewer opens (``rllsm view``, the plugin); needs the ``viewer`` extra (napari + a Qt binding).
Frames are read on a background thread into a latest-wins slot and applied on the GUI thread by a timer, so a busy
GUI never holds the socket back and the service, which never waits for a viewer anyway, never notices either.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from streamer.viewer.model import ContrastState, Follower, Frame, Target, ViewerError, frame_text, resolve_layers

log = logging.getLogger(__name__)


def require_napari() -> None:
    """Raise :class:`ViewerError` naming what is missing when napari or a Qt binding cannot be imported."""
    missing = []
    for mod in ("napari", "qtpy"):
        try:
            __import__(mod)
        except ImportError as err:
            missing.append(f"{mod} ({err})")
    if not missing:
        try:
            import qtpy.QtWidgets  # noqa: F401  (qtpy imports, but finds no binding)
        except Exception as err:
            missing.append(f"a Qt binding such as PyQt6 ({err})")
    if missing:
        raise ViewerError("the viewer needs napari and a Qt binding: pip install 'rllsm-vsim[viewer]' (missing: "
                          + "; ".join(missing) + ")")


# Debian packages a headless machine needs to draw napari on a virtual screen (the rest comes with PyQt6's wheels)
HEADLESS_APT = ("xvfb", "libxcb-icccm4", "libxcb-keysyms1")


def check_opengl() -> None:
    """Raise :class:`ViewerError` when Qt cannot draw napari's OpenGL canvas here, saying what would.

    napari's canvas is a ``QOpenGLWidget``, which Qt's ``offscreen`` and ``minimal`` platforms cannot draw (it stays
    blank); headless machines run the ``xcb`` platform on a virtual X server instead (``xvfb-run -a rllsm view …``).
    """
    from qtpy.QtGui import QGuiApplication, QOpenGLContext

    from napari._qt.qt_event_loop import get_qapp

    get_qapp()
    platform = QGuiApplication.platformName()
    headless = f"run it on a virtual X server: xvfb-run -a rllsm view … (Debian: apt-get install {' '.join(HEADLESS_APT)})"
    if platform in ("offscreen", "minimal"):
        raise ViewerError(f"Qt's '{platform}' platform cannot draw napari's OpenGL canvas; {headless}")
    if not QOpenGLContext().create():
        raise ViewerError(f"Qt (platform {platform}) cannot create an OpenGL context, which napari needs to draw; "
                          f"on a machine without a screen, {headless}")


def _overlay(viewer: Any, name: str) -> Any:
    """A canvas overlay: napari ≥ 0.9 keeps them in ``viewer.canvas.overlays``, older ones as attributes."""
    overlays = getattr(getattr(viewer, "canvas", None), "overlays", None)
    if overlays is not None and name in overlays:
        return overlays[name]
    return getattr(viewer, {"text": "text_overlay"}.get(name, name))


def _camera(viewer: Any) -> Any:
    scene = getattr(viewer, "scene", None)  # napari ≥ 0.9
    return scene.camera if scene is not None else viewer.camera


class LiveView:
    """Shows frames in a napari viewer (or a bare ``ViewerModel``): follow/pause, contrast with lock. GUI thread only.

    Parameters
    ----------
    viewer
        A ``napari.Viewer`` or ``napari.components.ViewerModel``.
    """

    def __init__(self, viewer: Any) -> None:
        self.viewer = viewer
        self.follower = Follower()
        self.contrast: dict[int, ContrastState] = {}
        self.frames_shown = 0
        self.last_frame: Frame | None = None
        self.listeners: list[Callable[[], None]] = []
        self.dropped = 0  # set by whoever reads the frames (their source's count plus its own skips)

    def offer(self, frame: Frame) -> bool:
        """A frame arrived; shown at once when following, held when paused. True if shown."""
        self.follower, show = self.follower.offer(frame)
        if show is not None:
            self.show(show)
        self._notify()
        return show is not None

    def show(self, frame: Frame) -> None:
        state = self.contrast.get(frame.channel, ContrastState()).update(frame)
        self.contrast[frame.channel] = state
        assert state.limits is not None
        first = len(self.viewer.layers) == 0
        for spec in resolve_layers(frame, state.limits):
            if spec.name in self.viewer.layers:
                layer = self.viewer.layers[spec.name]
                layer.data = spec.data
                layer.scale = spec.scale
                layer.translate = spec.translate
                layer.contrast_limits = spec.contrast_limits
            else:
                layer = self.viewer.add_image(
                    spec.data, name=spec.name, scale=spec.scale, translate=spec.translate,
                    contrast_limits=spec.contrast_limits, colormap=spec.colormap, rendering=spec.rendering,
                    blending="additive", metadata={"role": spec.role, "axis": spec.axis},
                    units=("um",) * 3 if spec.unit == "µm" else ("pixel",) * 3,
                )
        self.last_frame = frame
        self.frames_shown += 1
        if first:
            self._frame_view()
        self._notify()

    def _frame_view(self) -> None:
        _overlay(self.viewer, "scale_bar").visible = True  # its unit comes from the layers' units (µm when known)
        text = _overlay(self.viewer, "text")
        text.visible = True
        text.position = "top_left"
        self.viewer.reset_view()
        if self.viewer.dims.ndisplay == 3:
            # oblique, from the side opposite the MIP walls: the volume in front of its three shadows
            camera = _camera(self.viewer)
            camera.angles = (-20.0, 35.0, 140.0)
            camera.zoom *= 0.75  # reset_view fits the box face-on; turned, its corners need room

    def toggle_follow(self) -> None:
        self.follower, frame = self.follower.toggle()
        if frame is not None:
            self.show(frame)
        self._notify()

    def set_contrast_locked(self, locked: bool) -> None:
        """Lock every channel at the limits its volume layer shows now (the user's slider), or unlock."""
        for c, state in list(self.contrast.items()):
            if locked:
                name = f"fused c{c}"
                limits = tuple(self.viewer.layers[name].contrast_limits) if name in self.viewer.layers else None
                self.contrast[c] = state.lock(limits)  # type: ignore[arg-type]
            else:
                self.contrast[c] = state.unlock()
        self._notify()

    def text(self, dropped: int | None = None, *, multiline: bool = False) -> str:
        dropped = self.dropped if dropped is None else dropped
        if self.last_frame is None:
            return "waiting for the first volume…" + ("" if self.follower.following else " (paused)")
        return frame_text(self.last_frame, following=self.follower.following, dropped=dropped,
                          received=self.follower.received, multiline=multiline)

    def _notify(self) -> None:
        _overlay(self.viewer, "text").text = self.text(self.dropped, multiline=True)
        for fn in list(self.listeners):
            fn()


class FrameReader:
    """Polls a source on a daemon thread into a latest-wins slot (one frame per channel) that the GUI takes."""

    def __init__(self, source: Any) -> None:
        self.source = source
        self._lock = threading.Lock()
        self._slot: dict[int, Frame] = {}
        self.skipped = 0  # frames replaced in the slot before the GUI took them
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rllsm-view-reader", daemon=True)

    def start(self) -> FrameReader:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                for frame in self.source.poll(0.1):
                    with self._lock:
                        self.skipped += frame.channel in self._slot
                        self._slot[frame.channel] = frame
        except Exception as err:  # shown in the window; the viewer stays open on what it has
            log.exception("reading frames failed")
            self.error = err
        finally:
            self.source.close()

    def take(self) -> list[Frame]:
        with self._lock:
            frames, self._slot = list(self._slot.values()), {}
        return frames

    @property
    def dropped(self) -> int:
        return int(self.source.dropped) + self.skipped

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)


def make_live_panel(live: LiveView, reader: FrameReader) -> Any:
    """The dock widget of ``rllsm view``: the frame's text, follow/pause, contrast lock."""
    from qtpy.QtWidgets import QCheckBox, QLabel, QPushButton, QVBoxLayout, QWidget

    w = QWidget()
    w.setObjectName("rllsm-live")
    lay = QVBoxLayout(w)
    info = QLabel(live.text())
    info.setObjectName("rllsm-live-info")
    info.setWordWrap(True)
    follow = QPushButton("Pause")
    follow.setObjectName("rllsm-follow")
    lock = QCheckBox("Lock contrast")
    lock.setObjectName("rllsm-lock-contrast")
    for widget in (info, follow, lock):
        lay.addWidget(widget)

    def refresh() -> None:
        text = live.text()
        if reader.error is not None:
            text += f"\nreading stopped: {reader.error}"
        info.setText(text)
        follow.setText("Pause" if live.follower.following else "Follow latest")

    follow.clicked.connect(live.toggle_follow)
    lock.toggled.connect(live.set_contrast_locked)
    live.listeners.append(refresh)
    w.refresh = refresh  # type: ignore[attr-defined]
    return w


def open_viewer(target: Target, *, screenshot: str | Path | None = None, after: int = 1,
                timeout: float | None = None, control: str | None = None, title: str | None = None,
                on_ready: Callable[[], None] | None = None) -> dict[str, Any]:
    """Open napari on ``target`` and follow it until the window closes (or, with ``screenshot``, after ``after``
    volumes were shown: save the window as PNG and return).

    ``on_ready`` is called once the window is up and the reader subscribed (scripts wait for it before streaming).

    Returns
    -------
    dict
        ``frames_shown``, ``received``, ``dropped``, ``screenshot`` (the path written, or None) and, with a
        screenshot, ``canvas_std``: the standard deviation of the canvas alone, without the text overlay (0 when the
        OpenGL canvas drew nothing).

    Raises
    ------
    ViewerError
        No napari/Qt/OpenGL, an unreadable target, or (with ``timeout``) fewer than ``after`` volumes in time.
    """
    require_napari()
    check_opengl()
    import napari
    from qtpy.QtCore import QTimer

    from streamer.viewer.sources import open_source

    if screenshot is not None:
        try:
            Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ViewerError(f"cannot create the folder for {screenshot}: {err.strerror or err}") from None
    source = open_source(target)
    viewer = napari.Viewer(title=title or f"rllsm view {target.label()}", ndisplay=3, show=True)
    viewer.window.resize(1500, 900)
    live = LiveView(viewer)
    reader = FrameReader(source).start()
    panel = make_live_panel(live, reader)
    service: Any = None
    dock = panel
    if control is not None:
        from qtpy.QtWidgets import QVBoxLayout, QWidget

        from streamer.viewer.plugin import ServicePanel

        service = ServicePanel(viewer, control=control, live=live)
        service.adopt_reader(reader, f"{target.kind} {target.label()}")
        service.connect_service()
        dock = QWidget()  # one dock: the live line on top, the service below (two docks split the height evenly)
        box = QVBoxLayout(dock)
        box.addWidget(panel)
        box.addWidget(service, 1)
    viewer.window.add_dock_widget(dock, name="rLLSM live", area="right")

    def current() -> FrameReader | None:  # the service panel may stop following or switch to the dataset
        return service.reader if service is not None else reader
    result: dict[str, Any] = {"screenshot": None, "timed_out": False, "done": False}
    app = napari.qt.get_qapp()

    def tick() -> None:
        if result["done"]:
            return
        rd = current()
        if rd is not None:
            live.dropped = rd.dropped
        for frame in rd.take() if rd is not None else []:
            live.offer(frame)
        panel.refresh()
        if screenshot is not None and live.frames_shown >= after and result["screenshot"] is None:
            app.processEvents()
            viewer.screenshot(path=str(screenshot), canvas_only=False, flash=False)
            result["screenshot"] = str(screenshot)
            _overlay(viewer, "text").visible = False
            canvas = viewer.screenshot(canvas_only=True, flash=False)
            result["canvas_std"] = float(canvas[..., :3].std())
            finish()

    def finish() -> None:
        result["done"] = True
        timer.stop()
        if service is not None:
            service.close_all()
        viewer.close()

    def give_up() -> None:
        if not result["done"]:
            result["timed_out"] = True
            finish()

    timer = QTimer()
    timer.timeout.connect(tick)
    timer.start(30)
    if timeout is not None:
        QTimer.singleShot(int(timeout * 1000), give_up)
    if on_ready is not None:
        QTimer.singleShot(0, on_ready)
    try:
        napari.run()
    finally:
        result["done"] = True
        reader.stop()
        if service is not None:
            service.close_all()
    out = {"frames_shown": live.frames_shown, "received": live.follower.received, "dropped": reader.dropped,
           "screenshot": result["screenshot"], "canvas_std": result.get("canvas_std")}
    if result["timed_out"] and screenshot is not None and result["screenshot"] is None:
        raise ViewerError(f"only {live.frames_shown} of {after} volumes arrived from {target.label()} within "
                          f"{timeout:g} s; no screenshot written (is the service running and publishing there?)")
    return out
