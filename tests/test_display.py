"""Live display stream over real ZMQ sockets: content, kind filtering, latest-wins, no blocking, every drop counted."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from streamer.display import (
    DisplayClient,
    DisplayError,
    DisplayPublisher,
    DisplaySink,
    mips,
    watch,
)
from streamer.metrics import Metrics
from streamer.sinks import DisplayConfig, ThreadedSink, VolumeIndex, VolumeMeta

REPO = Path(__file__).resolve().parents[1]
VOX = (0.3, 0.1, 0.1)


def cfg(**kw) -> DisplayConfig:
    return DisplayConfig(endpoint="tcp://127.0.0.1:0", **kw)


def sample(t: int, shape=(8, 24, 32)) -> np.ndarray:
    return np.random.default_rng(t).integers(0, 60000, shape).astype(np.uint16)


def connect_when_ready(pub: DisplayPublisher, client: DisplayClient, timeout: float = 10.0) -> None:
    """Publish a warm-up volume until the subscription has propagated (ZMQ's slow-joiner), then drain it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pub.publish(np.zeros((2, 2, 2), np.uint16), VolumeIndex(0), acquisition_id="warmup")
        if client.recv(0.05) is not None:
            while client.recv(0.2) is not None:
                pass
            # count from here on; the last warm-up seq stays the reference for gaps
            client.received = client.dropped = 0
            return
    pytest.fail("subscriber never connected")


def collect_timepoint(pub: DisplayPublisher, client: DisplayClient, want: int, vol_for, tries: int = 20) -> dict:
    """Publish volumes until all ``want`` messages of one timepoint arrived (latest-wins may drop some: retry)."""
    for t in range(tries):
        pub.publish(vol_for(t), VolumeIndex(t, 1), acquisition_id="cell-1", voxel_size_um=VOX)
        got = {}
        while (msg := client.recv(1.0)) is not None:
            if msg.header.timepoint == t:
                got[msg.header.axis or "volume"] = msg
            if len(got) == want:
                return got
    pytest.fail(f"no timepoint arrived complete in {tries} tries")


def test_volume_and_three_mips_arrive_intact() -> None:
    with DisplayPublisher(cfg()) as pub, DisplayClient(pub.endpoint) as client:
        connect_when_ready(pub, client)
        got = collect_timepoint(pub, client, 4, sample)
    t = got["volume"].header.timepoint
    vol = sample(t)
    np.testing.assert_array_equal(got["volume"].array, vol)
    np.testing.assert_array_equal(got["z"].array, vol.max(axis=0))
    np.testing.assert_array_equal(got["y"].array, vol.max(axis=1))
    np.testing.assert_array_equal(got["x"].array, vol.max(axis=2))
    h = got["y"].header
    assert (h.kind, h.acquisition_id, h.timepoint, h.channel, h.shape, h.dtype) == ("mip", "cell-1", t, 1,
                                                                                    (8, 32), "uint16")
    assert h.voxel_size_um == VOX


def test_mip_subscriber_never_receives_volumes_and_counts_what_it_missed() -> None:
    with DisplayPublisher(cfg()) as pub, DisplayClient(pub.endpoint, kinds=("mip",)) as client:
        connect_when_ready(pub, client)
        n = 10
        for t in range(n):
            pub.publish(sample(t), VolumeIndex(t), acquisition_id="a")
        kinds = []
        late_warmup = 0  # on a loaded machine a warm-up set can still arrive after the counters were reset
        # a loss is only visible when a later message arrives: keep publishing until the last one is seen
        final = n
        while True:
            msg = client.recv(0.5)
            if msg is None:
                assert final < n + 50, "the stream never recovered after the burst"
                pub.publish(sample(final), VolumeIndex(final), acquisition_id="a")
                final += 1
                continue
            kinds.append(msg.kind)
            if msg.header.acquisition_id == "warmup":
                late_warmup += 1
                continue
            if msg.header.timepoint == final - 1 and msg.header.axis == "x":
                break
        assert set(kinds) == {"mip"}  # volumes were filtered at the publisher
        # latest wins: the burst lost MIPs, but none without being counted
        assert client.received - late_warmup + client.dropped == 3 * final


def test_slow_subscriber_never_blocks_publisher_and_every_drop_is_counted() -> None:
    metrics = Metrics()
    n = 150
    with DisplayPublisher(cfg(sndhwm=4), metrics=metrics) as pub, \
            DisplayClient(pub.endpoint, kinds=("volume",), rcvhwm=2) as client:
        connect_when_ready(pub, client)
        big = sample(0, shape=(32, 128, 128))  # 1 MB a volume: 150 MB would never fit in socket buffers

        def flood() -> None:
            for t in range(n):
                pub.publish(big, VolumeIndex(t), acquisition_id="flood")

        th = threading.Thread(target=flood, daemon=True)
        th.start()
        th.join(60)  # the subscriber reads nothing meanwhile
        assert not th.is_alive(), "publisher blocked on a subscriber that does not read"
        # once the viewer reads again, the stream recovers and the newest volume reaches it
        last = n - 1
        newest = None
        while newest is None or newest.header.timepoint != last:
            assert last < n + 100, "the stream never recovered"
            last += 1
            pub.publish(sample(last, shape=(32, 128, 128)), VolumeIndex(last), acquisition_id="flood")
            newest = client.latest(0.5)
        np.testing.assert_array_equal(newest.array, sample(last, shape=(32, 128, 128)))
    # nothing is lost without being counted: every published volume was either received or counted as dropped
    assert client.received + client.dropped == last + 1
    assert client.dropped > n // 2
    assert metrics.counter("display_superseded") > n // 2  # the publisher knows too


def test_display_sink_behind_latest_wins_queue() -> None:
    with DisplayPublisher(cfg(send_volume=False)) as pub, DisplayClient(pub.endpoint) as client:
        connect_when_ready(pub, client)
        sink = ThreadedSink.for_display(DisplaySink(pub), queue_size=1)
        assert (sink.on_full, sink.critical) == ("drop_oldest", False)
        sink.setup(VolumeMeta(acquisition_id="acq", shape=(8, 24, 32), dtype="uint16", voxel_size_um=VOX))
        for t in range(20):
            sink.append(sample(t), VolumeIndex(t))
        stats = sink.close(timeout=20)
        assert stats.written + len(stats.skipped) == 20
        assert stats.written >= 1
        seen = []
        while (msg := client.recv(2)) is not None:
            seen.append(msg.header.timepoint)
            if msg.header.timepoint == 19 and seen.count(19) == 3:
                break
        assert seen.count(19) == 3  # the newest volume always gets through: its three MIPs


def test_mips_refuse_2d() -> None:
    with pytest.raises(DisplayError, match="MIPs need"):
        mips(np.zeros((4, 4)))
    with pytest.raises(DisplayError, match="unknown display kinds"):
        DisplayClient("tcp://127.0.0.1:1", kinds=("thumbnail",))


def test_bind_conflict_is_a_typed_error() -> None:
    with DisplayPublisher(cfg()) as pub:
        with pytest.raises(DisplayError, match="cannot publish"):
            DisplayPublisher(DisplayConfig(endpoint=pub.endpoint))


def _publish_until(pub: DisplayPublisher, stop: threading.Event) -> None:
    t = 0
    while not stop.is_set():
        pub.publish(sample(t), VolumeIndex(t), acquisition_id="live", voxel_size_um=VOX)
        t += 1
        stop.wait(0.02)


def test_watch_writes_isotropic_mip_pngs(tmp_path: Path) -> None:
    stop = threading.Event()
    with DisplayPublisher(cfg()) as pub:
        th = threading.Thread(target=_publish_until, args=(pub, stop), daemon=True)
        th.start()
        try:
            paths = watch(pub.endpoint, tmp_path, count=6, timeout=20)
        finally:
            stop.set()
            th.join(10)
    assert len(paths) == 6 and all(p.exists() for p in paths)
    by_axis = {p.stem.rsplit("_mip", 1)[1]: p for p in paths}
    assert set(by_axis) == {"z", "y", "x"}
    assert Image.open(by_axis["z"]).size == (32, 24)  # (width, height) = (x, y)
    assert Image.open(by_axis["y"]).size == (32, 24)  # 8 z rows × 0.3/0.1 µm → 24 isotropic rows
    assert Image.open(by_axis["x"]).size == (24, 24)
    assert Image.open(by_axis["z"]).mode == "L"
    assert not list(tmp_path.glob("*.partial"))


def test_watch_times_out_with_a_clear_message(tmp_path: Path) -> None:
    with DisplayPublisher(cfg()) as pub:
        with pytest.raises(DisplayError, match="no MIP arrived .* within 0.3 s"):
            watch(pub.endpoint, tmp_path, count=1, timeout=0.3)


def test_rllsm_watch_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stop = threading.Event()
    with DisplayPublisher(cfg()) as pub:
        th = threading.Thread(target=_publish_until, args=(pub, stop), daemon=True)
        th.start()
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "streamer", "watch", "--connect", pub.endpoint, "--out", str(tmp_path / "png"),
                 "--count", "3", "--timeout", "30"],
                capture_output=True, text=True, cwd=REPO, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)},
            )
        finally:
            stop.set()
            th.join(10)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 3 PNG(s)" in proc.stdout
    assert len(list((tmp_path / "png").glob("live_t*_c0_mip*.png"))) == 3
    from streamer.cli import main

    assert main(["watch", "--out", str(tmp_path), "--count", "0"]) == 2
    assert "--count must be ≥ 1" in capsys.readouterr().err


def test_viewer_slow_on_volumes_does_not_hold_back_mips_for_others() -> None:
    with DisplayPublisher(cfg(sndhwm=2)) as pub, \
            DisplayClient(pub.endpoint, kinds=("volume",), rcvhwm=1) as stuck, \
            DisplayClient(pub.endpoint, kinds=("mip",)) as viewer:
        connect_when_ready(pub, stuck)
        connect_when_ready(pub, viewer)
        big = sample(1, shape=(32, 128, 128))
        last_seen = -1
        for t in range(60):  # the volume subscriber never reads: its queue fills after a few volumes
            pub.publish(big, VolumeIndex(t), acquisition_id="two-viewers")
            msg = viewer.latest(5.0)
            assert msg is not None, f"MIP viewer starved at t={t}"
            last_seen = max(last_seen, msg.header.timepoint)
        assert last_seen >= 55
        assert pub.superseded > 0  # the stuck viewer's volumes were replaced, not queued without bound


def test_latest_mips_returns_a_complete_set_of_the_newest_volume() -> None:
    with DisplayPublisher(cfg(send_volume=False, sndhwm=16)) as pub, DisplayClient(pub.endpoint, kinds=("mip",)) as c:
        connect_when_ready(pub, c)
        for t in range(3):
            pub.publish(sample(t), VolumeIndex(t), acquisition_id="set")
        assert pub.flush(10)
        # "Left the publisher" is not "arrived": on a loaded machine the newest set may still be in transit when
        # latest_mips looks, and it then rightly returns the newest set that has arrived. So ask until the newest
        # arrives; every answer must be one whole set, newer than the previous answer.
        deadline, seen = time.monotonic() + 10, []
        while time.monotonic() < deadline and (not seen or seen[-1] < 2):
            got = c.latest_mips(1.0)
            if got is None:
                continue
            assert set(got) == {"z", "y", "x"}
            t = got["z"].header.timepoint
            assert {m.header.timepoint for m in got.values()} == {t}
            assert not seen or t > seen[-1]
            seen.append(t)
            np.testing.assert_array_equal(got["x"].array, sample(t).max(axis=2))
    assert seen and seen[-1] == 2  # all three volumes' MIPs left the publisher; the newest complete set wins


def test_client_counts_a_message_with_an_unknown_pixel_type_and_goes_on() -> None:
    import json

    import zmq

    with DisplayClient("tcp://127.0.0.1:1") as client:  # connect is lazy: no publisher needed to decode
        for dtype in ("no-such-type", "object"):
            head = {"kind": "mip", "acquisition_id": "a", "seq": 0, "timepoint": 0, "shape": [1], "dtype": dtype}
            parts = [zmq.Frame(json.dumps(head).encode()), zmq.Frame(b"\0" * 8)]
            assert client._decode(parts) is None
        assert client.invalid == 2 and client.received == 0
