"""StreamSender over real sockets: wire-valid messages, zero-copy payloads, drops counted when nobody listens."""

from __future__ import annotations

import logging
import socket
import threading
import time

import numpy as np
import zmq

from streamer.sender import SenderConfig, StreamSender
from streamer.wire import AcquisitionEnd, AcquisitionStart, Frame, Stack, decode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_messages_arrive_wire_valid_and_in_order() -> None:
    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    try:
        with StreamSender(SenderConfig(endpoint=f"tcp://127.0.0.1:{port}", checksum=True),
                          acquisition_id="acq-1") as s:
            deadline = time.monotonic() + 10
            while not s.start(z_count=2, frame_shape=(4, 5), n_timepoints=1):  # connection may take a moment
                assert time.monotonic() < deadline, "never connected"
            frames = [np.arange(20, dtype=np.uint16).reshape(4, 5) + z for z in range(2)]
            for z, f in enumerate(frames):
                assert s.send_frame(f, timepoint=0, z_index=z, z_count=2, metadata={"ZPositionUm": 0.2 * z})
            assert s.send_stack(np.stack(frames), timepoint=1)
            assert s.end()
            got = []
            while len(got) < 5:
                assert pull.poll(10_000)
                got.append(decode(pull.recv_multipart(copy=False), strict=True))
    finally:
        pull.close(0)
    kinds = [type(h) for h, _ in got]
    assert kinds[-4:] == [Frame, Frame, Stack, AcquisitionEnd] and kinds[0] is AcquisitionStart
    start = got[0][0]
    assert start.z_count == 2 and start.frame_shape == (4, 5)
    np.testing.assert_array_equal(got[2][1], frames[1])
    assert got[2][0].metadata == {"ZPositionUm": 0.2}
    np.testing.assert_array_equal(got[3][1], np.stack(frames))
    end = got[4][0]
    # n_messages counts every message numbered before the end, including start attempts that were refused
    assert end.n_messages == end.seq and end.seq == got[3][0].seq + 1


def test_service_down_sends_return_at_once_and_count(caplog) -> None:
    port = free_port()  # nothing listens here
    caplog.set_level(logging.WARNING, logger="streamer.sender")
    s = StreamSender(SenderConfig(endpoint=f"tcp://127.0.0.1:{port}", sndhwm=4))
    frame = np.zeros((64, 64), np.uint16)
    results: list[bool] = []
    th = threading.Thread(target=lambda: results.extend(
        s.send_frame(frame, timepoint=0, z_index=i % 8, z_count=8) for i in range(200)), daemon=True)
    th.start()
    th.join(20)
    assert not th.is_alive(), "send blocked with the service down"
    s.close(0)
    assert results == [False] * 200
    assert s.dropped == 200 and s.sent == 0
    assert len([r for r in caplog.records if "not taking frames" in r.getMessage()]) == 1  # warned once


def test_non_contiguous_frames_are_sent_correctly() -> None:
    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    try:
        with StreamSender(SenderConfig(endpoint=f"tcp://127.0.0.1:{port}")) as s:
            big = np.arange(6 * 8, dtype=np.uint16).reshape(6, 8)
            view = big[:, ::2]  # a strided camera ROI
            deadline = time.monotonic() + 10
            while not s.send_frame(view, timepoint=0, z_index=0, z_count=1):
                assert time.monotonic() < deadline
            assert pull.poll(10_000)
            _, arr = decode(pull.recv_multipart(copy=False))
    finally:
        pull.close(0)
    np.testing.assert_array_equal(arr, view)


def test_frames_after_close_are_counted_drops() -> None:
    from streamer.metrics import Metrics

    m = Metrics()
    s = StreamSender(SenderConfig(endpoint=f"tcp://127.0.0.1:{free_port()}"), metrics=m)
    s.close(0)
    assert s.send_frame(np.zeros((8, 8), np.uint16), timepoint=0, z_index=0, z_count=1) is False
    assert s.dropped == 1 and m.counter("sender_messages_dropped") == 1
