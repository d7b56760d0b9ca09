"""The viewer following a real service: ``rllsm serve`` and ``rllsm simulate`` as processes on loopback.

The widget/layer test runs on Qt's offscreen platform (no screen, no OpenGL needed: the layers live in napari's
``ViewerModel``). The ``rllsm view --screenshot`` test draws napari's OpenGL canvas, which needs an X server: it starts
its own Xvfb and skips, saying which Debian packages are missing, where there is none.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # before pytest-qt makes the QApplication
pytest.importorskip("napari", reason="the viewer tests need napari (pip install -e '.[test]')")
pytest.importorskip("qtpy.QtWidgets", reason="the viewer tests need a Qt binding such as PyQt6 whose libraries load")

from streamer.display import DisplayClient  # noqa: E402
from streamer.service import request, wait_for  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
SIM = ["--shape", "12,32,80", "--structure", "puncta", "--seed", "1"]
HEADLESS_APT = "xvfb libxcb-icccm4 libxcb-keysyms1"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """A real ``rllsm serve`` (classical fusion, small shapes) on random loopback ports, writing OME-Zarr."""
    root = tmp_path_factory.mktemp("viewer-service")
    cmd = [sys.executable, "-m", "streamer", "serve", "--ingest", "tcp://127.0.0.1:0", "--control",
           "tcp://127.0.0.1:0", "--display", "tcp://127.0.0.1:0", "-r", str(root / "rec"), "--out",
           str(root / "out"), "--mode", "classical"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        line = proc.stdout.readline()
        if not line:
            pytest.fail(f"rllsm serve did not start: {proc.stderr.read()[-2000:]}")
        yield {**json.loads(line), "out": root / "out", "proc": proc}
    finally:
        try:
            request(json.loads(line)["control"], "stop", timeout_s=5)
            proc.wait(60)
        except Exception:
            proc.kill()
            proc.wait(10)


def simulate(ingest: str, timepoints: int, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "streamer", "simulate", "--connect", ingest, "--timepoints", str(timepoints),
           *SIM, *extra]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def volumes_output(control: str) -> int:
    return int(request(control, "status", timeout_s=30)["counters"].get("volumes_output", 0))


class Recorder:
    """A plain display client beside the viewer: everything it receives, keyed (acq, t, c, kind, axis)."""

    def __init__(self, endpoint: str) -> None:
        self.client = DisplayClient(endpoint, kinds=("volume", "mip"), rcvhwm=1000)
        self.got: dict[tuple, object] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            msg = self.client.recv(0.1)
            if msg is not None:
                h = msg.header
                self.got[(h.acquisition_id, h.timepoint, h.channel, h.kind, h.axis)] = msg

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.client.close()


def _ngff_voxel(dataset: Path) -> tuple[float, ...]:
    ome = json.loads((dataset / "zarr.json").read_text())["attributes"]["ome"]
    scale = ome["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"]
    return tuple(scale[-3:])


def test_panel_follows_the_service_layers_hold_the_published_volumes_in_um(qtbot, service):
    import zarr
    from napari.components import ViewerModel

    from streamer.viewer.napari_app import LiveView
    from streamer.viewer.plugin import ServicePanel

    viewer = ViewerModel(ndisplay=3)
    live = LiveView(viewer)
    panel = ServicePanel(viewer, control=service["control"], live=live)
    qtbot.addWidget(panel)
    panel.connect_service()
    qtbot.waitUntil(lambda: panel.poller.view is not None, timeout=15_000)
    assert panel.poller.view.display == service["display"], "the status names the display stream to follow"
    recorder = Recorder(service["display"])
    try:
        panel.toggle_following()
        assert panel.reader is not None and panel.following == f"stream {service['display']}"
        before = volumes_output(service["control"])
        sim = simulate(service["ingest"], 2)
        out, err = sim.communicate(timeout=60)
        assert sim.returncode == 0, err
        acq = out.split("sent acquisition ")[1].split(":")[0]
        assert wait_for(lambda: volumes_output(service["control"]) == before + 2, 60), "the service stopped"
        qtbot.waitUntil(lambda: live.last_frame is not None and live.last_frame.key == (acq, 1, 0), timeout=30_000)
        key = (acq, 1, 0)
        assert wait_for(lambda: all((*key, k, a) in recorder.got for k, a in
                                    [("volume", None), ("mip", "z"), ("mip", "y"), ("mip", "x")]), 10)
        published = recorder.got[(*key, "volume", None)]
        # the layers hold exactly what the service published, at the voxel size its header declared
        assert np.array_equal(viewer.layers["fused c0"].data, published.array)
        for i, ax in enumerate("zyx"):
            layer = viewer.layers[f"MIP {ax} c0"]
            assert np.array_equal(layer.data.squeeze(i), recorder.got[(*key, "mip", ax)].array)
            assert tuple(layer.scale) == pytest.approx(published.header.voxel_size_um)
        assert tuple(viewer.layers["fused c0"].scale) == pytest.approx(published.header.voxel_size_um)
        assert all(str(u) == "micrometer" for u in viewer.layers["fused c0"].units)
        dataset = Path(panel.poller.view.current_dataset)
        assert dataset.name == f"{acq}.ome.zarr"
        assert tuple(viewer.layers["fused c0"].scale) == pytest.approx(_ngff_voxel(dataset))

        # the widget shows the service's status
        qtbot.waitUntil(lambda: f"volumes: {before + 2}" in panel.status.text(), timeout=10_000)
        text = panel.status.text()
        for part in ("state: running", "queue depth: 0", "fuse", "p50", "p99", "errors: 0", f"dataset: {dataset}",
                     f"following stream {service['display']}"):
            assert part in text, f"{part!r} missing from the panel:\n{text}"
        assert "t=1 c=0" in live.text() and "µm" in live.text()

        # open the dataset the service writes: the same volume again, now read from disk
        panel.open_current_dataset()
        qtbot.waitUntil(lambda: live.last_frame.source == "dataset" and live.last_frame.timepoint == 1,
                        timeout=15_000)
        written = zarr.open_array(store=str(dataset / "0"), mode="r")[1, 0]
        assert np.array_equal(viewer.layers["fused c0"].data, written)
        assert np.array_equal(written, published.array), "the display stream and the dataset hold the same volume"
    finally:
        recorder.close()
        panel.close_all()


# --- rllsm view on a virtual screen ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def xdisplay():
    """An Xvfb display on which Qt's xcb platform starts (skips with the missing Debian packages otherwise)."""
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        pytest.skip(f"napari's OpenGL canvas needs an X server; no Xvfb here (Debian: apt-get install {HEADLESS_APT})")
    r, w = os.pipe()
    proc = subprocess.Popen([xvfb, "-displayfd", str(w), "-screen", "0", "1600x1000x24", "-nolisten", "tcp"],
                            pass_fds=(w,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(w)
    try:
        with os.fdopen(r) as f:
            number = f.readline().strip()
        if not number:
            pytest.skip("Xvfb did not start")
        env = {**ENV, "DISPLAY": f":{number}", "QT_QPA_PLATFORM": "xcb"}
        probe = subprocess.run([sys.executable, "-c", "from qtpy.QtWidgets import QApplication; QApplication([])"],
                               env=env, capture_output=True, text=True, timeout=60)
        if probe.returncode != 0:
            pytest.skip(f"Qt's xcb platform does not start on Xvfb ({probe.stderr.strip()[-300:]}); Debian: "
                        f"apt-get install {HEADLESS_APT}")
        yield env
    finally:
        proc.terminate()
        proc.wait(10)


def _start_view(env: dict, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "streamer", "view", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # {"following": ...} once the window is up and subscribed
    assert line.startswith('{"following"'), f"rllsm view did not start: {line}{proc.stderr.read()[-3000:]}"
    return proc


def test_view_screenshot_is_not_blank_and_a_killed_viewer_never_stops_the_service(service, xdisplay, tmp_path):
    shot = tmp_path / "view.png"
    viewer = _start_view(xdisplay, service["display"], "--control", service["control"], "--screenshot", str(shot),
                         "--after", "2", "--timeout", "120")
    doomed = _start_view(xdisplay, service["display"])
    try:
        before = volumes_output(service["control"])
        sim = simulate(service["ingest"], 2, "--rate", "2")
        assert wait_for(lambda: volumes_output(service["control"]) >= before + 1, 60)
        doomed.send_signal(signal.SIGKILL)  # a viewer dying mid-stream, socket and all
        doomed.wait(10)
        out, err = sim.communicate(timeout=90)
        assert sim.returncode == 0, err
        assert wait_for(lambda: volumes_output(service["control"]) == before + 2, 90), "the service stopped"
        status = request(service["control"], "status", timeout_s=30)
        assert status["state"] == "running" and service["proc"].poll() is None
        assert not status["counters"].get("display_errors")

        v_out, v_err = viewer.communicate(timeout=120)
        assert viewer.returncode == 0, v_err[-3000:]
        result = json.loads(v_out.strip().splitlines()[-1])
        assert result["frames_shown"] >= 2 and result["screenshot"] == str(shot)
        assert result["canvas_std"] > 5, "the OpenGL canvas drew nothing"
        from PIL import Image

        img = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
        assert img.shape[0] > 300 and img.shape[1] > 500 and img.std() > 5
    finally:
        for p in (viewer, doomed):
            if p.poll() is None:
                p.kill()
                p.wait(10)


# --- the napari plugin ----------------------------------------------------------------------------------------------


def test_plugin_manifest_is_declared_and_napari_docks_its_service_panel(qtbot):
    import importlib.resources
    import tomllib

    import napari
    from npe2 import PluginManager, PluginManifest

    from streamer.viewer.plugin import ServicePanel

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["napari.manifest"] == {"rllsm-vsim": "streamer.viewer:napari.yaml"}
    assert any("napari" in d for d in project["optional-dependencies"]["viewer"])
    manifest_file = importlib.resources.files("streamer.viewer") / "napari.yaml"
    manifest = PluginManifest.from_file(str(manifest_file))
    assert manifest.name == project["name"]
    pm = PluginManager.instance()
    if manifest.name not in pm:  # an editable install registered it already through the entry point
        pm.register(manifest)
    viewer = napari.Viewer(show=False)  # no layer is drawn: Qt's offscreen platform is enough
    try:
        dock, widget = viewer.window.add_plugin_dock_widget("rllsm-vsim", "rLLSM service")
        assert isinstance(widget, ServicePanel)  # napari hands it a proxy of the viewer, not the viewer itself
        assert widget.endpoint.text() == "tcp://127.0.0.1:5557"
        widget.endpoint.setText("tcp://127.0.0.1:1")  # nobody there: said in the panel, napari stays responsive
        widget.poller_timeout_s = 0.2
        widget.connect_service()
        qtbot.waitUntil(lambda: "not answering" in widget.status.text(), timeout=15_000)
        widget.toggle_following()
        assert widget.reader is None and "connect to a service first" in widget.status.text()
        widget.close_all()
    finally:
        viewer.close()


def test_live_view_pauses_locks_contrast_and_keeps_channels_apart():
    from napari.components import ViewerModel

    from streamer.viewer.model import auto_contrast, frame_from_volume
    from streamer.viewer.napari_app import LiveView

    rng = np.random.default_rng(8)

    def frame(t: int, c: int, gain: float = 1.0):
        vol = (rng.random((4, 6, 8), dtype=np.float32) * gain).astype(np.float32)
        return frame_from_volume(vol, acquisition_id="acq", timepoint=t, channel=c, voxel_size_um=(0.5, 0.1, 0.1))

    viewer = ViewerModel(ndisplay=3)
    live = LiveView(viewer)
    f0 = frame(0, 0)
    assert live.offer(f0)
    layer = viewer.layers["fused c0"]
    assert tuple(layer.contrast_limits) == pytest.approx(auto_contrast(f0.mips["z"]))
    live.toggle_follow()  # pause
    f1, f2 = frame(1, 0), frame(2, 0)
    assert not live.offer(f1) and not live.offer(f2)
    assert layer.data is f0.volume and "paused" in live.text()
    live.toggle_follow()  # follow latest: the newest held frame at once
    assert layer.data is f2.volume and live.follower.held == 1
    layer.contrast_limits = (0.1, 0.3)  # the user's slider
    live.set_contrast_locked(True)
    f3 = frame(3, 0, gain=100.0)
    live.offer(f3)
    assert layer.data is f3.volume and tuple(layer.contrast_limits) == pytest.approx((0.1, 0.3))
    live.set_contrast_locked(False)
    f4 = frame(4, 0, gain=100.0)
    live.offer(f4)
    assert tuple(layer.contrast_limits) == pytest.approx(auto_contrast(f4.mips["z"]))
    g = frame(4, 1)
    live.offer(g)  # a second channel gets its own layers, leaving the first as it was
    assert {ly.name for ly in viewer.layers} == {f"{k} c{c}" for c in (0, 1)
                                                 for k in ("fused", "MIP z", "MIP y", "MIP x")}
    assert viewer.layers["fused c1"].data is g.volume and viewer.layers["fused c0"].data is f4.volume
