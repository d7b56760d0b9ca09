"""Send the hostile-input cases of the memory goal to a real ``rllsm serve`` and print RSS and thread figures.

Goal: any 100 MB of hostile input raises the service's RSS by less than 200 MB, and its thread count stays under a
fixed bound. Each case runs against a fresh ``rllsm serve --mode classical`` (loopback), measured from /proc:
RSS before, peak during, after the input is processed; threads before and at peak. One JSON line per case.

    python scripts/hostile_input.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from resource_probe import Served, rss_mb, threads  # noqa: E402
from streamer import wire  # noqa: E402
from streaming_util import pusher, send_all, stack_frames, start_msg  # noqa: E402


def _frames_65536() -> list[Any]:
    plane = np.zeros((1, 1), np.uint8)
    return [wire.encode(wire.pixels_header(plane, acquisition_id="deep", seq=t, timepoint=t, z_index=0,
                                           z_count=65_536), plane) for t in range(400)]


def _big_metadata() -> list[Any]:
    doc = json.loads(wire.AcquisitionStart(acquisition_id="m", seq=0, z_count=4, frame_shape=(8, 8)).model_dump_json())
    return [[json.dumps({**doc, "acquisition_id": f"m{i}", "metadata": {"blob": "x" * 1_000_000}}).encode()]
            for i in range(100)]


def _never_ending() -> list[Any]:
    msgs: list[Any] = []
    for i in range(40):
        msgs.append(start_msg(f"open{i}", 8, (32, 32)))
        msgs += stack_frames(f"open{i}", 0, np.full((8, 32, 32), 100 + i, np.uint16), None, 1)
    return msgs


def _tiny_stack() -> list[Any]:
    s = np.ones((4096, 2, 2), np.uint16)
    return [wire.encode(wire.pixels_header(s, acquisition_id="tiny", seq=0, timepoint=0), s)]


def _busy() -> list[Any]:
    rng = np.random.default_rng(0)
    busy = [start_msg("busy", 16, (128, 128))]  # real stacks first: the processor lags behind while the junk comes
    for t in range(6):
        busy += stack_frames("busy", t, rng.integers(0, 4000, (16, 128, 128), dtype=np.uint16), None, len(busy))
    return busy


def _junk_while_busy() -> list[Any]:
    junk = np.random.default_rng(1).integers(0, 255, 32 << 20, dtype=np.uint8).tobytes()
    return _busy() + [[json.dumps({"kind": "frame", "n": i}).encode(), junk] for i in range(40)]


CASES = {
    "400 one-byte frames declaring 65,536-plane stacks": (_frames_65536, "classical"),
    "400 one-byte frames declaring 65,536-plane stacks (mode none: assembled)": (_frames_65536, "none"),
    "100 acquisition_start with 1 MB metadata": (_big_metadata, "classical"),
    "40 never-ending acquisitions (OME-Zarr outputs)": (_never_ending, "none"),
    "one 32 KB stack message of 4096x2x2": (_tiny_stack, "classical"),
    "6 real stacks alone (the 'busy' of the next case, for comparison)": (_busy, "classical"),
    "40 junk 32 MB messages while busy": (_junk_while_busy, "classical"),
    "40 junk 32 MB messages while busy, --rcvhwm 8": (_junk_while_busy, "classical", "--rcvhwm", "8"),
}


def run_case(name: str, workdir: Path) -> dict[str, Any]:
    make, mode, *extra = CASES[name]
    msgs = make()
    nbytes = sum(sum(len(p) for p in m) for m in msgs)
    svc = Served(workdir, "--format", "zarr", *extra, mode=mode)
    try:
        time.sleep(1.0)
        before, t_before = rss_mb(svc.proc.pid), threads(svc.proc.pid)
        svc.reset_peaks()
        t0 = time.monotonic()
        with pusher(svc.endpoints["ingest"], timeout_s=120) as sock:
            send_all(sock, msgs)
        while not svc.caught_up(len(msgs)):
            assert svc.proc.poll() is None, "service stopped"
            time.sleep(0.1)
        secs = time.monotonic() - t0
        after = rss_mb(svc.proc.pid)
        st = svc.status()
        status_bytes = svc.status_bytes()
        code, _ = svc.stop(300)
        summary = (workdir / "rec" / "summary.json").stat().st_size
    finally:
        svc.kill()
    return {"case": name, "mode": mode, "messages": len(msgs), "input_mb": round(nbytes / 1e6, 1),
            "rss_before_mb": round(before), "rss_peak_mb": round(svc.peak_rss), "rss_after_mb": round(after),
            "threads_before": t_before, "threads_peak": int(svc.peak_threads), "seconds": round(secs, 1),
            "rejected": st["errors"]["by_type"], "status_bytes": status_bytes, "summary_bytes": summary,
            "exit": code}


def main() -> int:
    for name in CASES:
        with tempfile.TemporaryDirectory(prefix="rllsm-hostile-") as d:
            print(json.dumps(run_case(name, Path(d))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
