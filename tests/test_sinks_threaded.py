"""The writer thread: appends never wait for the disk, drops are counted and recorded, a disk error stops it cleanly."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import importlib.util

import numpy as np
import pytest
import zarr

from streamer.metrics import Metrics
from streamer.sinks import (
    OmeTiffConfig,
    OmeZarrConfig,
    SinkStateError,
    SinkStats,
    ThreadedSink,
    VolumeIndex,
    VolumeMeta,
    open_sink,
)

REPO = Path(__file__).resolve().parents[1]
HAS_TS = importlib.util.find_spec("tensorstore") is not None
TS = pytest.param("tensorstore", marks=pytest.mark.skipif(not HAS_TS, reason="tensorstore not installed"))
SHAPE = (4, 16, 16)


def meta() -> VolumeMeta:
    return VolumeMeta(acquisition_id="run-1", shape=SHAPE, dtype="uint16", voxel_size_um=(0.2, 0.1, 0.1))


def vol(t: int) -> np.ndarray:
    return np.full(SHAPE, t + 1, np.uint16)


class GatedSink:
    """A real OME-Zarr sink behind a gate: appends wait until the test opens it (a disk that stalls)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.name = inner.name
        self.gate = threading.Event()
        self.entered = threading.Event()

    @property
    def stats(self) -> SinkStats:
        return self.inner.stats

    def setup(self, m: VolumeMeta) -> None:
        self.inner.setup(m)

    def append(self, volume: np.ndarray, index: VolumeIndex) -> None:
        self.entered.set()
        assert self.gate.wait(30), "test never opened the gate"
        self.inner.append(volume, index)

    def skip(self, index: VolumeIndex, reason: str) -> None:
        self.inner.skip(index, reason)

    def close(self) -> None:
        self.inner.close()


def run_with_deadline(fn, timeout: float = 10.0):
    """Run ``fn`` in a thread; fail if it has not returned within ``timeout`` (it would have blocked)."""
    out: list = []
    th = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    th.start()
    th.join(timeout)
    assert not th.is_alive(), "call blocked on a stalled disk"
    return out[0]


def test_stalled_disk_never_blocks_append_and_drops_are_recorded(tmp_path: Path) -> None:
    metrics = Metrics()
    gated = GatedSink(open_sink(OmeZarrConfig(path=tmp_path / "r.ome.zarr")))
    sink = ThreadedSink(gated, queue_size=2, on_full="drop", critical=True, metrics=metrics)
    sink.setup(meta())
    assert sink.append(vol(0), VolumeIndex(0))
    assert gated.entered.wait(10)  # the writer holds t=0 and is stuck on the disk
    results = run_with_deadline(lambda: [sink.append(vol(t), VolumeIndex(t)) for t in range(1, 8)])
    assert results == [True, True, False, False, False, False, False]  # 2 wait in the queue, 5 are dropped
    assert metrics.counter("sink_volumes_dropped", labels={"sink": "ome-zarr"}) == 5
    assert metrics.gauge("sink_queue_depth", labels={"sink": "ome-zarr"}) == 2
    gated.gate.set()
    stats = sink.close(timeout=30)
    assert stats.written == 3 and stats.dropped_queue_full == 5
    assert sorted(i.timepoint for i in stats.skipped) == [3, 4, 5, 6, 7]
    assert all("queue full" in r for r in stats.skipped.values())
    g = zarr.open_group(tmp_path / "r.ome.zarr", mode="r")
    for t in range(3):
        assert (g["0"][t, 0] == t + 1).all()
    # the dataset itself says which timepoints are missing and why
    assert set(g.attrs["rllsm"]["skipped"]) == {f"t={t} c=0" for t in range(3, 8)}
    assert metrics.counter("sink_volumes_written", labels={"sink": "ome-zarr"}) == 3


def test_latest_wins_keeps_the_newest(tmp_path: Path) -> None:
    gated = GatedSink(open_sink(OmeZarrConfig(path=tmp_path / "r.ome.zarr")))
    sink = ThreadedSink(gated, queue_size=1, on_full="drop_oldest", critical=False)
    sink.setup(meta())
    sink.append(vol(0), VolumeIndex(0))
    assert gated.entered.wait(10)
    run_with_deadline(lambda: [sink.append(vol(t), VolumeIndex(t)) for t in range(1, 6)])
    gated.gate.set()
    stats = sink.close(timeout=30)
    assert stats.written == 2  # t=0 (already being written) and t=5 (the newest)
    assert sorted(i.timepoint for i in stats.skipped) == [1, 2, 3, 4]
    assert (zarr.open_group(tmp_path / "r.ome.zarr", mode="r")["0"][5, 0] == 6).all()


def test_non_critical_sink_counts_errors_and_carries_on(tmp_path: Path) -> None:
    folder = tmp_path / "tiffs"
    sink = ThreadedSink(open_sink(OmeTiffConfig(directory=folder)), critical=False)
    sink.setup(meta())
    sink.append(vol(0), VolumeIndex(0))
    assert sink.flush(10)
    shutil.rmtree(folder)  # someone removes the folder mid-acquisition
    sink.append(vol(1), VolumeIndex(1))
    assert sink.flush(10)
    folder.mkdir()
    sink.append(vol(2), VolumeIndex(2))
    sink.skip(VolumeIndex(3), "stack incomplete")  # bookkeeping goes on after an error in a non-critical sink
    stats = sink.close(timeout=10)
    assert stats.written == 2 and stats.errors == 1
    assert "folder no longer exists" in stats.last_error and "t=1 c=0" in stats.last_error
    assert sorted(p.name for p in folder.iterdir()) == ["run-1_skipped.txt", "run-1_t00002_c0.ome.tif"]
    listed = (folder / "run-1_skipped.txt").read_text()
    assert "t=3 c=0\tstack incomplete" in listed
    assert "t=1 c=0\twrite failed: ome-tiff: folder no longer exists" in listed
    assert set(stats.skipped) == {VolumeIndex(1), VolumeIndex(3)}


FULL_DISK_SCRIPT = textwrap.dedent("""
    import resource, signal, sys, threading
    import numpy as np
    from streamer.sinks import OmeZarrConfig, SinkFailed, SinkWriteError, ThreadedSink, VolumeIndex, VolumeMeta, open_sink

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of being killed
    out, backend = sys.argv[1], sys.argv[2]
    m = VolumeMeta(acquisition_id="run-1", shape=(4, 64, 64), dtype="uint16", voxel_size_um=(0.2, 0.1, 0.1))
    told = threading.Event()
    errors = []
    sink = ThreadedSink.for_disk(open_sink(OmeZarrConfig(path=out, backend=backend, shard=backend != "direct")),
                                 queue_size=2,
                                 on_error=lambda e: (errors.append(e), told.set()))
    assert (sink.on_full, sink.critical) == ("drop", True)
    sink.setup(m)
    sink.append(np.ones(m.shape, np.uint16), VolumeIndex(0))
    assert sink.flush(20)
    # from now on no file may grow past 20 kB: a volume is 32 kB, so the next write fails like a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
    sink.append(np.full(m.shape, 2, np.uint16), VolumeIndex(1))
    assert told.wait(20), "caller was not told"
    assert isinstance(errors[0], SinkWriteError) and errors[0].index == VolumeIndex(1)
    assert "write failed" in sink.stats.skipped[VolumeIndex(1)]
    try:
        sink.append(np.ones(m.shape, np.uint16), VolumeIndex(2))
        raise SystemExit("append after failure did not raise")
    except SinkFailed as err:
        assert err.__cause__ is errors[0]
    try:
        sink.close(timeout=20)
        raise SystemExit("close after failure did not raise")
    except SinkFailed:
        pass
    print("ERROR:", errors[0])
""")


@pytest.mark.parametrize("backend", ["zarr-python", TS, "direct"])
def test_disk_error_stops_critical_writer_and_tells_caller(tmp_path: Path, backend: str) -> None:
    out = tmp_path / "r.ome.zarr"
    proc = subprocess.run([sys.executable, "-c", FULL_DISK_SCRIPT, str(out), backend], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    assert "file larger than this system" in line and "t=1 c=0" in line and str(out) in line
    # what was written before the failure is intact and readable
    assert (zarr.open_group(out, mode="r")["0"][0, 0] == 1).all()


def test_block_policy_waits_for_room(tmp_path: Path) -> None:
    gated = GatedSink(open_sink(OmeZarrConfig(path=tmp_path / "r.ome.zarr")))
    sink = ThreadedSink(gated, queue_size=1, on_full="block")
    sink.setup(meta())
    sink.append(vol(0), VolumeIndex(0))
    assert gated.entered.wait(10)
    sink.append(vol(1), VolumeIndex(1))  # fills the queue
    blocked = threading.Thread(target=lambda: sink.append(vol(2), VolumeIndex(2)), daemon=True)
    blocked.start()
    blocked.join(0.2)
    assert blocked.is_alive()  # waiting for room, as asked
    gated.gate.set()
    blocked.join(10)
    assert not blocked.is_alive()
    assert sink.close(timeout=10).written == 3


def test_bad_policy_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SinkStateError, match="on_full"):
        ThreadedSink(open_sink(OmeZarrConfig(path=tmp_path / "x.zarr")), on_full="sometimes")  # type: ignore[arg-type]
    with pytest.raises(SinkStateError, match="queue_size"):
        ThreadedSink(open_sink(OmeZarrConfig(path=tmp_path / "x.zarr")), queue_size=0)


def test_many_sinks_share_a_fixed_pool_in_order_and_a_stalled_one_does_not_stop_the_others(tmp_path: Path) -> None:
    from streamer.sinks.pool import WriterPool

    pool = WriterPool(2, "test-writer")
    stalled = GatedSink(open_sink(OmeZarrConfig(path=tmp_path / "stalled.ome.zarr")))
    slow = ThreadedSink(stalled, queue_size=2, on_full="block", pool=pool)
    slow.setup(meta())
    slow.append(vol(0), VolumeIndex(0))
    assert stalled.entered.wait(10)  # one pool thread is now stuck in this sink's disk
    before = threading.active_count()  # the zarr library's own threads started with the first dataset
    sinks, confirmed = [], []
    for k in range(12):
        s = ThreadedSink(open_sink(OmeZarrConfig(path=tmp_path / f"r{k}.ome.zarr")), queue_size=8, on_full="block",
                         pool=pool)
        s.add_done_listener(lambda index, stored, k=k: confirmed.append((k, index.timepoint, stored)))
        s.setup(meta())
        sinks.append(s)
    for t in range(3):
        for s in sinks:
            s.append(vol(t), VolumeIndex(t))
    sinks[0].skip(VolumeIndex(3), "incomplete")
    for s in sinks:
        assert s.flush(20)
    assert threading.active_count() == before  # 13 sinks, no thread of their own
    for k in range(12):  # each sink's volumes confirmed in the order they were written
        assert [t for kk, t, _ in confirmed if kk == k] == ([0, 1, 2, 3] if k == 0 else [0, 1, 2])
    assert (0, 3, False) in confirmed
    stalled.gate.set()
    for s in [slow, *sinks]:
        assert s.close(timeout=20).written == (1 if s is slow else 3)
    arr = zarr.open_group(tmp_path / "r5.ome.zarr", mode="r")["0"]
    assert [int(arr[t].max()) for t in range(3)] == [1, 2, 3]
    pool.close()
