"""``rllsm simulate``: files that re-simulate bit for bit, and a real stream into a real PULL socket."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zmq

from engines.simulate import Microscope, make_sim_config
from streamer import wire
from streamer.cli import CLIError, main
from streamer.cli.simulate_cmd import stream_simulation

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[1]
SHAPE = (12, 32, 80)


def _receive_all(pull: zmq.Socket, deadline_s: float = 60.0) -> list[tuple[object, np.ndarray | None]]:
    """Decode (strict) every message until the AcquisitionEnd, waiting on the socket, never sleeping."""
    got = []
    poller = zmq.Poller()
    poller.register(pull, zmq.POLLIN)
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if not poller.poll(200):
            continue
        header, arr = wire.decode(pull.recv_multipart(copy=False), strict=True)
        got.append((header, None if arr is None else arr.copy()))
        if isinstance(header, wire.AcquisitionEnd):
            return got
    raise AssertionError(f"no AcquisitionEnd within {deadline_s} s; got {len(got)} messages")


@pytest.fixture()
def pull():
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.PULL)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    yield sock, f"tcp://127.0.0.1:{port}"
    sock.close(0)


def test_files_hold_raw_ground_truth_and_truthful_metadata(tmp_path: Path) -> None:
    out = tmp_path / "sim"
    rc = main(["simulate", "--out", str(out), "--timepoints", "2", "--shape", "40,48,160", "--structure", "beads",
               "--seed", "3", "--stage-step-um", "0.25"])
    assert rc == 0
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["optics"]["stage_step_um"] == 0.25 and meta["config"]["structure"] == "beads"
    assert meta["files"]["raw"] == ["raw_t0000.tif", "raw_t0001.tif"]
    mic = Microscope(make_sim_config(structure="beads", shape=(40, 48, 160),
                                     optics={**meta["optics"]}), seed=3)
    for t in range(2):
        raw = tifffile.imread(out / f"raw_t{t:04d}.tif")
        assert raw.dtype == np.uint16 and raw.shape == (40, 48, 160)
        assert np.array_equal(raw, mic.acquire(t).raw), "files must re-simulate exactly from their metadata"
        gt = tifffile.imread(out / f"ground_truth_t{t:04d}.tif")
        assert gt.shape == tuple(meta["deskewed_shape"]) and gt.dtype == np.float32
        beads = np.array(meta["beads"][str(t)]["deskewed_index"])
        # every bead's ground-truth mass sits in the voxels around its recorded position
        for p in beads:
            k, y, x = np.floor(p).astype(int)
            assert gt[k:k + 2, y:y + 2, x:x + 2].sum() == pytest.approx(meta["photon_scale"], rel=1e-4)
    assert meta["band"]["raw_column_per_plane"][0] == pytest.approx(meta["mirror"]["raw_column"])


def test_cli_stream_per_frame_is_a_well_formed_acquisition(pull) -> None:
    sock, endpoint = pull
    cmd = [sys.executable, "-m", "streamer", "simulate", "--connect", endpoint, "--timepoints", "2",
           "--shape", ",".join(map(str, SHAPE)), "--structure", "puncta", "--seed", "5", "--per-frame",
           "--checksum", "--rate", "50"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        msgs = _receive_all(sock)
    finally:
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    heads = [h for h, _ in msgs]
    start, end = heads[0], heads[-1]
    assert isinstance(start, wire.AcquisitionStart) and isinstance(end, wire.AcquisitionEnd)
    assert start.z_count == SHAPE[0] and start.frame_shape == SHAPE[1:] and start.n_timepoints == 2
    assert start.metadata["simulation"]["mirror"]["raw_column"] > 0
    frames = msgs[1:-1]
    assert len(frames) == 2 * SHAPE[0]
    assert [h.seq for h in heads] == list(range(len(heads)))
    assert end.n_messages == len(heads) - 1 and end.reason == "complete"
    assert len({h.acquisition_id for h in heads}) == 1
    mic = Microscope(make_sim_config(structure="puncta", shape=SHAPE), seed=5)
    for t in range(2):
        expect = mic.acquire(t, with_ground_truth=False).raw
        planes = [(h, a) for h, a in frames if h.timepoint == t]
        assert [h.z_index for h, _ in planes] == list(range(SHAPE[0]))
        assert all(h.checksum is not None for h, _ in planes)
        assert np.array_equal(np.stack([a for _, a in planes]), expect)
    assert "sent acquisition" in out


def test_stream_per_stack_from_the_function(pull) -> None:
    sock, endpoint = pull
    mic = Microscope(make_sim_config(structure="filaments", shape=SHAPE), seed=1)
    result: dict = {}
    th = threading.Thread(target=lambda: result.update(
        stream_simulation(mic, endpoint, 3, per_frame=False, acquisition_id="sim-test-1")))
    th.start()
    msgs = _receive_all(sock)
    th.join(60)
    stacks = [(h, a) for h, a in msgs if isinstance(h, wire.Stack)]
    assert [h.timepoint for h, _ in stacks] == [0, 1, 2]
    assert all(a.shape == SHAPE and a.dtype == np.uint16 for _, a in stacks)
    assert msgs[-1][0].n_messages == 4 and result == {"acquisition_id": "sim-test-1", "sent": 5, "dropped": 0,
                                                      "late": 0, "start_retries": 0}


def test_stream_with_the_non_blocking_sender(pull) -> None:
    sock, endpoint = pull
    mic = Microscope(make_sim_config(structure="puncta", shape=SHAPE), seed=2)
    result: dict = {}
    th = threading.Thread(target=lambda: result.update(
        stream_simulation(mic, endpoint, 1, per_frame=True, drop_when_busy=True)))
    th.start()
    msgs = _receive_all(sock)
    th.join(60)
    assert isinstance(msgs[0][0], wire.AcquisitionStart)
    frames = [h for h, _ in msgs if isinstance(h, wire.Frame)]
    # a receiver that keeps up loses nothing; whatever was dropped is counted and matches the gap
    assert len(frames) + result["dropped"] == SHAPE[0]
    # the sender numbers refused start attempts too: n_messages counts them
    assert msgs[-1][0].n_messages == SHAPE[0] + 1 + result["start_retries"]
    assert msgs[0][0].seq == result["start_retries"]


def test_nothing_listening_is_a_clear_error(capsys) -> None:
    ctx = zmq.Context.instance()
    probe = ctx.socket(zmq.PULL)
    port = probe.bind_to_random_port("tcp://127.0.0.1")
    probe.close(0)  # a port nobody listens on any more
    t0 = time.monotonic()
    rc = main(["simulate", "--connect", f"tcp://127.0.0.1:{port}", "--shape", "12,32,80", "--connect-timeout", "0.5"])
    assert rc == 2 and time.monotonic() - t0 < 30
    assert "nothing is listening" in capsys.readouterr().err


def test_bad_arguments_are_user_errors(tmp_path: Path, capsys) -> None:
    assert main(["simulate", "--out", str(tmp_path), "--shape", "12,abc,80"]) == 2
    assert "--shape must be three integers" in capsys.readouterr().err
    assert main(["simulate", "--out", str(tmp_path), "--timepoints", "0"]) == 2
    cfg = tmp_path / "sim.yaml"
    cfg.write_text("mirror_position: 2.0\n")
    assert main(["simulate", "--out", str(tmp_path), "--sim-config", str(cfg)]) == 2
    assert "mirror_position" in capsys.readouterr().err
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert main(["simulate", "--out", str(blocker / "sim"), "--shape", "12,32,80"]) == 2
    assert "cannot create the output folder" in capsys.readouterr().err
    with pytest.raises(CLIError):
        from streamer.cli.simulate_cmd import _parse_shape

        _parse_shape("1,2")


def test_sim_config_file_optics_merge_with_flags(tmp_path: Path) -> None:
    import argparse

    from streamer.cli.simulate_cmd import config_from_args, register

    cfg = tmp_path / "sim.yaml"
    cfg.write_text("structure: puncta\nshape: [12, 32, 80]\noptics:\n  stage_step_um: 0.3\n  na_detection: 1.0\n")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["simulate", "--out", str(tmp_path), "--sim-config", str(cfg), "--na-detection", "0.9"])
    sim = config_from_args(args)
    # the file's optics stand, a flag overrides only its own field
    assert sim.optics.stage_step_um == 0.3 and sim.optics.na_detection == 0.9
    assert sim.structure == "puncta" and sim.shape == (12, 32, 80)
