"""The live service end to end on loopback: ingest → recording → assembly → stages → outputs, status, rejections."""

from __future__ import annotations

import numpy as np
import pytest

from streamer.cli.status_cmd import format_status
from streamer.pipeline import PipelineError, Stage, StageWorker
from streamer.sinks.npy_sink import NpyDirSink
from streamer.recording import RecordingReader
from streamer.service import Service, ServiceConfig, request, wait_for
from streamer.sinks import ThreadedSink
from streamer.sinks.base import SinkStats, SinkWriteError
from streaming_util import end_msg, pusher, send_all, stack_frames, start_msg

SHAPE = (6, 16, 12)


def scale_stages(start):
    return [Stage("to_float", lambda a: a.astype(np.float32)), Stage("scale", lambda a: a * 0.5 + 1.0)]


def config(tmp_path, **kw) -> ServiceConfig:
    base = dict(ingest="tcp://127.0.0.1:0", control="tcp://127.0.0.1:0", recording=tmp_path / "rec",
                output=tmp_path / "out", output_format="npy", stack_timeout_s=30.0)
    base.update(kw)
    return ServiceConfig(**base)


def test_out_of_order_frames_reconstructed_recorded_and_reported(tmp_path):
    rng = np.random.default_rng(0)
    stacks = [rng.integers(0, 4000, SHAPE, dtype=np.uint16) for _ in range(4)]
    with Service(config(tmp_path), stage_factory=scale_stages) as svc:
        msgs = [start_msg("run1", SHAPE[0], SHAPE[1:])]
        for t, s in enumerate(stacks):
            msgs += stack_frames("run1", t, s, rng, seq0=len(msgs))
        msgs.append([b"{not json"])
        msgs.append(end_msg("run1", len(msgs), len(msgs)))
        with pusher(svc.ingest_endpoint) as sock:
            send_all(sock, msgs)
        assert wait_for(lambda: svc.metrics.counter("volumes_output") == 4, 20)
        assert wait_for(lambda: svc.status()["queues"]["backlog"] == 0, 10)
        status = request(svc.control_endpoint, "status")
    c = status["counters"]
    assert c["messages_received"] == len(msgs) and c["stacks_complete"] == 4
    assert status["errors"]["by_type"] == {"MalformedHeader": 1}
    assert "record 25: MalformedHeader: header is not valid JSON" in status["errors"]["last"][0]
    assert set(status["stages"]) >= {"to_float", "scale"} and status["stages"]["scale"]["count"] == 4
    assert "stage scale" in format_status(status)
    for t, s in enumerate(stacks):
        np.testing.assert_array_equal(np.load(tmp_path / "out" / "run1" / f"t{t:05d}_c0.npy"), s * 0.5 + 1.0)
    with RecordingReader(tmp_path / "rec") as rec:  # every message, malformed one included, recorded in order
        assert len(rec) == len(msgs)
        assert [bytes(p) for p in rec.read(len(msgs) - 2)] == [b"{not json"]
    assert (tmp_path / "rec" / "summary.json").exists()


def test_incomplete_stack_is_flagged_reported_and_kept(tmp_path):
    rng = np.random.default_rng(1)
    s = rng.integers(0, 100, SHAPE, dtype=np.uint16)
    with Service(config(tmp_path, stack_timeout_s=1.0), stage_factory=scale_stages) as svc:
        with pusher(svc.ingest_endpoint) as sock:
            send_all(sock, [start_msg("r", SHAPE[0], SHAPE[1:])])
            send_all(sock, stack_frames("r", 0, s, None, 1))  # a whole stack first: outputs exist
            send_all(sock, stack_frames("r", 1, s, None, 10, planes=[0, 1, 4]))
            assert wait_for(lambda: svc.metrics.counter("stacks_incomplete") == 1, 10)
            st = request(svc.control_endpoint, "status")
    (inc,) = st["incomplete_stacks"]
    assert inc["stack"] == "r t=1 c=0" and inc["missing_planes"] == [2, 3, 5] and "no plane for 1 s" in inc["reason"]
    assert "missing planes 2-3,5" in (tmp_path / "out" / "r" / "t00001_c0.skipped.txt").read_text()
    assert svc.final_summary["incomplete_stacks"][0]["stack"] == "r t=1 c=0"


class GatedSink:
    """A display that hangs until released: the injected slow consumer."""

    def __init__(self, gate, fail: bool = False):
        self.name = "broken-display" if fail else "slow-display"
        self.stats, self.gate, self.fail = SinkStats(), gate, fail

    def setup(self, meta):
        pass

    def append(self, volume, index):
        if self.fail:
            raise SinkWriteError("display went away")
        self.gate.wait(30)
        self.stats.written += 1

    def skip(self, index, reason):
        self.stats.skipped[index] = reason

    def close(self):
        pass


def test_slow_display_drops_are_counted_raw_path_drops_nothing(tmp_path):
    import threading

    gate = threading.Event()
    rng = np.random.default_rng(2)
    stacks = [rng.integers(0, 100, SHAPE, dtype=np.uint16) for _ in range(10)]
    display = {}

    def sinks(meta):
        display["d"] = ThreadedSink(GatedSink(gate), queue_size=1, on_full="drop_oldest", critical=False)
        return [(NpyDirSink(tmp_path / "out"), True), (display["d"], False), (GatedSink(gate, fail=True), False)]

    with Service(config(tmp_path), stage_factory=scale_stages, sink_factory=sinks) as svc:
        msgs = [start_msg("r", SHAPE[0], SHAPE[1:])]
        for t, s in enumerate(stacks):
            msgs += stack_frames("r", t, s, rng, len(msgs))
        with pusher(svc.ingest_endpoint) as sock:
            send_all(sock, msgs)
        assert wait_for(lambda: svc.metrics.counter("volumes_output") == 10, 20)
        st = request(svc.control_endpoint, "status")
        gate.set()
    assert st["counters"]["messages_received"] == len(msgs)
    # one volume held by the hung append, one waiting, the rest replaced (9 if the writer thread had not yet taken one)
    assert st["output_drops"]["r/slow-display"] in (8, 9)
    assert st["counters"]["display_errors"] == 10  # the failing display: logged, counted, skipped
    assert len(list((tmp_path / "out" / "r").glob("*.npy"))) == 10


def test_unwritable_output_stops_cleanly_with_recording_intact(tmp_path):
    (tmp_path / "out").write_text("a file where the output folder should be")
    rng = np.random.default_rng(3)
    svc = Service(config(tmp_path), stage_factory=scale_stages).start()
    msgs = [start_msg("r", SHAPE[0], SHAPE[1:])] + stack_frames("r", 0, rng.integers(0, 9, SHAPE, np.uint16), None, 1)
    with pusher(svc.ingest_endpoint) as sock:
        send_all(sock, msgs)
    assert wait_for(lambda: svc.error is not None, 20)
    svc.wait(10)
    assert "output 'npy' failed at setup" in str(svc.error)
    assert svc.final_summary["stopped_by_error"]
    with RecordingReader(tmp_path / "rec") as rec:
        assert len(rec) == len(msgs) and rec.torn_data_bytes == 0
        assert [bytes(p) for p in rec.read(3)] == [bytes(memoryview(p).cast("B")) for p in msgs[3]]


def test_stage_worker_runs_numpy_and_torch_stages_and_times_them():
    import torch

    seen = {}
    w = StageWorker([Stage("np", lambda a: a + 1), Stage("t", lambda x: (x * 2).to(torch.float64), kind="torch")],
                    device="cpu", observe=lambda n, s: seen.setdefault(n, []).append(s))
    (tok, out), = w.submit(np.ones((2, 2), np.float32), "s0")
    assert tok == "s0" and out.dtype == np.float64 and (out == 4).all()
    assert set(seen) == {"np", "t"}
    bad = StageWorker([Stage("boom", lambda a: a.reshape(7))])
    with pytest.raises(PipelineError, match="stage 'boom' failed on s1"):
        bad.submit(np.ones(3), "s1")


@pytest.mark.gpu
def test_stage_worker_overlaps_on_cuda_and_matches_cpu():
    import torch

    stages = [Stage("t", lambda x: torch.sqrt(x.float() + 1), kind="torch")]
    cpu, gpu = StageWorker(stages, device="cpu"), StageWorker(stages, device="cuda", depth=2)
    data = [np.random.default_rng(i).random((8, 64, 64), dtype=np.float32) for i in range(5)]
    want = [cpu.submit(d, i)[0][1] for i, d in enumerate(data)]
    got = []
    for i, d in enumerate(data):
        got += gpu.submit(d, i)
    got += gpu.drain()
    assert [t for t, _ in got] == list(range(5))
    for (_, g), w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-6)


def test_status_cli_and_json_logs(tmp_path, capsys):
    import json
    import logging

    from streamer.cli import main
    from streamer.cli.serve_cmd import JsonFormatter

    with Service(config(tmp_path), stage_factory=scale_stages) as svc:
        assert main(["status", "--control", svc.control_endpoint]) == 0
        text = capsys.readouterr().out
        assert "state: running" in text and "queues: recorded=0" in text
        assert main(["status", "--control", svc.control_endpoint, "--stop"]) == 0
        assert json.loads(capsys.readouterr().out)["stopping"] is True
        assert svc.wait(10)
    assert main(["status", "--control", "tcp://127.0.0.1:1", "--timeout", "0.2"]) == 2
    assert "no rllsm service answered on tcp://127.0.0.1:1" in capsys.readouterr().err
    rec = logging.LogRecord("streamer.x", logging.WARNING, __file__, 1, "stack %s incomplete", ("t=3",), None)
    doc = json.loads(JsonFormatter().format(rec))
    assert doc["level"] == "WARNING" and doc["message"] == "stack t=3 incomplete" and doc["time"].endswith("Z")


def test_unbuildable_reconstruction_is_reported_per_stack_and_recording_goes_on(tmp_path):
    def no_weights(start):
        raise ValueError("mode 'full' needs weights (--weights DIR)")

    rng = np.random.default_rng(4)
    with Service(config(tmp_path), stage_factory=no_weights) as svc:
        msgs = [start_msg("r", SHAPE[0], SHAPE[1:])]
        for t in range(2):
            msgs += stack_frames("r", t, rng.integers(0, 9, SHAPE, np.uint16), None, len(msgs))
        with pusher(svc.ingest_endpoint) as sock:
            send_all(sock, msgs)
        assert wait_for(lambda: svc.metrics.counter("stage_errors") == 2, 10)
        st = svc.status()
    assert st["state"] == "running" and st["counters"]["messages_received"] == len(msgs)
    assert "cannot build the reconstruction for r: ValueError: mode 'full' needs weights" in st["errors"]["last"][-1]


def test_fused_volumes_reach_a_real_display_client(tmp_path):
    from streamer.display import DisplayClient

    rng = np.random.default_rng(5)
    cfg = config(tmp_path, display="tcp://127.0.0.1:0")
    with Service(cfg, stage_factory=scale_stages) as svc, \
            DisplayClient(svc.display_endpoint, kinds=("mip",)) as viewer:
        with pusher(svc.ingest_endpoint) as sock:
            send_all(sock, [start_msg("v", SHAPE[0], SHAPE[1:])])
            got, t = None, 0
            while got is None and t < 50:  # a subscription takes a moment to reach the publisher: keep streaming
                stack = rng.integers(0, 4000, SHAPE, dtype=np.uint16)
                send_all(sock, stack_frames("v", t, stack, rng, 1 + t * SHAPE[0]))
                got = viewer.latest_mips(timeout=1.0)
                t += 1
    assert got is not None
    m = got["z"]
    k = m.header.timepoint
    want = (np.load(tmp_path / "out" / "v" / f"t{k:05d}_c0.npy")).max(axis=0)
    np.testing.assert_array_equal(m.array, want)


def test_stack_of_another_size_mid_acquisition_is_refused_not_fatal(tmp_path):
    rng = np.random.default_rng(6)
    with Service(config(tmp_path), stage_factory=scale_stages) as svc:
        msgs = [start_msg("r", SHAPE[0], SHAPE[1:])]
        msgs += stack_frames("r", 0, rng.integers(0, 9, SHAPE, np.uint16), None, 1)
        msgs += stack_frames("r", 1, rng.integers(0, 9, (SHAPE[0], 8, 8), np.uint16), None, 20)
        msgs += stack_frames("r", 2, rng.integers(0, 9, SHAPE, np.uint16), None, 40)
        with pusher(svc.ingest_endpoint) as sock:
            send_all(sock, msgs)
        assert wait_for(lambda: svc.metrics.counter("volumes_output") == 2, 10)
        assert wait_for(lambda: svc.metrics.counter("stage_errors") == 1, 10)
        assert svc.status()["state"] == "running"
    note = (tmp_path / "out" / "r" / "t00001_c0.skipped.txt").read_text()
    assert "volume is 6×8×8 float32, but this acquisition's output was set up for 6×16×12 float32" in note


def test_build_stages_modes_and_memory_budget():
    from engines.config import OpticsConfig
    from streamer.pipeline import build_stages, default_budget_mib

    assert build_stages("none", OpticsConfig()) == []
    (st,) = build_stages("deskew", OpticsConfig(), device="cpu")
    out = st.fn(np.ones((4, 8, 10), np.uint16))
    assert st.name == "deskew" and out.shape[0] == 4 and out.shape[2] > 10
    names = [s.name for s in build_stages("classical", OpticsConfig(), device="cpu")]
    assert names == ["preprocess", "split_views", "fuse"]
    with pytest.raises(ValueError):
        build_stages("turbo", OpticsConfig())
    assert 512 <= default_budget_mib("cpu") <= 16384  # MiB, the one unit of budgets


def test_failed_start_releases_the_recording_and_the_ports(tmp_path):
    # A start that fails after opening the recording (here: a missing key folder) must let go of it: the lock on
    # the recording, the done.log handle and the sockets, so that a corrected start on the same folder works.
    from streamer.security import SecurityError

    bad = Service(config(tmp_path, keys=tmp_path / "no-such-keys"), stage_factory=scale_stages)
    with pytest.raises(SecurityError, match="no server key"):
        bad.start()
    assert bad.recording is not None and bad.recording._data_fd == -1
    assert bad.processor is not None and not bad.processor.ledger.is_open
    with Service(config(tmp_path), stage_factory=scale_stages) as svc:
        assert svc.status()["state"] == "running"


@pytest.mark.parametrize("output_format", ["tiff", "npy"])
def test_stack_outside_the_announced_channels_or_timepoints_is_rejected_not_fatal(tmp_path, output_format):
    # The OME writers refuse a channel or timepoint the acquisition did not announce; such a stack from a confused
    # sender must be rejected and counted, not stop the service through its critical disk output.
    rng = np.random.default_rng(8)
    with Service(config(tmp_path, output_format=output_format), stage_factory=scale_stages) as svc:
        msgs = [start_msg("r", SHAPE[0], SHAPE[1:], n_timepoints=2)]
        msgs += stack_frames("r", 0, rng.integers(0, 9, SHAPE, np.uint16), None, 1)
        msgs += stack_frames("r", 0, rng.integers(0, 9, SHAPE, np.uint16), None, 10, channel=3)
        msgs += stack_frames("r", 5, rng.integers(0, 9, SHAPE, np.uint16), None, 20)
        msgs += stack_frames("r", 1, rng.integers(0, 9, SHAPE, np.uint16), None, 30)
        with pusher(svc.ingest_endpoint) as sock:
            send_all(sock, msgs)
        assert wait_for(lambda: svc.metrics.counter("volumes_output") == 2, 10)
        assert wait_for(lambda: svc.status()["errors"]["by_type"].get("StackOutOfRange") == 2, 10)
        status = svc.status()
        assert status["state"] == "running"
    assert any("r t=0 c=3: channel 3, but the acquisition announced 1 channel" in e for e in status["errors"]["last"])
    assert any("r t=5 c=0: timepoint 5, but the acquisition announced 2 timepoints" in e
               for e in status["errors"]["last"])


def test_stop_while_a_batch_is_being_recorded_still_processes_it(tmp_path):
    # The processor may only finish once the ingest thread has published its last batch; before, a stop that came
    # while a batch was being written left it recorded but never processed in this run.
    import threading

    rng = np.random.default_rng(9)
    svc = Service(config(tmp_path), stage_factory=scale_stages).start()
    rec = svc.recording
    write, entered, release = rec.append_many, threading.Event(), threading.Event()

    def slow_append_many(*args, **kw):  # the real write, then a disk that takes its time to return
        first = write(*args, **kw)
        entered.set()
        release.wait(20)
        return first

    rec.append_many = slow_append_many
    msgs = [start_msg("r", SHAPE[0], SHAPE[1:])] + stack_frames("r", 0, rng.integers(0, 9, SHAPE, np.uint16), None, 1)
    with pusher(svc.ingest_endpoint) as sock:
        send_all(sock, msgs)
    assert entered.wait(20)
    svc._stop.set()  # a stop request arrives while the batch is being written
    processor = svc._threads[1]
    assert not wait_for(lambda: not processor.is_alive(), 1.0)  # it waits for the batch instead of finishing
    release.set()
    summary = svc.stop(20)
    assert summary["counters"]["messages_processed"] == len(rec) == svc.metrics.counter("messages_received")


def test_stage_returning_no_volume_is_a_stage_error_not_fatal(tmp_path):
    # A chain that returns a 2D array for some stacks cannot describe an output; each such stack is skipped and
    # counted, the service goes on (it used to stop on the SinkSetupError from describing the output).
    def stages(start):
        return [Stage("sometimes_2d", lambda a: a[0] if a[0, 0, 0] == 7 else a.astype(np.float32))]

    rng = np.random.default_rng(10)
    bad = rng.integers(0, 5, SHAPE, np.uint16)
    bad[0, 0, 0] = 7
    with Service(config(tmp_path), stage_factory=stages) as svc:
        msgs = [start_msg("r", SHAPE[0], SHAPE[1:])] + stack_frames("r", 0, bad, None, 1)
        msgs += stack_frames("r", 1, rng.integers(0, 5, SHAPE, np.uint16), None, 10)
        with pusher(svc.ingest_endpoint) as sock:
            send_all(sock, msgs)
        assert wait_for(lambda: svc.metrics.counter("volumes_output") == 1, 10)
        assert svc.metrics.counter("stage_errors") == 1
        assert svc.status()["state"] == "running"
    assert svc.final_summary["stopped_by_error"] is None
    assert any("r t=0 c=0: the reconstruction returned a 2D array 16×12, not a (z, y, x) volume" in e
               for e in svc.processor.last_errors)
