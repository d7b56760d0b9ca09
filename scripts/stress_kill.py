"""Kill the service with SIGKILL at random moments while a sender streams; check nothing received is lost.

Each run (loopback only):

1. start ``rllsm serve`` as a subprocess (``--mode none``: the volume is the assembled raw stack, so every output
   can be compared with what was sent), with a fresh recording and output folder;
2. stream an acquisition of small stacks as out-of-order frames from a sender thread;
3. once the service has received a random number of messages, ``kill -9`` it;
4. read the recording as the killed process left it: every *whole* stack in it must come out after restart;
5. restart on the same recording (the torn tail is cut, finished stacks skipped, the rest reprocessed), send a few
   more stacks and the end of the acquisition, stop it through the control socket;
6. check: every stack the recording holds completely is output and equals what was sent; every partial one is
   reported as skipped with its missing planes; the stacks sent after the restart are output too; and no stack was
   output twice (``done.log`` holds each stack once across both runs: a restart rewrote nothing already written).

``--phase processing`` kills instead while the service is *processing* (everything received, volumes still being
deskewed: ``--mode deskew``, whose outputs are checked for presence and count rather than equality).

    python scripts/stress_kill.py --runs 20
    python scripts/stress_kill.py --runs 20 --phase processing
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from streamer import wire  # noqa: E402
from streamer.recording import RecordingReader  # noqa: E402
from streamer.service import request  # noqa: E402

Z, Y, X = 6, 24, 32
SHAPES = {"ingest": (Z, Y, X), "processing": (16, 96, 128)}  # bigger for processing: the kill must land mid-way
ACQ = "stress"


def stack_for(t: int, shape: tuple[int, int, int] = (Z, Y, X)) -> np.ndarray:
    """The stack of timepoint t (reproducible, so outputs can be checked without keeping what was sent)."""
    return np.random.default_rng(1000 + t).integers(0, 4000, shape, dtype=np.uint16)


def frames(t: int, rng: random.Random, seq0: int, shape: tuple[int, int, int] = (Z, Y, X)) -> list[list[Any]]:
    s = stack_for(t, shape)
    zs = list(range(s.shape[0]))
    rng.shuffle(zs)
    out = []
    for k, z in enumerate(zs):
        h = wire.pixels_header(s[z], acquisition_id=ACQ, seq=seq0 + k, timepoint=t, z_index=z, z_count=s.shape[0])
        out.append(wire.encode(h, s[z]))
    return out


def start_service(rec: Path, out: Path, log: Path, mode: str = "none") -> tuple[subprocess.Popen, dict[str, str]]:
    cmd = [sys.executable, "-m", "streamer", "serve", "--ingest", "tcp://127.0.0.1:0", "--control",
           "tcp://127.0.0.1:0", "--display", "tcp://127.0.0.1:0", "-r", str(rec), "--out", str(out), "--format", "npy",
           "--mode", mode, "--device", "cpu", "--stack-timeout", "30"]
    with open(log, "ab") as err:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the service prints its endpoints once bound
    if not line:
        proc.wait(10)
        raise RuntimeError(f"service did not start (exit {proc.returncode}); see {log}")
    return proc, json.loads(line)


def _sender(endpoint: str, msgs: list[list[Any]], stop: threading.Event, sent: list[int]) -> None:
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDHWM, 50)
    s.connect(endpoint)
    try:
        for m in msgs:
            # paced (~300 frames/s) so that the kill lands anywhere in the stream, not only after its end
            if stop.wait(0.003):
                return
            while not stop.is_set():
                try:
                    s.send_multipart(m, flags=zmq.NOBLOCK, copy=False)
                    sent[0] += 1
                    break
                except zmq.Again:
                    stop.wait(0.001)
            if stop.is_set():
                return
    finally:
        # a sender that finished lets its last messages go out (linger); one stopped by the kill drops them
        s.close(0 if stop.is_set() else 5000)


def recorded_stacks(rec: Path) -> tuple[dict[int, set[int]], int]:
    """Planes of each timepoint present in the recording (as the killed process left it), and its length."""
    have: dict[int, set[int]] = {}
    with RecordingReader(rec) as r:
        for i in range(len(r)):
            h = wire.decode_header(r.header(i))
            if isinstance(h, wire.Frame):
                have.setdefault(h.timepoint, set()).add(h.z_index)
        return have, len(r)


def wait_until(pred: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return bool(pred())


def done_counts(rec: Path) -> dict[tuple[str, int, int], int]:
    """How often each stack was marked done (written) across every run on this recording."""
    counts: dict[tuple[str, int, int], int] = {}
    path = rec / "done.log"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                acq, t, c, _ = json.loads(line)
            except ValueError:
                continue  # a torn last line
            counts[(acq, t, c)] = counts.get((acq, t, c), 0) + 1
    return counts


def run_once(seed: int, workdir: Path, n_stacks: int = 60, n_after: int = 3, phase: str = "ingest") -> dict[str, Any]:
    """One kill-and-restart cycle; raises AssertionError with the details if anything was lost or written twice."""
    rng = random.Random(seed)
    rec, out, log = workdir / "rec", workdir / "out", workdir / "service.log"
    mode = "deskew" if phase == "processing" else "none"
    shape = SHAPES[phase]
    z = shape[0]
    proc, ep = start_service(rec, out, log, mode)
    msgs = [wire.encode(wire.AcquisitionStart(acquisition_id=ACQ, seq=0, z_count=z, frame_shape=shape[1:]))]
    for t in range(n_stacks):
        msgs += frames(t, rng, len(msgs), shape)
    kill_after = rng.randint(1, len(msgs) - 1)
    stop, sent = threading.Event(), [0]
    th = threading.Thread(target=_sender, args=(ep["ingest"], msgs, stop, sent), daemon=True)
    th.start()
    try:
        seen = [0]

        def received() -> int:
            try:
                seen[0] = int(request(ep["control"], "status", timeout_s=2)["counters"]["messages_received"])
            except Exception:
                return -1
            return seen[0]

        if phase == "processing":  # everything received; kill after a random number of volumes is written
            kill_after = len(msgs)
            kill_at_volume = rng.randint(1, n_stacks - 1)

            def written() -> int:
                try:
                    return int(request(ep["control"], "status", timeout_s=2)["counters"].get("volumes_output", 0))
                except Exception:
                    return -1

            wait_until(lambda: received() >= kill_after, 60)
            wait_until(lambda: written() >= kill_at_volume, 120)
        else:
            wait_until(lambda: received() >= kill_after, 60)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        stop.set()
        th.join(10)
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    have, n_records = recorded_stacks(rec)
    n_done_before = len(done_counts(rec))
    # a message the service reported as received was in the recording before it was counted
    assert n_records >= seen[0], f"seed {seed}: status said {seen[0]} received, recording holds {n_records}"
    whole = sorted(t for t, zs in have.items() if len(zs) == z)
    partial = sorted(t for t, zs in have.items() if len(zs) < z)

    proc, ep = start_service(rec, out, log, mode)
    try:
        more = []
        base = n_stacks + 10
        for k in range(n_after):
            more += frames(base + k, rng, 10_000 + k * z, shape)
        more.append(wire.encode(wire.AcquisitionEnd(acquisition_id=ACQ, seq=99_999, n_messages=0)))
        ctx = zmq.Context.instance()
        s = ctx.socket(zmq.PUSH)
        s.setsockopt(zmq.LINGER, 5000)
        s.connect(ep["ingest"])
        for m in more:
            s.send_multipart(m, copy=False)
        s.close()
        acq_dir = out / ACQ
        expect_npy = set(whole) | {base + k for k in range(n_after)}

        def finished() -> bool:
            try:
                st = request(ep["control"], "status", timeout_s=2)
            except Exception:
                return False
            done = {int(p.name[1:6]) for p in acq_dir.glob("t*_c0.npy")} if acq_dir.exists() else set()
            return st["queues"]["backlog"] == 0 and expect_npy <= done

        ok = wait_until(finished, 180)
        request(ep["control"], "stop", timeout_s=5)
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    assert ok, f"seed {seed}: not every recorded stack was output after restart (see {log})"
    assert rc == 0, f"seed {seed}: restarted service exited with {rc} (see {log})"
    for t in sorted(expect_npy):
        got = np.load(acq_dir / f"t{t:05d}_c0.npy")
        if mode == "none":
            assert np.array_equal(got, stack_for(t, shape)), f"seed {seed}: stack t={t} differs from what was sent"
    counts = done_counts(rec)
    twice = sorted(k for k, n in counts.items() if n > 1)
    assert not twice, f"seed {seed}: stacks written twice (marked done in both runs): {twice}"
    missing = sorted(t for t in expect_npy if counts.get((ACQ, t, 0), 0) != 1)
    assert not missing, f"seed {seed}: stacks output but not marked done exactly once: {missing}"
    for t in partial:
        note = acq_dir / f"t{t:05d}_c0.skipped.txt"
        assert note.exists(), f"seed {seed}: partial stack t={t} ({len(have[t])}/{z} planes) not reported"
    return {"seed": seed, "phase": phase, "killed_after_messages": kill_after, "recorded": n_records,
            "whole": len(whole), "partial": len(partial), "sent_before_kill": sent[0],
            "done_before_kill": n_done_before, "written_twice": len(twice)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stacks", type=int, default=60)
    ap.add_argument("--phase", choices=["ingest", "processing"], default="ingest",
                    help="kill while receiving (default) or while reconstructing what was received")
    args = ap.parse_args(argv)
    failures = 0
    for k in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="rllsm-kill-") as d:
            try:
                r = run_once(args.seed + k, Path(d), n_stacks=args.stacks, phase=args.phase)
                print(json.dumps(r), flush=True)
            except AssertionError as err:
                failures += 1
                print(f"FAIL: {err}", flush=True)
                print((Path(d) / "service.log").read_text()[-3000:], flush=True)
    print(f"{args.runs - failures}/{args.runs} runs ({args.phase}): nothing recorded was lost or written twice")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
