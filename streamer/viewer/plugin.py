"""The napari plugin's dock widget: connect to a service, see its status, follow its stream, open its dataset.

Declared in ``napari.yaml`` (npe2) and found through the ``napari.manifest`` entry point, so it appears under
*Plugins → rLLSM service* in any napari where ``rllsm-vsim[viewer]`` is installed. The status is asked on a thread
(a service that does not answer never freezes napari) and shown as :func:`~streamer.viewer.model.service_status_view`
resolves it.
"""

from __future__ import annotations

import threading
from typing import Any

from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QHBoxLayout, QLabel, QLineEdit, QPushButton, QVBoxLayout, QWidget

from streamer.viewer.model import DEFAULT_CONTROL, ServiceStatusView, ViewerError, service_status_view
from streamer.viewer.napari_app import FrameReader, LiveView


class StatusPoller:
    """Asks a service's control socket for ``status`` every ``interval_s`` on a daemon thread; keeps the newest."""

    def __init__(self, control: str, interval_s: float = 1.0, timeout_s: float = 5.0) -> None:
        self.control = control
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.view: ServiceStatusView | None = None
        self.error: str | None = None
        self.replies = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rllsm-status", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import zmq

        from streamer.service import ServiceError, request

        ctx = zmq.Context()  # its own: a REQ socket left waiting on a dead service must not hang anyone else's
        try:
            while not self._stop.is_set():
                try:
                    self.view = service_status_view(request(self.control, "status", self.timeout_s, context=ctx))
                    self.error = None
                    self.replies += 1
                except (ServiceError, ViewerError) as err:
                    self.error = str(err)
                self._stop.wait(self.interval_s)
        finally:
            ctx.term()

    def stop(self) -> None:
        self._stop.set()


class ServicePanel(QWidget):
    """Dock widget: a service's control endpoint, its status, follow/stop following, open the current dataset.

    Parameters
    ----------
    napari_viewer
        The viewer (napari passes it to plugin widgets by this name).
    control
        The control endpoint to put in the field (default: the local service).
    live
        An existing :class:`LiveView` to drive (``rllsm view``); the panel makes its own otherwise.
    """

    def __init__(self, napari_viewer: Any, control: str = DEFAULT_CONTROL, live: LiveView | None = None) -> None:
        super().__init__()
        self.setObjectName("rllsm-service")
        self.setMinimumWidth(340)  # the status table is monospace: room for a stage name and two latencies
        self.viewer = napari_viewer
        self.live = live or LiveView(napari_viewer)
        self.poller: StatusPoller | None = None
        self.poller_timeout_s = 5.0  # a busy service may take seconds to answer; the thread waits, napari does not
        self.reader: FrameReader | None = None
        self.following: str | None = None  # what the panel's own reader follows
        self.endpoint = QLineEdit(control)
        self.endpoint.setObjectName("rllsm-control")
        self.connect_button = QPushButton("Connect")
        self.connect_button.setObjectName("rllsm-connect")
        self.follow_button = QPushButton("Follow stream")
        self.follow_button.setObjectName("rllsm-follow-stream")
        self.dataset_button = QPushButton("Open current dataset")
        self.dataset_button.setObjectName("rllsm-open-dataset")
        self.status = QLabel("not connected")
        self.status.setObjectName("rllsm-status")
        self.status.setWordWrap(True)
        self.status.setStyleSheet("font-family: monospace")
        row = QHBoxLayout()
        row.addWidget(self.endpoint)
        row.addWidget(self.connect_button)
        lay = QVBoxLayout(self)
        lay.addLayout(row)
        lay.addWidget(self.status)
        buttons = QHBoxLayout()
        buttons.addWidget(self.follow_button)
        buttons.addWidget(self.dataset_button)
        lay.addLayout(buttons)
        lay.addStretch(1)
        self.connect_button.clicked.connect(self.connect_service)
        self.follow_button.clicked.connect(self.toggle_following)
        self.dataset_button.clicked.connect(self.open_current_dataset)
        self._timer = QTimer(self)
        self._timer.timeout.connect(self.refresh)
        self._timer.start(100)

    # --- actions ---------------------------------------------------------------------------------------------------

    def connect_service(self) -> None:
        """(Re)start asking the endpoint in the field for status."""
        if self.poller is not None:
            self.poller.stop()
        self.poller = StatusPoller(self.endpoint.text().strip(), timeout_s=self.poller_timeout_s)
        self.status.setText(f"asking {self.poller.control}…")

    def toggle_following(self) -> None:
        """Follow the service's display stream, or stop following (the reader closes; layers stay)."""
        if self.reader is not None:
            self._stop_reader()
            return
        view = self.poller.view if self.poller else None
        if view is None or not view.display:
            self.status.setText(self.status.text() + "\nno display stream known yet: connect to a service first")
            return
        self._start_reader("stream", view.display)

    def open_current_dataset(self) -> None:
        """Follow the dataset the service writes now (it may still be growing)."""
        view = self.poller.view if self.poller else None
        path = view.current_dataset if view else None
        if not path:
            self.status.setText(self.status.text() + "\nthe service reports no dataset (is it writing with --out?)")
            return
        if not path.rstrip("/").endswith(".zarr"):
            self.status.setText(self.status.text() + f"\nonly OME-Zarr datasets are followed live; {path} is not one "
                                "(start the service with --format zarr)")
            return
        self._stop_reader()
        self._start_reader("dataset", path)

    def adopt_reader(self, reader: FrameReader, following: str) -> None:
        """Take over a reader already running (``rllsm view`` starts one before the panel exists)."""
        self._stop_reader()
        self.reader = reader
        self.following = following
        self.follow_button.setText("Stop following")

    def _start_reader(self, kind: str, where: str) -> None:
        from pathlib import Path

        from streamer.viewer.model import Target, resolve_target
        from streamer.viewer.sources import open_source

        try:
            # the service names a dataset it is about to create: follow it even before it exists
            target = resolve_target(where) if kind == "stream" else Target("dataset", path=Path(where))
            source = open_source(target)
        except ViewerError as err:
            self.status.setText(f"cannot open {where}: {err}")
            return
        self.reader = FrameReader(source).start()
        self.following = f"{kind} {where}"
        self.follow_button.setText("Stop following")

    def _stop_reader(self) -> None:
        if self.reader is not None:
            self.reader.stop()
            self.reader = None
        self.following = None
        self.follow_button.setText("Follow stream")

    def refresh(self) -> None:
        if self.reader is not None:
            self.live.dropped = self.reader.dropped
            for frame in self.reader.take():
                self.live.offer(frame)
        if self.poller is None:
            return
        lines = [f"service {self.poller.control}"]
        if self.poller.view is not None:
            lines += self.poller.view.lines()
        if self.poller.error:
            lines.append(f"not answering: {self.poller.error}")
        if self.following:
            lines.append(f"following {self.following}: {self.live.frames_shown} shown, "
                         f"{self.reader.dropped if self.reader else 0} dropped")
        if self.reader is not None and self.reader.error is not None:
            lines.append(f"reading stopped: {self.reader.error}")
        self.status.setText("\n".join(lines))

    def close_all(self) -> None:
        """Stop the status thread and the reader; safe to call twice and after Qt deleted the widget."""
        try:
            self._timer.stop()
        except RuntimeError:  # the C++ timer went with the widget
            pass
        if self.reader is not None:
            self.reader.stop()
            self.reader = None
        if self.poller is not None:
            self.poller.stop()

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt's name)
        self.close_all()
        super().closeEvent(event)
