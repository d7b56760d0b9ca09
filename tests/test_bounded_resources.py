"""Hostile input to a real ``rllsm serve`` on loopback: memory (RSS) and threads stay bounded, replies stay small.

Goal (docs/benchmarks/streaming.md): any 100 MB of hostile input raises RSS by less than 200 MB, and the thread
count stays under a fixed bound. Each case is a class of input that used to cost gigabytes or a thread each.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from resource_probe import Served, rss_mb, threads
from streamer import wire
from streamer.service import wait_for
from streaming_util import pusher, send_all, start_msg

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")]
RSS_GOAL_MB = 200


def frame_msg(acq: str, t: int, z_count: int, shape=(1, 1), dtype=np.uint8, seq: int = 0) -> list:
    plane = np.zeros(shape, dtype)
    h = wire.pixels_header(plane, acquisition_id=acq, seq=seq, timepoint=t, z_index=0, z_count=z_count)
    return wire.encode(h, plane)


def settle(svc: Served, n: int) -> tuple[float, int]:
    assert wait_for(lambda: svc.caught_up(n), 120, 0.1), svc.status()["queues"]
    return rss_mb(svc.proc.pid), threads(svc.proc.pid)


@pytest.fixture
def served(tmp_path):
    made: list[Served] = []

    def make(*extra: str, mode: str = "classical") -> Served:
        made.append(Served(tmp_path, *extra, mode=mode))
        return made[-1]

    yield make
    for s in made:
        s.kill()


def test_one_byte_frames_declaring_65536_plane_stacks(served, tmp_path):
    svc = served("--format", "npy", mode="none")
    base = settle(svc, 0)[0]
    svc.reset_peaks()
    msgs = [frame_msg("deep", t, 65_536) for t in range(400)]
    with pusher(svc.endpoints["ingest"]) as sock:
        send_all(sock, msgs)
    rss, _ = settle(svc, len(msgs))
    st = svc.status()
    assert svc.peak_rss - base < RSS_GOAL_MB, (base, svc.peak_rss)
    assert svc.status_bytes() < 64_000
    assert st["incomplete_total"] + st["counters"].get("stacks_incomplete", 0) >= 0
    code, out = svc.stop()
    assert code == 0
    assert (tmp_path / "rec" / "summary.json").stat().st_size < 200_000


def test_one_byte_frames_declaring_65536_plane_stacks_are_refused_when_reconstructing(served):
    svc = served("--format", "npy")
    base = settle(svc, 0)[0]
    svc.reset_peaks()
    msgs = [frame_msg("deep", t, 65_536) for t in range(400)]
    with pusher(svc.endpoints["ingest"]) as sock:
        send_all(sock, msgs)
    settle(svc, len(msgs))
    st = svc.status()
    assert st["errors"]["by_type"].get("StackTooLarge") == 400  # would deskew to an absurd width: refused at once
    assert svc.peak_rss - base < RSS_GOAL_MB and svc.status_bytes() < 64_000
    assert svc.stop()[0] == 0


def test_tiny_stack_message_that_would_deskew_to_gigabytes_is_refused(served):
    svc = served("--format", "npy")
    base = settle(svc, 0)[0]
    svc.reset_peaks()
    stack = np.ones((4096, 2, 2), np.uint16)  # 32 KB on the wire
    h = wire.pixels_header(stack, acquisition_id="tiny", seq=0, timepoint=0)
    with pusher(svc.endpoints["ingest"]) as sock:
        send_all(sock, [wire.encode(h, stack)])
    settle(svc, 1)
    st = svc.status()
    assert st["errors"]["by_type"] == {"StackTooLarge": 1} and "deskew" in st["errors"]["last"][-1]
    assert svc.peak_rss - base < RSS_GOAL_MB
    assert svc.stop()[0] == 0


def test_starts_with_big_metadata_are_refused_or_bounded(served):
    svc = served("--format", "npy", mode="none")
    base = settle(svc, 0)[0]
    svc.reset_peaks()
    doc = json.loads(wire.AcquisitionStart(acquisition_id="m", seq=0, z_count=4, frame_shape=(8, 8)).model_dump_json())
    big = [[json.dumps({**doc, "acquisition_id": f"m{i}", "metadata": {"blob": "x" * 1_000_000}}).encode()]
           for i in range(100)]  # 1 MB headers: a sender that ignores the documented limits
    near = [start_msg(f"n{i}", 4, (8, 8), metadata={"blob": "y" * 60_000}) for i in range(300)]  # just valid
    with pusher(svc.endpoints["ingest"]) as sock:
        send_all(sock, big + near)
    rss, _ = settle(svc, len(big) + len(near))
    st = svc.status()
    assert st["errors"]["by_type"].get("MalformedHeader") == 100
    assert rss - base < RSS_GOAL_MB and svc.status_bytes() < 64_000
    assert svc.stop()[0] == 0


def open_acquisitions(first: int, n: int) -> list:
    msgs = []
    for i in range(first, first + n):
        msgs.append(start_msg(f"open{i}", 2, (4, 4)))
        for z in range(2):
            plane = np.full((4, 4), i, np.uint16)
            h = wire.pixels_header(plane, acquisition_id=f"open{i}", seq=1 + z, timepoint=0, z_index=z, z_count=2)
            msgs.append(wire.encode(h, plane))
    return msgs  # a start and one whole stack each, and never an end


@pytest.mark.parametrize("max_open", [4, 64])
def test_never_ending_acquisitions_keep_threads_bounded(served, max_open):
    svc = served("--format", "zarr", "--max-acquisitions", str(max_open), "--writer-threads", "2", mode="none")
    warm = open_acquisitions(0, 4)  # the writers' own pools start with the first dataset: a fixed cost
    with pusher(svc.endpoints["ingest"]) as sock:
        send_all(sock, warm)
    base_rss, base_threads = settle(svc, len(warm))
    svc.reset_peaks()
    more = open_acquisitions(4, 36)
    with pusher(svc.endpoints["ingest"]) as sock:
        send_all(sock, more)
    rss, n_threads = settle(svc, len(warm) + len(more))
    st = svc.status()
    assert st["counters"]["volumes_output"] == 40 and st["queues"]["open_acquisitions"] == min(40, max_open)
    assert st["counters"]["acquisitions_closed_full"] == max(0, 40 - max_open)
    assert svc.status_bytes() < 64_000 and len(st["datasets"]) <= 50
    # the writers are a fixed pool; only the storage library's own bounded pools may still grow a little
    # (asyncio's executor, tensorstore's workers): 36 more acquisitions used to mean 36 more threads
    assert svc.peak_threads <= base_threads + 4, (base_threads, svc.peak_threads)
    assert rss - base_rss < RSS_GOAL_MB
    assert svc.stop()[0] == 0


def test_junk_32mb_messages_while_busy_do_not_pile_up(served):
    svc = served("--format", "npy", mode="none")
    base = settle(svc, 0)[0]
    svc.reset_peaks()
    junk = np.random.default_rng(0).integers(0, 255, 32 << 20, dtype=np.uint8).tobytes()
    with pusher(svc.endpoints["ingest"]) as sock:
        for i in range(40):
            sock.send_multipart([json.dumps({"kind": "frame", "n": i}).encode(), junk], copy=False)
    rss, _ = settle(svc, 40)
    st = svc.status()
    assert st["counters"]["messages_rejected"] == 40
    assert rss - base < RSS_GOAL_MB, (base, rss)
    assert svc.stop()[0] == 0
