"""Fuzz a real ``rllsm serve`` on loopback, then restart it on the recording and replay that offline.

Messages (random and structured, reproducible from ``--seed``): random bytes; headers nested hundreds to a hundred
thousand levels deep; extreme integers (2^62, 2^63, 10^30, negatives) in every integer field; lone UTF-16 surrogates
and control characters in every text; ``true``/``"5"``/``5.5`` where numbers belong; oversized ids and metadata;
wrong part counts and payload sizes; valid-but-extreme messages (65,536-plane stacks of 1×1 frames, the last
allowed timepoint of an open-ended acquisition, 16 channels) — interleaved with whole, valid acquisitions whose
volumes must come out.

Checks: the service never stops (polled throughout), answers ``status`` with a bounded reply, outputs every valid
stack, stops with exit 0; a restart on the same recording comes up, skips what is done, and stops with exit 0; an
offline replay of the recording exits 0 without a traceback. Prints one JSON line of figures.

    python scripts/fuzz_serve.py --messages 10000 --format zarr
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from resource_probe import Served, rss_mb, threads  # noqa: E402
from streamer import wire  # noqa: E402

SHAPE = (4, 8, 8)
_INT_FIELDS = ["seq", "timepoint", "channel", "z_index", "z_count", "n_timepoints", "n_messages", "version"]
_TEXT_FIELDS = ["acquisition_id", "dtype", "byte_order", "checksum", "kind", "reason"]
_EXTREME_INTS = [2**62, 2**63, 2**64 + 1, 10**30, -1, -(2**63), 10**300, wire.MAX_TIMEPOINTS, wire.MAX_DIM + 1]
_BAD_TEXT = ["\ud800", "a\udfffb", "\x00", "x" * 5000, "", "😀" * 100, "\u202e"]
_BAD_TYPES = [True, False, "5", 5.5, None, [], {}, [1, 2], "1e3"]


def _doc(kind: str) -> dict[str, Any]:
    base: dict[str, Any] = {"acquisition_id": "fz", "seq": 1}
    if kind == "acquisition_start":
        return {**base, "kind": kind, "z_count": 4, "frame_shape": [8, 8], "channels": ["488"], "metadata": {}}
    if kind == "frame":
        return {**base, "kind": kind, "timepoint": 0, "z_index": 0, "z_count": 4, "shape": [8, 8], "dtype": "uint16"}
    if kind == "stack":
        return {**base, "kind": kind, "timepoint": 0, "shape": list(SHAPE), "dtype": "uint16"}
    return {**base, "kind": kind, "n_messages": 3}


def _nested(depth: int, rng: random.Random) -> bytes:
    o, c = (b"[", b"]") if rng.random() < 0.5 else (b'{"a":', b"}")
    return b'{"kind":"acquisition_start","acquisition_id":"fz","seq":0,"metadata":' + o * depth + b"0" + c * depth + b"}"


def hostile(rng: random.Random) -> list[bytes]:
    """One hostile message."""
    k = rng.randrange(9)
    kind = rng.choice(["acquisition_start", "frame", "stack", "acquisition_end"])
    doc = _doc(kind)
    payload = bytes(int(np.prod(doc.get("shape", [0]))) * 2) if kind in ("frame", "stack") else None
    if k == 0:
        return [rng.randbytes(rng.randrange(0, 300))] + [rng.randbytes(8)] * rng.randrange(0, 3)
    if k == 1:
        return [_nested(rng.choice([33, 200, 1000, 5000, 100_000]), rng)]
    if k == 2:
        doc[rng.choice(_INT_FIELDS)] = rng.choice(_EXTREME_INTS)
    elif k == 3:
        field = rng.choice(_TEXT_FIELDS + (["channels"] if kind == "acquisition_start" else []))
        doc[field] = [rng.choice(_BAD_TEXT)] if field == "channels" else rng.choice(_BAD_TEXT)
    elif k == 4:
        doc[rng.choice(_INT_FIELDS + ["sent_at", "shape", "frame_shape"])] = rng.choice(_BAD_TYPES)
    elif k == 5:
        doc["metadata"] = {"blob": "x" * rng.choice([70_000, 300_000])}
    elif k == 6:
        raw = json.dumps(doc).encode().replace(b'"seq": 1', b'"seq": NaN')
        return [raw] + ([payload] if payload is not None else [])
    elif k == 7:  # wrong parts or payload size
        parts = [json.dumps(doc).encode()]
        return parts + [bytes(rng.randrange(0, 64))] * rng.randrange(0, 4)
    else:  # valid but extreme (different acquisitions, so they do not clash with the valid ones)
        acq = f"x{rng.randrange(1000)}"
        choice = rng.randrange(3)
        if choice == 0:
            h = wire.pixels_header(np.zeros((1, 1), np.uint8), acquisition_id=acq, seq=0,
                                   timepoint=rng.randrange(wire.MAX_TIMEPOINTS), z_index=0, z_count=wire.MAX_DIM)
            return wire.encode(h, np.zeros((1, 1), np.uint8))
        if choice == 1:
            s = np.ones(SHAPE, np.uint16)
            h = wire.pixels_header(s, acquisition_id=acq, seq=0, timepoint=wire.MAX_TIMEPOINTS - 1)
            return wire.encode(h, s)
        st = wire.AcquisitionStart(acquisition_id=acq, seq=0, z_count=4, frame_shape=(8, 8),
                                   channels=tuple(f"c{i}" for i in range(wire.MAX_CHANNELS)),
                                   n_timepoints=wire.MAX_TIMEPOINTS, metadata={"k": "v" * 60_000})
        return wire.encode(st)
    return [json.dumps(doc).encode()] + ([payload] if payload is not None else [])


def valid_acquisition(i: int) -> tuple[list[list[Any]], int]:
    acq = f"ok{i}"
    msgs = [wire.encode(wire.AcquisitionStart(acquisition_id=acq, seq=0, z_count=SHAPE[0], frame_shape=SHAPE[1:]))]
    for t in range(2):
        s = np.full(SHAPE, 10 * i + t, np.uint16)
        msgs.append(wire.encode(wire.pixels_header(s, acquisition_id=acq, seq=len(msgs), timepoint=t), s))
    msgs.append(wire.encode(wire.AcquisitionEnd(acquisition_id=acq, seq=len(msgs), n_messages=len(msgs))))
    return msgs, 2


def run(workdir: Path, n_messages: int, seed: int = 0, fmt: str = "npy") -> dict[str, Any]:
    rng = random.Random(seed)
    svc = Served(workdir, "--format", fmt, mode="none")
    figures: dict[str, Any] = {"messages": 0, "format": fmt, "seed": seed}
    try:
        base_rss, base_threads = rss_mb(svc.proc.pid), threads(svc.proc.pid)
        svc.reset_peaks()
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 10_000)
        sock.setsockopt(zmq.SNDTIMEO, 30_000)
        sock.connect(svc.endpoints["ingest"])
        n_valid = n_volumes = 0
        sent = 0
        while sent < n_messages:
            if rng.random() < 0.01:
                msgs, nv = valid_acquisition(n_valid)
                n_valid += 1
                n_volumes += nv
            else:
                msgs = [hostile(rng)]
            for m in msgs:
                sock.send_multipart(m)
                sent += 1
            if sent % 1000 < len(msgs):  # alive and answering, all along
                assert svc.proc.poll() is None, f"service stopped after {sent} messages"
                assert svc.status_bytes() < 100_000
        sock.close()
        t0 = time.monotonic()
        while not svc.caught_up(sent):
            assert svc.proc.poll() is None, "service stopped"
            assert time.monotonic() - t0 < 300, "service did not catch up"
            time.sleep(0.2)
        st = svc.status()
        figures.update(messages=sent, valid_acquisitions=n_valid, status_bytes=svc.status_bytes(),
                       rejected=st["counters"].get("messages_rejected", 0),
                       quarantined=st.get("quarantined_total", 0), rss_before_mb=round(base_rss),
                       rss_after_mb=round(rss_mb(svc.proc.pid)), rss_peak_mb=round(svc.peak_rss),
                       threads_before=base_threads, threads_peak=int(svc.peak_threads))
        assert st["state"] == "running"
        code, _ = svc.stop(120)
        assert code == 0, f"serve exited {code}: {(workdir / 'serve.log').read_text()[-2000:]}"
        figures["summary_bytes"] = (workdir / "rec" / "summary.json").stat().st_size
        ok_dirs = [workdir / "out" / f"ok{i}" for i in range(n_valid)]
        if fmt == "npy":
            got = sum(len(list(d.glob("t*_c0.npy"))) for d in ok_dirs)
            assert got == n_volumes, f"{got} of {n_volumes} valid volumes written"
        figures["valid_volumes"] = n_volumes
    finally:
        svc.kill()
    # restart on the same recording: it comes up, skips what is done, and stops cleanly
    svc2 = Served(workdir, "--format", fmt, mode="none")
    try:
        t0 = time.monotonic()
        while not svc2.caught_up(0):
            assert svc2.proc.poll() is None, "restarted service stopped"
            assert time.monotonic() - t0 < 300
            time.sleep(0.2)
        code, _ = svc2.stop(120)
        assert code == 0, f"restarted serve exited {code}"
    finally:
        svc2.kill()
    figures["restart_exit"] = 0
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "streamer", "replay", str(workdir / "rec"), "--offline", "--out",
                           str(workdir / "offline"), "--mode", "none"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    figures["offline_replay_exit"] = proc.returncode
    figures["offline_replay_s"] = round(time.monotonic() - t0, 1)
    return figures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--format", choices=["npy", "zarr", "tiff"], default="npy")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rllsm-fuzz-") as d:
        print(json.dumps(run(Path(d), args.messages, args.seed, args.format)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
