"""Reliability on loopback: kill -9 and restart, 10,000 fuzzed messages, a full disk. Bounded in count and time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamer import wire
from streamer.recording import RecordingReader
from streamer.service import Service, ServiceConfig, request, wait_for
from streaming_util import pusher, stack_frames, start_msg

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [101, 102, 103])
def test_kill_9_at_random_moment_loses_no_recorded_stack(tmp_path, seed):
    import stress_kill

    r = stress_kill.run_once(seed, tmp_path, n_stacks=30)
    assert r["recorded"] > 0 and r["whole"] + r["partial"] > 0 and r["written_twice"] == 0


@pytest.mark.slow
def test_kill_9_while_processing_writes_every_stack_exactly_once(tmp_path):
    import stress_kill

    r = stress_kill.run_once(7, tmp_path, n_stacks=20, phase="processing")
    assert r["whole"] == 20 and r["written_twice"] == 0


# --- fuzzing ------------------------------------------------------------------------------------------------------

_FRAME = wire.pixels_header(np.zeros((4, 4), np.uint16), acquisition_id="fz", seq=0, timepoint=0, z_index=0,
                            z_count=4)
_FRAME_DOC = json.loads(_FRAME.model_dump_json())
_BAD_FIELDS = {
    "timepoint": st.integers(max_value=-1), "z_index": st.integers(min_value=1 << 16),
    "dtype": st.sampled_from(["int64", "float16", "", "uint16 "]), "seq": st.sampled_from([-1, "x", None, 1.5]),
    "shape": st.sampled_from([[0, 4], [4], [4, 4, 4], [70000, 1], "4x4"]),
    "acquisition_id": st.sampled_from(["", "../etc", "a b", "x" * 200]), "byte_order": st.sampled_from(["?", "<<"]),
    "checksum": st.sampled_from(["md5:00", "crc32:XYZ", "crc32:123"]),
}


def _json(doc) -> bytes:
    return json.dumps(doc).encode()


@st.composite
def bad_message(draw) -> tuple[list[bytes], str]:
    """One malformed message and the error type it must be rejected with."""
    kind = draw(st.sampled_from(["bytes", "nonobject", "kind", "version", "field", "extra", "size", "checksum",
                                 "parts", "end_payload", "plane", "huge"]))
    payload = bytes(32)
    if kind == "bytes":
        return [b"\xff" + draw(st.binary(max_size=64))], "MalformedHeader"
    if kind == "nonobject":
        return [_json(draw(st.one_of(st.integers(), st.lists(st.integers(), max_size=3), st.text(max_size=8))))], \
            "MalformedHeader"
    if kind == "kind":
        k = draw(st.text(max_size=12).filter(lambda s: s not in wire.MODELS))
        return [_json({**_FRAME_DOC, "kind": k})], "UnknownKind"
    if kind == "version":
        return [_json({**_FRAME_DOC, "version": draw(st.integers().filter(lambda v: v != 1))}), payload], \
            "UnsupportedVersion"
    if kind == "field":
        name = draw(st.sampled_from(sorted(_BAD_FIELDS)))
        return [_json({**_FRAME_DOC, name: draw(_BAD_FIELDS[name])}), payload], "InvalidHeader"
    if kind == "extra":
        return [_json({**_FRAME_DOC, draw(st.sampled_from(["colour", "zz", "Kind"])): 1}), payload], "InvalidHeader"
    if kind == "size":
        n = draw(st.integers(0, 100).filter(lambda n: n != 32))
        return [_json({**_FRAME_DOC, "checksum": None}), bytes(n)], "PayloadSizeMismatch"
    if kind == "checksum":
        flip = draw(st.integers(0, 31))
        bad = bytearray(payload)
        bad[flip] ^= 1 << draw(st.integers(0, 7))
        return [_json({**_FRAME_DOC, "checksum": wire.checksum(payload)}), bytes(bad)], "ChecksumMismatch"
    if kind == "parts":
        n = draw(st.sampled_from([1, 3, 4, 100]))  # 100: more parts than a record holds, still just rejected
        return [_json({**_FRAME_DOC, "checksum": None})] + [payload] * (n - 1), "PartCountError"
    if kind == "end_payload":
        end = wire.AcquisitionEnd(acquisition_id="fz", seq=1, n_messages=1)
        return [end.model_dump_json().encode(), draw(st.binary(max_size=8))], "PartCountError"
    if kind == "huge":  # 4×4 planes, but ≥ 40,000 of them: more than the 1 MB per stack the test service allows
        return [_json({**_FRAME_DOC, "checksum": None, "z_count": draw(st.integers(40_000, 65_536))}), payload], \
            "StackTooLarge"
    doc = {**_FRAME_DOC, "checksum": None, "z_count": draw(st.integers(1, 4))}
    doc["z_index"] = draw(st.integers(doc["z_count"], 100))
    return [_json(doc), payload], "InconsistentFrame"


def test_ten_thousand_fuzzed_messages_rejected_counted_service_survives(tmp_path):
    messages: list[tuple[list[bytes], str]] = []

    @settings(max_examples=500, database=None, derandomize=True, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(bad_message(), min_size=20, max_size=20))
    def generate(batch):
        messages.extend(batch)

    generate()
    assert len(messages) >= 10_000
    expected: dict[str, int] = {}
    for _, err in messages:
        expected[err] = expected.get(err, 0) + 1
    cfg = ServiceConfig(ingest="tcp://127.0.0.1:0", control="tcp://127.0.0.1:0", recording=tmp_path / "rec",
                        mode="none", output=tmp_path / "out", output_format="npy", max_stack_gb=0.001)
    with Service(cfg) as svc:
        with pusher(svc.ingest_endpoint) as sock:
            for parts, _ in messages:  # pre-generated, sent in a tight loop
                sock.send_multipart(parts)
            good = np.arange(4 * 4 * 4, dtype=np.uint16).reshape(4, 4, 4)
            for m in [start_msg("ok", 4, (4, 4))] + stack_frames("ok", 0, good, None, 1):
                sock.send_multipart(m)
        assert wait_for(lambda: svc.metrics.counter("volumes_output") == 1, 60), svc.status()["queues"]
        status = request(svc.control_endpoint, "status")
    assert status["state"] == "running"
    assert status["counters"]["messages_received"] == len(messages) + 5
    assert status["counters"]["messages_rejected"] == len(messages)
    assert status["errors"]["by_type"] == expected
    assert all(": " in line and line.startswith("record ") for line in status["errors"]["last"])
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "ok" / "t00000_c0.npy"), good)


# --- disk full ----------------------------------------------------------------------------------------------------


def _limit_file_size() -> None:  # runs in the child: files may not grow past 300 kB ("disk full" for the recording)
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="file-size limits (RLIMIT_FSIZE) are POSIX-only")
def test_disk_full_stops_cleanly_and_keeps_the_recording(tmp_path):
    cmd = [sys.executable, "-m", "streamer", "serve", "--ingest", "tcp://127.0.0.1:0", "--control",
           "tcp://127.0.0.1:0", "--display", "tcp://127.0.0.1:0", "-r", str(tmp_path / "rec"), "--mode", "none"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_limit_file_size, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        ep = json.loads(proc.stdout.readline())
        rng = np.random.default_rng(0)
        ctx = zmq.Context()
        s = ctx.socket(zmq.PUSH)
        s.setsockopt(zmq.LINGER, 5000)  # queued messages must still go out after close; 0 would discard them
        s.connect(ep["ingest"])
        msgs = [start_msg("full", 8, (64, 64))]
        for t in range(20):  # 20 × 64 kB stacks: more than the 300 kB the "disk" holds
            msgs += stack_frames("full", t, rng.integers(0, 999, (8, 64, 64), dtype=np.uint16), None, len(msgs))
        for m in msgs:
            while proc.poll() is None:  # once the service has stopped on the full disk, the rest is moot
                try:
                    s.send_multipart(m, flags=zmq.NOBLOCK)
                    break
                except zmq.Again:
                    s.poll(50, zmq.POLLOUT)
            if proc.poll() is not None:
                break
        s.close()
        ctx.term()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err
    assert "cannot append record" in err and "File too large" in err and "everything received before it is kept" in err
    summary = json.loads(out.strip().splitlines()[-1])["summary"]
    with RecordingReader(tmp_path / "rec") as rec:
        assert rec.torn_data_bytes == 0 and rec.torn_entry_bytes == 0
        assert 0 < len(rec) == summary["counters"]["messages_received"]
        for i in range(len(rec)):
            wire.decode(rec.read(i))  # every kept record is a whole, valid message
    assert summary["stopped_by_error"]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_fuzzing_a_real_serve_never_stops_it_and_its_recording_restarts_and_replays(tmp_path):
    import fuzz_serve

    # deep nesting, extreme integers, lone surrogates, wrong types, oversized metadata, valid-but-extreme stacks;
    # the ≥10,000-message run is `python scripts/fuzz_serve.py` (docs/benchmarks/streaming.md)
    r = fuzz_serve.run(tmp_path, 1500, seed=3, fmt="zarr")
    assert r["messages"] >= 1500 and r["rejected"] > 1000 and r["valid_volumes"] > 0
    assert r["restart_exit"] == 0 and r["offline_replay_exit"] == 0
    assert r["status_bytes"] < 100_000 and r["summary_bytes"] < 200_000
