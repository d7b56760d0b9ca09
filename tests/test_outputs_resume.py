"""Exactly once on the sink side: no empty dataset after an early kill, a restart resumes the same dataset, every
volume once; the done callback only after the volume is durably there; disk full names the file and leaves no temp."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import resource
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import zarr

from streamer import wire
from streamer.recording import RecordingWriter
from streamer.service import request
from streamer.sinks import OmeTiffConfig, OmeZarrConfig, SinkSetupError, VolumeIndex, VolumeMeta, open_sink
from streamer.sinks.npy_sink import NpyDirSink
from streamer.sinks.tiff_sink import tiff_name
from streamer.sinks.volume_log import LOG_NAME, read_log
from streaming_util import start_msg

REPO = Path(__file__).resolve().parents[1]
SHAPE = (4, 12, 10)


def meta(acq: str = "run", **kw) -> VolumeMeta:
    args = dict(acquisition_id=acq, shape=SHAPE, dtype="uint16", voxel_size_um=(0.0617,) * 3, n_timepoints=None,
                provenance={"mode": "sr-rl", "models": {"checkpoint": {"sha256": "ab" * 32}}})
    args.update(kw)
    return VolumeMeta(**args)


def vol(t: int) -> np.ndarray:
    return np.random.default_rng(t).integers(1, 4000, SHAPE).astype(np.uint16)


@pytest.mark.parametrize("backend", ["zarr-python", "direct", pytest.param("tensorstore", marks=pytest.mark.skipif(
    importlib.util.find_spec("tensorstore") is None, reason="tensorstore not installed"))])
def test_zarr_dataset_appears_only_with_its_first_volume_and_resumes_in_place(tmp_path, backend) -> None:
    path = tmp_path / "run.ome.zarr"
    cfg = dict(path=path, resume=True, backend=backend, shard=backend != "direct")
    a = open_sink(OmeZarrConfig(**cfg))
    a.setup(meta())
    assert not path.exists()  # set up but nothing written: a kill now leaves no dataset under its name
    a.append(vol(0), VolumeIndex(0))
    assert path.exists() and not a.partial_path.exists()
    a.append(vol(1), VolumeIndex(1))
    del a  # killed: never closed

    b = open_sink(OmeZarrConfig(**cfg))  # the restarted service
    b.setup(meta())
    assert b.resumed == {VolumeIndex(0), VolumeIndex(1)}
    b.append(vol(1), VolumeIndex(1))  # reprocessed (the kill came before done.log had it): already there, kept
    b.append(vol(2), VolumeIndex(2))
    b.skip(VolumeIndex(0), "a later run cannot process it")  # never hides what exists
    b.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.ome.zarr"]
    g = zarr.open_group(path, mode="r")
    assert g["0"].shape[0] == 3
    for t in range(3):
        np.testing.assert_array_equal(g["0"][t, 0], vol(t))
    r = g.attrs["rllsm"]
    assert r["stored"] == [[0, 0], [1, 0], [2, 0]] and r["skipped"] == {} and r["complete"] is True
    assert [(x["t"], x["stored"]) for x in read_log(path / LOG_NAME)] == [(0, True), (1, True), (2, True)]
    assert r["provenance"]["models"]["checkpoint"]["sha256"] == "ab" * 32


def test_zarr_setup_removes_what_a_run_killed_before_its_first_volume_left(tmp_path) -> None:
    path = tmp_path / "run.ome.zarr"
    a = open_sink(OmeZarrConfig(path=path, resume=True))
    a.setup(meta())
    assert a.partial_path.exists()
    b = open_sink(OmeZarrConfig(path=path, resume=True))
    b.setup(meta())
    b.close()  # nothing came at all: no dataset rather than an empty one
    assert list(tmp_path.iterdir()) == []


def test_zarr_resume_refuses_another_acquisition_or_geometry(tmp_path) -> None:
    path = tmp_path / "run.ome.zarr"
    s = open_sink(OmeZarrConfig(path=path))
    s.setup(meta())
    s.append(vol(0), VolumeIndex(0))
    s.close()
    for other, what in ((meta("other"), "acquisition"), (meta(shape=(5, 12, 10)), "5×12×10"),
                        (meta(voxel_size_um=(0.1024, 0.0926, 0.0926)), "voxel size")):
        with pytest.raises(SinkSetupError, match=what):
            open_sink(OmeZarrConfig(path=path, resume=True)).setup(other)
    with pytest.raises(ValueError, match="not both"):
        OmeZarrConfig(path=path, resume=True, overwrite=True)


@pytest.mark.parametrize("kind", ["zarr", "tiff", "npy"])
def test_done_listener_fires_only_once_the_volume_is_on_disk(tmp_path, kind) -> None:
    if kind == "zarr":
        sink = open_sink(OmeZarrConfig(path=tmp_path / "run.ome.zarr"))
    elif kind == "tiff":
        sink = open_sink(OmeTiffConfig(directory=tmp_path))
    else:
        sink = NpyDirSink(tmp_path)
    seen: list[tuple[VolumeIndex, bool, bool]] = []

    def on_disk(index: VolumeIndex, stored: bool) -> bool:
        if kind == "zarr":  # the dataset's durable per-volume table, under the dataset's final name
            recs = read_log(tmp_path / "run.ome.zarr" / LOG_NAME)
            return any((r["t"], r["c"], r["stored"]) == (index.timepoint, index.channel, stored) for r in recs)
        if kind == "tiff":
            if stored:
                return (tmp_path / tiff_name("run", index)).exists()
            return index.label() in (tmp_path / "run_skipped.txt").read_text()
        return (tmp_path / "run" / f"t{index.timepoint:05d}_c0{'.npy' if stored else '.skipped.txt'}").exists()

    sink.add_done_listener(lambda i, s: seen.append((i, s, on_disk(i, s))))
    sink.setup(meta())
    sink.append(vol(0), VolumeIndex(0))
    sink.skip(VolumeIndex(1), "incomplete: missing planes 2-3")
    sink.append(vol(2), VolumeIndex(2))
    sink.close()
    assert seen == [(VolumeIndex(0), True, True), (VolumeIndex(1), False, True), (VolumeIndex(2), True, True)]


def test_tiff_restart_keeps_one_file_per_volume_and_the_earlier_skips(tmp_path) -> None:
    a = open_sink(OmeTiffConfig(directory=tmp_path, overwrite=True))
    a.setup(meta())
    a.append(vol(0), VolumeIndex(0))
    a.skip(VolumeIndex(1), "incomplete")
    (tmp_path / (tiff_name("run", VolumeIndex(2)) + ".partial")).write_bytes(b"half a file")  # killed mid-write
    b = open_sink(OmeTiffConfig(directory=tmp_path, overwrite=True))
    b.setup(meta())
    b.append(vol(0), VolumeIndex(0))
    b.append(vol(2), VolumeIndex(2))
    b.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "run_skipped.txt", tiff_name("run", VolumeIndex(0)), tiff_name("run", VolumeIndex(2))]
    assert (tmp_path / "run_skipped.txt").read_text() == "t=1 c=0\tincomplete\n"


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with an error instead of a kill


def test_offline_replay_npy_on_a_full_disk_names_the_file_and_leaves_no_temp(tmp_path) -> None:
    big = np.random.default_rng(0).integers(0, 4000, (8, 120, 120), dtype=np.uint16)  # 230 kB > the 200 kB limit
    with RecordingWriter(tmp_path / "rec") as w:
        w.append(start_msg("full", 8, (120, 120)), 1.0)
        w.append(wire.encode(wire.pixels_header(big, acquisition_id="full", seq=1, timepoint=0), big), 1.1)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "streamer", "replay", str(tmp_path / "rec"), "--offline", "--out",
                           str(out), "--format", "npy", "--mode", "none"], cwd=REPO, capture_output=True, text=True,
                          preexec_fn=_limit_file_size, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.returncode != 0
    assert "disk full" in proc.stderr and str(out / "full" / "t00000_c0.npy") in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(out.rglob("*.tmp"))


@pytest.mark.parametrize("fmt", ["zarr", "tiff"])
def test_offline_replay_writes_the_formats_serve_writes(tmp_path, fmt) -> None:
    from streamer.cli import main

    s = np.arange(2 * 6 * 8, dtype=np.uint16).reshape(2, 6, 8)
    with RecordingWriter(tmp_path / "rec") as w:
        w.append(start_msg("a", 2, (6, 8), n_timepoints=2), 1.0)
        for t in range(2):
            w.append(wire.encode(wire.pixels_header(s + t, acquisition_id="a", seq=1 + t, timepoint=t), s + t), 1.1)
    out = tmp_path / "o"
    args = ["replay", str(tmp_path / "rec"), "--offline", "--out", str(out), "--mode", "none", "--format", fmt]
    assert main(args) == 0
    if fmt == "zarr":
        arr = zarr.open_group(out / "a.ome.zarr", mode="r")["0"]
        for t in range(2):
            np.testing.assert_array_equal(arr[t, 0], s + t)
    else:
        import tifffile

        for t in range(2):
            np.testing.assert_array_equal(tifffile.imread(out / "a" / tiff_name("a", VolumeIndex(t))), s + t)
    assert main(args) == 0  # again into the same folder: resumed, not duplicated, not refused
    assert sorted(p.name for p in out.iterdir()) == (["a.ome.zarr"] if fmt == "zarr" else ["a"])


# --- kill -9 during processing, restart: one dataset, each volume once -----------------------------------------

Z, Y, X = 4, 16, 20
ACQ = "k9"


def _stack(t: int) -> np.ndarray:
    return np.random.default_rng(500 + t).integers(1, 4000, (Z, Y, X), dtype=np.uint16)


def _serve(rec: Path, out: Path, log: Path) -> tuple[subprocess.Popen, dict[str, str]]:
    cmd = [sys.executable, "-m", "streamer", "serve", "--ingest", "tcp://127.0.0.1:0", "--control",
           "tcp://127.0.0.1:0", "--display", "none", "-r", str(rec), "--out", str(out), "--format", "zarr",
           "--mode", "none", "--stack-timeout", "30"]
    with open(log, "ab") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
    line = proc.stdout.readline()
    assert line, f"service did not start; see {log.read_text()[-2000:]}"
    return proc, json.loads(line)


def _send(endpoint: str, msgs: list, stop: threading.Event | None = None) -> None:
    import zmq

    s = zmq.Context.instance().socket(zmq.PUSH)
    s.setsockopt(zmq.LINGER, 5000)
    s.connect(endpoint)
    for m in msgs:
        if stop is not None and stop.wait(0.002):
            break
        s.send_multipart(m, copy=False)
    s.close()


def _stored(path: Path) -> list[list[int]]:
    """Volumes the dataset's table says are stored, one entry per write (a volume written twice appears twice)."""
    return [[r["t"], r["c"]] for r in read_log(path / LOG_NAME) if r.get("stored")]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [11, 12, 13])
def test_kill_9_during_processing_then_restart_leaves_each_volume_once_in_one_dataset(tmp_path, seed) -> None:
    rng = random.Random(seed)
    n = 12
    rec, out, log = tmp_path / "rec", tmp_path / "out", tmp_path / "service.log"
    msgs = [wire.encode(wire.AcquisitionStart(acquisition_id=ACQ, seq=0, z_count=Z, frame_shape=(Y, X),
                                              n_timepoints=n + 2))]
    for t in range(n):
        s = _stack(t)
        msgs.append(wire.encode(wire.pixels_header(s, acquisition_id=ACQ, seq=len(msgs), timepoint=t), s))
    dataset = out / f"{ACQ}.ome.zarr"
    proc, ep = _serve(rec, out, log)
    stop = threading.Event()
    sender = threading.Thread(target=_send, args=(ep["ingest"], msgs, stop), daemon=True)
    sender.start()
    kill_at = rng.randint(1, n - 2)  # volumes stored before the kill: it lands while the writer is busy
    try:
        deadline = 60.0
        import time

        t0 = time.monotonic()
        while len(_stored(dataset)) < kill_at and time.monotonic() - t0 < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        stop.set()
        sender.join(10)
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    before = len(_stored(dataset))
    assert before >= 1
    with RecordingWriter(rec):  # whatever the kill left: the restart reads the same
        pass
    proc, ep = _serve(rec, out, log)
    try:
        extra = []
        for t in (n, n + 1):  # stacks after the restart go to the same dataset
            s = _stack(t)
            extra.append(wire.encode(wire.pixels_header(s, acquisition_id=ACQ, seq=100 + t, timepoint=t), s))
        extra.append(wire.encode(wire.AcquisitionEnd(acquisition_id=ACQ, seq=999, n_messages=0)))
        _send(ep["ingest"], extra)
        from streamer.recording import RecordingReader

        def recorded() -> set[int]:
            with RecordingReader(rec) as r:
                ts = set()
                for i in range(len(r)):
                    h = wire.decode_header(r.header(i))
                    if isinstance(h, wire.Stack):
                        ts.add(h.timepoint)
                return ts

        import time

        t0 = time.monotonic()
        want: set[int] = set()
        while time.monotonic() - t0 < 90:
            want = recorded()
            if {n, n + 1} <= want and {t for t, _ in _stored(dataset)} >= want:
                break
            time.sleep(0.05)
        request(ep["control"], "stop", timeout_s=10)
        assert proc.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"{ACQ}.ome.zarr"], names  # one dataset: no part2, no partial, no second copy
    stored = _stored(dataset)
    assert len(stored) == len({tuple(x) for x in stored}), stored  # each volume written once, across both runs
    assert {t for t, _ in stored} == want, (sorted(want), stored)
    summary = json.loads((dataset / "zarr.json").read_text())["attributes"]["rllsm"]["stored"]
    assert sorted(map(tuple, summary)) == sorted(map(tuple, stored))
    arr = zarr.open_group(dataset, mode="r")["0"]
    for t in want:
        np.testing.assert_array_equal(arr[t, 0], _stack(t))
