"""Micro-Manager hooks fed the metadata pycro-manager and pymmcore-plus really deliver, over real sockets."""

from __future__ import annotations

import logging
import socket
import threading
import time

import numpy as np
import pytest
import zmq

from streamer.micromanager import HookError, PycroManagerHook, PymmcorePlusHandler
from streamer.sender import SenderConfig, StreamSender
from streamer.wire import AcquisitionStart, Frame, decode

useq = pytest.importorskip("useq", reason="pymmcore-plus/useq not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Receiver:
    """A PULL socket standing in for the service's ingest: decodes everything strictly."""

    def __init__(self) -> None:
        self.sock = zmq.Context.instance().socket(zmq.PULL)
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{self.port}"

    def connected_sender(self) -> StreamSender:
        """A sender whose connection is established (ZMQ connects asynchronously)."""
        s = StreamSender(SenderConfig(endpoint=self.endpoint))
        deadline = time.monotonic() + 10
        while not s._sock.poll(10, zmq.POLLOUT):  # with ZMQ_IMMEDIATE, writable = a peer is connected
            assert time.monotonic() < deadline, "sender never connected"
        return s

    def take(self, n: int) -> list:
        out = []
        while len(out) < n:
            assert self.sock.poll(10_000), f"only {len(out)} of {n} messages arrived"
            out.append(decode(self.sock.recv_multipart(copy=False), strict=True))
        return out

    def close(self) -> None:
        self.sock.close(0)


def pycromanager_metadata(t: int, z: int, channel: str, h: int, w: int) -> dict:
    """What pycro-manager hands image_process_fn: Micro-Manager tags plus the 'Axes' dict."""
    return {
        "Axes": {"time": t, "z": z, "channel": channel},
        "Width": w, "Height": h, "PixelType": "GRAY16", "BitDepth": 16, "PixelSizeUm": 0.108,
        "Camera": "HamamatsuHam_DCAM", "Core-Camera": "HamamatsuHam_DCAM", "Exposure": 5.0,
        "ElapsedTime-ms": 12.5 * (t * 3 + z), "ImageNumber": str(t * 3 + z), "ZPositionUm": 0.2 * z,
        "TimeReceivedByCore": "2026-11-24 10:00:00.000000", "Binning": "1",
    }


def test_pycromanager_hook_forwards_frames_and_returns_them_untouched() -> None:
    rx = Receiver()
    try:
        hook = PycroManagerHook(z_count=3, channels=["488", "560"], n_timepoints=2, sender=rx.connected_sender())
        sent = []
        for t in range(2):
            for c in ("488", "560"):
                for z in range(3):
                    img = np.random.default_rng(len(sent)).integers(0, 4000, (16, 24)).astype(np.uint16)
                    md = pycromanager_metadata(t, z, c, 16, 24)
                    out_img, out_md = hook(img, md)
                    assert out_img is img and out_md is md  # pycro-manager stores what we return
                    sent.append((t, z, ["488", "560"].index(c), img))
        msgs = rx.take(1 + len(sent))
    finally:
        hook.finish()
        rx.close()
    start = msgs[0][0]
    assert isinstance(start, AcquisitionStart)
    assert (start.z_count, start.frame_shape, start.dtype, start.n_timepoints) == (3, (16, 24), "uint16", 2)
    assert start.channels == ("488", "560")
    assert start.optics.pixel_size_um == pytest.approx(0.108)
    assert start.metadata["Camera"] == "HamamatsuHam_DCAM"
    for (head, arr), (t, z, c, img) in zip(msgs[1:], sent):
        assert isinstance(head, Frame)
        assert (head.timepoint, head.z_index, head.channel, head.z_count) == (t, z, c, 3)
        np.testing.assert_array_equal(arr, img)
        assert head.metadata["ZPositionUm"] == pytest.approx(0.2 * z)
    assert hook.stats()["forwarded"] == len(sent) and hook.errors == 0


def test_pycromanager_hook_with_service_down_returns_promptly_counts_and_warns_once(caplog) -> None:
    caplog.set_level(logging.WARNING)
    hook = PycroManagerHook(z_count=3, endpoint=f"tcp://127.0.0.1:{free_port()}")
    img = np.zeros((32, 32), np.uint16)
    done = []

    def acquire() -> None:
        for i in range(300):
            out, _ = hook(img, pycromanager_metadata(i // 3, i % 3, "488", 32, 32))
            done.append(out is img)

    th = threading.Thread(target=acquire, daemon=True)
    th.start()
    th.join(20)
    assert not th.is_alive(), "the hook held up the acquisition"
    hook.finish()
    assert all(done) and len(done) == 300
    assert hook.frames_dropped == 300 and hook.frames_forwarded == 0 and hook.errors == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "not taking frames" in warnings[0].getMessage()


def test_pycromanager_hook_survives_bad_metadata(caplog) -> None:
    caplog.set_level(logging.WARNING)
    hook = PycroManagerHook(z_count=2, channels=["488"], endpoint=f"tcp://127.0.0.1:{free_port()}")
    img = np.zeros((8, 8), np.uint16)
    assert hook(img, {"Width": 8, "Height": 8})[0] is img  # no "Axes"
    assert hook(img, pycromanager_metadata(0, 0, "640", 8, 8))[0] is img  # unknown channel
    assert hook(img, {**pycromanager_metadata(0, 0, "488", 8, 8), "PixelType": "GRAY8"})[0] is img
    hook.finish()
    assert hook.errors == 3
    assert any("could not forward" in r.getMessage() for r in caplog.records)
    with pytest.raises(HookError, match="z_count"):
        PycroManagerHook(z_count=0)


def test_pymmcore_plus_handler_with_real_mda_events() -> None:
    seq = useq.MDASequence(time_plan={"interval": 0, "loops": 2}, z_plan={"range": 0.4, "step": 0.2},
                           channels=["488"], axis_order="tcz")
    rx = Receiver()
    try:
        handler = PymmcorePlusHandler(sender=rx.connected_sender())
        handler.sequenceStarted(seq, {})
        images = []
        for i, event in enumerate(seq):  # real MDAEvent objects, as the runner emits them
            img = np.full((12, 10), i, np.uint16)
            meta = {"format": "frame-dict", "version": "1.0", "pixel_size_um": 0.1, "camera_device": "Camera",
                    "exposure_ms": 10.0, "property_values": (), "runner_time_ms": 5.0 * i, "mda_event": event}
            handler.frameReady(img, event, meta)
            images.append((event.index["t"], event.index["z"], img))
        handler.sequenceFinished(seq)
        msgs = rx.take(1 + len(images) + 1)
    finally:
        rx.close()
    start = msgs[0][0]
    assert (start.z_count, start.n_timepoints, start.channels, start.frame_shape) == (3, 2, ("488",), (12, 10))
    assert start.optics.pixel_size_um == pytest.approx(0.1)
    for (head, arr), (t, z, img) in zip(msgs[1:-1], images):
        assert (head.timepoint, head.z_index, head.z_count, head.channel) == (t, z, 3, 0)
        np.testing.assert_array_equal(arr, img)
    end = msgs[-1][0]
    assert end.kind == "acquisition_end" and end.n_messages == 1 + len(images)
    assert handler.errors == 0 and handler.frames_forwarded == 6


def _unicore_with_python_devices(px_um: float = 0.104):
    """A real pymmcore-plus core (UniMMCore) with pure-Python camera, focus stage and shutter.

    Micro-Manager's C++ demo adapters need ``mmcore install`` (a download from micro-manager.org, not reachable here);
    UniMMCore runs the real MDA engine and runner over Python devices instead.
    """
    unicore = pytest.importorskip("pymmcore_plus.experimental.unicore", reason="pymmcore-plus without unicore")

    class Camera(unicore.SimpleCameraDevice):
        def __init__(self) -> None:
            super().__init__()
            self.n = 0
            self.exposure = 1.0

        def get_exposure(self) -> float:
            return self.exposure

        def set_exposure(self, exposure: float) -> None:
            self.exposure = exposure

        def sensor_shape(self) -> tuple[int, int]:
            return (32, 48)

        def dtype(self):
            return np.uint16

        def snap(self, buffer: np.ndarray) -> dict:
            buffer[:] = self.n  # frame k is filled with k, so the receiver can check order and content
            self.n += 1
            return {}

    class Focus(unicore.StageDevice):
        def __init__(self) -> None:
            super().__init__()
            self.pos = 0.0

        def home(self) -> None: ...

        def stop(self) -> None: ...

        def set_origin(self) -> None: ...

        def set_position_um(self, val: float) -> None:
            self.pos = val

        def get_position_um(self) -> float:
            return self.pos

    class Shutter(unicore.ShutterDevice):
        def __init__(self) -> None:
            super().__init__()
            self.state = False

        def get_open(self) -> bool:
            return self.state

        def set_open(self, open: bool) -> None:
            self.state = open

    core = unicore.UniMMCore()
    for label, dev, setter in (("Cam", Camera(), core.setCameraDevice), ("Z", Focus(), core.setFocusDevice),
                               ("Shutter", Shutter(), core.setShutterDevice)):
        core.loadPyDevice(label, dev)
        core.initializeDevice(label)
        setter(label)
    core.definePixelSizeConfig("px")
    core.setPixelSizeUm("px", px_um)
    core.setPixelSizeConfig("px")
    return core


def test_pymmcore_plus_real_in_process_acquisition() -> None:
    core = _unicore_with_python_devices()
    rx = Receiver()
    try:
        handler = PymmcorePlusHandler(sender=rx.connected_sender())
        assert handler.connect(core) is handler
        seq = useq.MDASequence(time_plan={"interval": 0, "loops": 2}, z_plan={"range": 0.6, "step": 0.3},
                               axis_order="tz")
        core.mda.run(seq)  # blocking run in this thread: the real runner, engine and signals
        msgs = rx.take(1 + 6 + 1)
        first_id = handler.sender.acquisition_id
        core.mda.run(useq.MDASequence(z_plan={"range": 0.2, "step": 0.2}))  # a second MDA, same handler
        second = rx.take(1 + 2 + 1)
    finally:
        rx.close()
    assert {h.acquisition_id for h, _ in msgs} == {first_id}
    assert [h.kind for h, _ in second] == ["acquisition_start", "frame", "frame", "acquisition_end"]
    assert second[0][0].acquisition_id != first_id and second[0][0].z_count == 2
    start = msgs[0][0]
    assert (start.z_count, start.n_timepoints, start.frame_shape, start.dtype) == (3, 2, (32, 48), "uint16")
    assert start.optics.pixel_size_um == pytest.approx(0.104)
    assert start.optics.stage_step_um == pytest.approx(0.3)
    assert start.metadata["camera_device"] == "Cam"
    for k, (head, arr) in enumerate(msgs[1:7]):
        assert (head.timepoint, head.z_index, head.z_count) == (k // 3, k % 3, 3)
        assert (arr == k).all()
    assert msgs[7][0].kind == "acquisition_end" and msgs[7][0].reason == "complete"
    assert handler.errors == 0


def test_pymmcore_plus_acquisition_completes_with_service_down(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="streamer")
    core = _unicore_with_python_devices()
    handler = PymmcorePlusHandler(endpoint=f"tcp://127.0.0.1:{free_port()}")
    got: list[int] = []
    core.mda.events.frameReady.connect(handler.frameReady)
    core.mda.events.frameReady.connect(lambda img, event, meta: got.append(int(img[0, 0])))
    seq = useq.MDASequence(time_plan={"interval": 0, "loops": 5}, z_plan={"range": 0.8, "step": 0.2})
    core.mda.run(seq)
    handler.finish()
    assert got == list(range(25))  # the microscope acquired every frame; other listeners saw them all
    assert handler.frames_seen == 25 and handler.frames_dropped == 25 and handler.errors == 0
    assert len([r for r in caplog.records if "not taking frames" in r.getMessage()]) == 1


def test_pycromanager_hook_reused_after_finish_opens_a_new_acquisition() -> None:
    rx = Receiver()
    try:
        hook = PycroManagerHook(z_count=1, endpoint=rx.endpoint)
        img = np.ones((8, 8), np.uint16)
        deadline = time.monotonic() + 10
        while hook.frames_forwarded == 0:  # the connection is asynchronous; frames before it are dropped, counted
            assert time.monotonic() < deadline
            hook(img, pycromanager_metadata(0, 0, "488", 8, 8))
        hook.finish()
        first = hook.sender.acquisition_id
        while hook.frames_forwarded == 1:
            assert time.monotonic() < deadline
            hook(img, pycromanager_metadata(0, 0, "488", 8, 8))
        hook.finish()
        msgs = rx.take(6)
    finally:
        rx.close()
    by_id: dict[str, list[str]] = {}
    for h, _ in msgs:  # two sockets one after the other: their messages may interleave at the receiver
        by_id.setdefault(h.acquisition_id, []).append(h.kind)
    assert len(by_id) == 2 and first in by_id
    assert all(kinds == ["acquisition_start", "frame", "acquisition_end"] for kinds in by_id.values())
