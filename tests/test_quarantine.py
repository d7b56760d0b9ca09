"""Quarantine and done-confirmation: what fails on one stack is set aside with its reason, on the live run, after a
restart and in an offline replay; a stack is marked done only once its writer has finished it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

from streamer.cli.status_cmd import format_status
from streamer.ledger import QUARANTINE_LOG, ResumeLedger
from streamer.metrics import Metrics
from streamer.pipeline import Stage
from streamer.processor import StackProcessor
from streamer.service import Service, ServiceConfig, wait_for
from streamer.sinks import ThreadedSink
from streamer.sinks.base import SinkStats, VolumeIndex
from streamer.sinks.npy_sink import NpyDirSink
from streaming_util import end_msg, pusher, send_all, stack_frames, start_msg

REPO = Path(__file__).resolve().parents[1]
SHAPE = (4, 8, 6)
POISON = 4321  # a stack holding this value makes the test stage fail


def poisoned_stages(calls: list[int]):
    def fail_on_poison(a: np.ndarray) -> np.ndarray:
        calls.append(int(a.max()))
        if (a == POISON).any():
            raise ValueError(f"cannot reconstruct a stack containing {POISON}")
        return a.astype(np.float32)

    return lambda start: [Stage("check", fail_on_poison)]


def stacks() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    out = [rng.integers(0, 1000, SHAPE, dtype=np.uint16) for _ in range(3)]
    out[1][2, 3, 4] = POISON
    return out


def messages(acq: str = "q") -> list[list]:
    msgs = [start_msg(acq, SHAPE[0], SHAPE[1:])]
    for t, s in enumerate(stacks()):
        msgs += stack_frames(acq, t, s, None, len(msgs))
    msgs.append(end_msg(acq, len(msgs), len(msgs)))
    return msgs


def config(tmp_path: Path, **kw) -> ServiceConfig:
    base = dict(ingest="tcp://127.0.0.1:0", control="tcp://127.0.0.1:0", recording=tmp_path / "rec",
                output=tmp_path / "out", output_format="npy", stack_timeout_s=30.0)
    return ServiceConfig(**{**base, **kw})


def test_failing_stack_is_quarantined_and_skipped_with_its_reason_after_restart_and_offline(tmp_path):
    calls: list[int] = []
    with Service(config(tmp_path), stage_factory=poisoned_stages(calls)) as svc:
        with pusher(svc.ingest_endpoint) as sock:
            send_all(sock, messages())
        assert wait_for(lambda: svc.processor.status().summary_of("q") is not None, 20)
        st = svc.status()
    assert st["state"] == "running" and st["quarantined_total"] == 1
    (q,) = st["quarantined"]
    assert q["stack"] == "q t=1 c=0" and f"containing {POISON}" in q["reason"]
    assert any("quarantined" in e for e in st["errors"]["last"])
    text = format_status(st)  # what `rllsm status` prints without --json
    assert "quarantined (1;" in text and "q t=1 c=0: " in text and f"containing {POISON}" in text
    assert "last errors:" in text
    out = tmp_path / "out" / "q"
    assert sorted(p.name for p in out.iterdir()) == ["t00000_c0.npy", "t00001_c0.skipped.txt", "t00002_c0.npy"]
    ledger = [json.loads(line) for line in (tmp_path / "rec" / QUARANTINE_LOG).read_text().splitlines()]
    assert ledger == [{"record": None, "acquisition": None, "stack": ["q", 1, 0], "reason": q["reason"]}]

    # restart on the same recording with the same (still failing) reconstruction: it does not trip again
    n_calls = len(calls)
    with Service(config(tmp_path), stage_factory=poisoned_stages(calls)) as svc2:
        assert wait_for(lambda: svc2.status()["queues"]["backlog"] == 0, 20)
        assert wait_for(lambda: svc2.processor.status().summary_of("q") is not None, 20)
        st2 = svc2.status()
    assert st2["state"] == "running" and st2["counters"]["quarantine_skipped"] == SHAPE[0]
    assert len(calls) == n_calls  # nothing was reprocessed: t=0 and t=2 are done, t=1 is quarantined
    assert st2["quarantined"] == st["quarantined"]

    # offline replay (another mode, whose stages would not fail): the quarantined stack is skipped, same reason
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "streamer", "replay", str(tmp_path / "rec"), "--offline", "--out",
                           str(tmp_path / "offline"), "--mode", "none"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["quarantined"] == st["quarantined"] and summary["counters"]["quarantine_skipped"] == SHAPE[0]
    names = sorted(p.name for p in (tmp_path / "offline" / "q").iterdir())
    assert names == ["t00000_c0.npy", "t00002_c0.npy"]
    np.testing.assert_array_equal(np.load(tmp_path / "offline" / "q" / "t00002_c0.npy"), stacks()[2])
    # the offline replay reads the live ledger, it never changes it
    assert len((tmp_path / "rec" / QUARANTINE_LOG).read_text().splitlines()) == 1


class PickySink:
    """A writer that cannot encode one particular volume (a value its format refuses), like a real codec might."""

    def __init__(self, directory: Path) -> None:
        self.inner = NpyDirSink(directory)
        self.name = self.inner.name

    @property
    def stats(self) -> SinkStats:
        return self.inner.stats

    def setup(self, meta) -> None:
        self.inner.setup(meta)

    def append(self, volume, index: VolumeIndex) -> None:
        if (volume == POISON).any():
            "\ud800".encode("utf-8")  # raises UnicodeEncodeError, as an OME-TIFF writer did on a bad name
        self.inner.append(volume, index)

    def skip(self, index, reason) -> None:
        self.inner.skip(index, reason)

    def close(self) -> None:
        self.inner.close()


def test_a_volume_the_writer_cannot_encode_is_quarantined_not_fatal(tmp_path):
    def sinks(meta):
        return [(ThreadedSink(PickySink(tmp_path / "out"), on_full="block", critical=True), True)]

    with Service(config(tmp_path, mode="none"), sink_factory=sinks) as svc:
        with pusher(svc.ingest_endpoint) as sock:
            send_all(sock, messages())
        assert wait_for(lambda: svc.processor.status().summary_of("q") is not None, 20)
        assert wait_for(lambda: svc.status()["quarantined_total"] == 1, 10)
        st = svc.status()
    assert st["state"] == "running" and svc.error is None
    assert "UnicodeEncodeError" in st["quarantined"][0]["reason"] and st["quarantined"][0]["stack"] == "q t=1 c=0"
    assert (tmp_path / "out" / "q" / "t00002_c0.npy").exists()
    done = {tuple(json.loads(line)[:3]) for line in (tmp_path / "rec" / "done.log").read_text().splitlines()}
    assert ("q", 0, 0) in done and ("q", 2, 0) in done


class GatedNpy(NpyDirSink):
    """A real .npy writer that waits at a gate before each write: a slow disk under the test's control."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.gate = threading.Event()

    def append(self, volume, index) -> None:
        assert self.gate.wait(30)
        super().append(volume, index)


def test_a_stack_is_marked_done_only_when_its_writer_finished(tmp_path):
    rec = tmp_path / "rec"
    gated = GatedNpy(tmp_path / "out")
    ledger = ResumeLedger(rec)
    proc = StackProcessor(lambda start: [], lambda meta: [(ThreadedSink(gated, on_full="block"), True)], Metrics(),
                          ledger=ledger)
    msgs = messages("d")
    for i, m in enumerate(msgs[:-1]):
        proc.handle(m, record=i)

    def done() -> list:
        return [json.loads(line) for line in (rec / "done.log").read_text().splitlines()]

    # all three stacks were handed over long ago; none is written yet, so none may be marked done
    assert proc.status().open_stacks == 0 and done() == []
    gated.gate.set()
    assert wait_for(lambda: len(done()) == 3, 10)
    assert sorted(d[1] for d in done()) == [0, 1, 2] and all(d[3] is True for d in done())
    proc.handle(msgs[-1], record=len(msgs) - 1)
    proc.finish()
    assert not ledger.is_open
    # a restart finds them done: their records are skipped by header
    again = StackProcessor(lambda start: [], lambda meta: [], Metrics(), ledger=ResumeLedger(rec))
    assert all(again.skip_if_done(m[0], record=i) for i, m in enumerate(msgs[1:-1], start=1))


def test_serve_prints_a_readable_summary_at_normal_verbosity(tmp_path):
    from resource_probe import Served

    svc = Served(tmp_path, "--format", "npy", mode="none")
    try:
        msgs = messages("v")
        with pusher(svc.endpoints["ingest"]) as sock:
            send_all(sock, msgs)
        assert wait_for(lambda: svc.caught_up(len(msgs)), 30)
        code, _ = svc.stop()
    finally:
        svc.kill()
    log = (tmp_path / "serve.log").read_text()
    assert code == 0
    assert "acquisition v closed (ended): 3 volumes output, 3 stacks complete, 0 incomplete" in log


def test_idle_acquisition_is_closed_and_reopened_by_its_next_message(tmp_path):
    rng = np.random.default_rng(5)
    s0, s1 = (rng.integers(0, 999, SHAPE, dtype=np.uint16) for _ in range(2))
    with Service(config(tmp_path, mode="none", acquisition_idle_s=0.5)) as svc:
        with pusher(svc.ingest_endpoint) as sock:
            send_all(sock, [start_msg("idle", SHAPE[0], SHAPE[1:])] + stack_frames("idle", 0, s0, None, 1))
            assert wait_for(lambda: svc.processor.status().summary_of("idle") is not None, 10)
            assert svc.processor.status().summary_of("idle")["closed"] == "idle"
            assert svc.metrics.counter("acquisitions_closed_idle") == 1
            assert svc.status()["queues"]["open_acquisitions"] == 0
            send_all(sock, stack_frames("idle", 1, s1, None, 1 + SHAPE[0]))  # the same acquisition goes on
            assert wait_for(lambda: svc.metrics.counter("volumes_output") == 2, 10)
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "idle" / "t00000_c0.npy"), s0)
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "idle" / "t00001_c0.npy"), s1)
