"""Benchmarks of the live service (not tests): ingest throughput vs bare pyzmq, and end-to-end latency.

    python scripts/bench_ingest.py throughput [--frames 4000] [--recording-dir /tmp]
    python scripts/bench_ingest.py latency [--shape 64,128,128] [--stacks 3]

``throughput``: a separate sender process pushes N 512×512 uint16 frames (as fast as it can, zero-copy) over
loopback TCP to (a) a bare pyzmq PULL loop that only receives, and (b) ``rllsm serve``'s ingest, which appends every
message to the recording before counting it (with the processor assembling stacks at the same time). Both are timed
the same way, first to last message received, alternately in one run, and the ratio is printed.

With ``--baseline REF`` (a git commit, e.g. the one before an optimisation) the service of that commit runs too, in
the same alternation, each service in its own process, so before and after are measured side by side in one run.

``latency``: classical reconstruction on the CPU; each stack is sent as frames after the previous volume came out,
so the time from its last frame arriving to its fused volume being handed to the outputs is processing, not queueing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SENDER = r"""
import sys, zmq, numpy as np
from streamer import wire
endpoint, n = sys.argv[1], int(sys.argv[2])
frames = [np.full((512, 512), i, np.uint16) for i in range(16)]
heads = [wire.encode(wire.pixels_header(frames[i % 16], acquisition_id="bench", seq=i, timepoint=i // 64,
                                        z_index=i % 64, z_count=64, with_checksum=False))[0] for i in range(n)]
ctx = zmq.Context()
s = ctx.socket(zmq.PUSH)
s.setsockopt(zmq.SNDHWM, 2000)
s.connect(endpoint)
sys.stdin.readline()  # go
for i in range(n):
    s.send_multipart([heads[i], frames[i % 16]], copy=False)
s.close(linger=60000)
ctx.term()
"""


def _sender(endpoint: str, n: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SENDER, endpoint, str(n)], stdin=subprocess.PIPE, text=True,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def bare_pyzmq(n: int) -> float:
    """Seconds from first to last of ``n`` messages received by a plain PULL loop."""
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 1000)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    snd = _sender(f"tcp://127.0.0.1:{port}", n)
    snd.stdin.write("go\n")
    snd.stdin.flush()
    pull.recv_multipart(copy=False)
    t0 = time.perf_counter()
    for _ in range(n - 1):
        pull.recv_multipart(copy=False)
    dt = time.perf_counter() - t0
    snd.wait(60)
    pull.close(0)
    ctx.term()
    return dt


def service_ingest(n: int, recording_dir: Path) -> float:
    """Seconds from first to last of ``n`` messages recorded by the service (recorded arrival times)."""
    from streamer.recording import RecordingReader
    from streamer.service import Service, ServiceConfig, wait_for

    with tempfile.TemporaryDirectory(dir=recording_dir, prefix="rllsm-bench-") as d:
        cfg = ServiceConfig(ingest="tcp://127.0.0.1:0", control="tcp://127.0.0.1:0", recording=Path(d) / "rec",
                            mode="none", stack_timeout_s=60)
        with Service(cfg) as svc:
            snd = _sender(svc.ingest_endpoint, n)
            snd.stdin.write("go\n")
            snd.stdin.flush()
            if not wait_for(lambda: svc.metrics.counter("messages_received") >= n, 300, interval_s=0.05):
                raise RuntimeError("service did not receive every message")
            snd.wait(60)
        with RecordingReader(Path(d) / "rec") as rec:
            return rec.entry(n - 1).received_at - rec.entry(0).received_at


_IN_TREE = ("import sys; sys.path.insert(0, 'scripts'); from pathlib import Path; import bench_ingest as b; "
            "print(b.service_ingest(int(sys.argv[1]), Path(sys.argv[2])))")


def service_ingest_in(tree: Path, n: int, recording_dir: Path) -> float:
    """:func:`service_ingest` of the code in ``tree`` (a checkout of any commit), in a fresh process."""
    out = subprocess.run([sys.executable, "-c", _IN_TREE, str(n), str(recording_dir)], cwd=tree, text=True,
                         capture_output=True, timeout=600, env={**os.environ, "PYTHONPATH": str(tree)}, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"service of {tree} failed:\n{out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def checkout(ref: str, dest: Path) -> Path:
    """The code of commit ``ref`` (streamer/, engines/, scripts/) extracted into ``dest``."""
    import io
    import tarfile

    tar = subprocess.run(["git", "-C", str(REPO), "archive", ref, "streamer", "engines", "scripts"],
                         capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        tf.extractall(dest, filter="data")
    return dest


def machine() -> str:
    import torch

    return (f"{os.cpu_count()}-core {platform.machine()} ({platform.platform()}), Python {platform.python_version()}, "
            f"pyzmq {zmq.__version__} / libzmq {zmq.zmq_version()}, torch {torch.__version__}, "
            f"GPU: {'yes' if torch.cuda.is_available() else 'none'}")


def throughput(args: argparse.Namespace) -> None:
    n, mb = args.frames, 512 * 512 * 2 / 1e6

    def gbps(dt: float) -> float:
        return (n - 1) * mb / dt / 1e3

    rec_dir = Path(args.recording_dir)
    with tempfile.TemporaryDirectory(prefix="rllsm-baseline-") as tmp:
        base = checkout(args.baseline, Path(tmp)) if args.baseline else None
        rows = []
        for rep in range(args.repeats):  # alternate, so all see the same machine load
            b = bare_pyzmq(n)
            if base is None:
                s, s0 = service_ingest(n, rec_dir), None
            else:
                s0 = service_ingest_in(base, n, rec_dir)
                s = service_ingest_in(REPO, n, rec_dir)
            rows.append((b, s, s0))
            line = f"rep {rep}: bare pyzmq {gbps(b):.2f} GB/s, service {gbps(s):.2f} GB/s"
            print(line + (f", baseline {args.baseline} {gbps(s0):.2f} GB/s" if s0 else ""), flush=True)
    bare = float(np.median([r[0] for r in rows]))
    svc = float(np.median([r[1] for r in rows]))
    res = {
        "frames": n, "frame": "512x512 uint16", "recording_dir": args.recording_dir,
        "bare_pyzmq_GBps": round(gbps(bare), 3), "service_GBps": round(gbps(svc), 3),
        "service_over_bare_time": round(svc / bare, 3),
    }
    if args.baseline:
        s0 = float(np.median([r[2] for r in rows]))
        res.update({"baseline": args.baseline, "baseline_GBps": round(gbps(s0), 3),
                    "baseline_over_bare_time": round(s0 / bare, 3)})
    res["load_average"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    res["machine"] = machine()
    print(json.dumps(res, indent=1))


def latency(args: argparse.Namespace) -> None:
    from streamer import wire
    from streamer.service import Service, ServiceConfig, wait_for

    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    shape = tuple(int(v) for v in args.shape.split(","))
    from engines.simulate import Microscope
    from engines.simulate.config import make_sim_config

    sim = make_sim_config(shape=shape)
    mic = Microscope(sim, 0)
    stacks = [s.raw for s in mic.series(args.stacks, with_ground_truth=False)]
    with tempfile.TemporaryDirectory(prefix="rllsm-lat-") as d:
        cfg = ServiceConfig(ingest="tcp://127.0.0.1:0", control="tcp://127.0.0.1:0", recording=Path(d) / "rec",
                            mode="classical", device="cpu", stack_timeout_s=600)
        with Service(cfg) as svc:
            ctx = zmq.Context.instance()
            s = ctx.socket(zmq.PUSH)
            s.connect(svc.ingest_endpoint)
            s.send_multipart(wire.encode(wire.AcquisitionStart(
                acquisition_id="lat", seq=0, z_count=shape[0], frame_shape=shape[1:], optics=sim.optics)))
            seq = 1
            for t, st in enumerate(stacks):
                for z in range(shape[0]):
                    h = wire.pixels_header(st[z], acquisition_id="lat", seq=seq, timepoint=t, z_index=z,
                                           z_count=shape[0])
                    s.send_multipart(wire.encode(h, st[z]))
                    seq += 1
                wait_for(lambda: svc.metrics.counter("volumes_output") >= t + 1, 600, interval_s=0.01)
            s.close()
            lat = np.asarray(svc.processor.latencies) * 1e3
            stages = svc.metrics.snapshot()["stages"]
    res = {"shape": list(shape), "stacks": args.stacks, "mode": "classical", "device": "cpu",
           "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 1), "max": round(float(lat.max()), 1)},
           "stages_p50_ms": {k: round(v["p50_ms"], 1) for k, v in stages.items()}, "machine": machine()}
    print(json.dumps(res, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--frames", type=int, default=4000)
    t.add_argument("--repeats", type=int, default=3)
    t.add_argument("--recording-dir", default=tempfile.gettempdir())
    t.add_argument("--baseline", metavar="REF", help="also run the service of this git commit, side by side")
    t.set_defaults(func=throughput)
    lt = sub.add_parser("latency")
    lt.add_argument("--shape", default="64,128,128")
    lt.add_argument("--stacks", type=int, default=3)
    lt.set_defaults(func=latency)
    args = ap.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
