"""``rllsm demo``: the whole live path on one machine, in a few minutes, without a microscope or a GPU.

Starts the service on loopback, streams a simulated rLLSM acquisition into it frame by frame (as Micro-Manager
would), reconstructs every stack (classical joint-RL fusion unless demo network weights are installed), and writes
``OUT/<acquisition>.ome.zarr``, maximum-intensity-projection PNGs under ``OUT/mips/`` and ``OUT/summary.json`` with
the per-stage and end-to-end latencies.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="simulate a microscope, stream it to the service, reconstruct, write outputs")
    p.add_argument("--out", type=Path, default=Path("rllsm-demo"), help="output folder (default %(default)s)")
    p.add_argument("--timepoints", type=int, default=3, help="stacks to stream (default %(default)s)")
    p.add_argument("--shape", default=None, metavar="Z,Y,X",
                   help="raw stack size (default 64,128,128; 48,96,96 for the networks (full, sr-rl) without a GPU, so that "
                        "the demo stays within a few minutes on two CPU cores)")
    p.add_argument("--mode", choices=["auto", "full", "sr-rl", "classical", "deskew"], default="auto",
                   help="auto: sr-rl (demo VSI-SR + joint Richardson–Lucy fusion) if the demo weights are installed, "
                   "else classical; full also runs the demo RL-DFN, which is not yet good enough to be the default "
                   "(MODEL_CARD.md)")
    p.add_argument("--device", help="cpu or cuda (default: CUDA if present)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    from streamer.cli.backend_options import add_backend_args

    add_backend_args(p, device=False)  # mode full: what runs the demo networks
    p.set_defaults(func=run)


class MipPngSink:
    """Writes the three maximum-intensity projections of each volume as 8-bit PNGs (a non-critical output)."""

    def __init__(self, directory: Path) -> None:
        from streamer.sinks.base import SinkStats

        self.directory = directory
        self.name = "mip-png"
        self.stats = SinkStats()
        self.contrast: list[float] = []  # std/mean of each volume's z-MIP

    def setup(self, meta: Any) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)

    def append(self, volume: np.ndarray, index: Any) -> None:
        from PIL import Image

        v = np.asarray(volume, dtype=np.float32)
        mip_z = v.max(axis=0)
        # a reconstruction with no contrast left is worth saying so rather than showing a grey square
        self.contrast.append(float(mip_z.std() / max(abs(float(mip_z.mean())), 1e-12)))
        for axis, name in enumerate("zyx"):
            mip = v.max(axis=axis)
            lo, hi = np.percentile(mip, [0.5, 99.9])
            img = np.clip((mip - lo) / max(hi - lo, 1e-12) * 255.0, 0, 255).astype(np.uint8)
            Image.fromarray(img).save(self.directory / f"t{index.timepoint:05d}_c{index.channel}_mip{name}.png")
        self.stats.written += 1

    def skip(self, index: Any, reason: str) -> None:
        self.stats.skipped[index] = reason

    def close(self) -> None:
        pass


def choose_mode(requested: str, optics: Any) -> str:
    """``auto`` → ``sr-rl`` when the demo weights are installed, else ``classical``.

    Not ``full``: the shipped demo RL-DFN loses most structures on simulated stacks (MODEL_CARD.md, "RL-DFN demo
    quality"), so the demo shows the demo VSI-SR with the network-free fusion; ``--mode full`` shows RL-DFN.
    """
    if requested != "auto":
        return requested
    try:
        from engines.support import resolve_mode  # the one default-mode rule of every command

        return resolve_mode(requested)
    except ImportError:
        return "deskew"


def default_shape(mode: str, device: str | None) -> tuple[int, int, int]:
    """Raw stack size of the demo: smaller for the full networks on a CPU (about 25 s per stack on two cores)."""
    import torch

    on_gpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    return (48, 96, 96) if mode in ("full", "sr-rl") and not on_gpu else (64, 128, 128)


def run_demo(out: Path, *, timepoints: int = 3, shape: tuple[int, int, int] | None = None, mode: str = "auto",
             device: str | None = None, seed: int = 0, timeout_s: float = 600.0,
             backend: Any = None) -> dict[str, Any]:
    """Run the demo; returns (and writes to ``out/summary.json``) the summary.

    ``backend`` (:class:`engines.backends.BackendConfig`) says what runs the networks in ``full`` mode.

    Raises
    ------
    RuntimeError
        If the service stopped on an error or the reconstruction did not finish within ``timeout_s``.
    """
    from engines.simulate import Microscope
    from engines.simulate.config import make_sim_config
    from streamer.cli.simulate_cmd import stream_simulation
    from streamer.service import Service, ServiceConfig, wait_for

    t_start = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    mode = choose_mode(mode, make_sim_config().optics)
    shape = shape or default_shape(mode, device)
    sim = make_sim_config(shape=shape)
    mic = Microscope(sim, seed)
    acq = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    rec = out / "recordings" / acq
    cfg = ServiceConfig(ingest="tcp://127.0.0.1:0", control="tcp://127.0.0.1:0", recording=rec, output=out,
                        output_format="zarr", mode=mode, device=device, stack_timeout_s=60.0,
                        **({"backend": backend} if backend is not None else {}))
    holder: dict[str, Service] = {}

    mips = MipPngSink(out / "mips")

    def sinks(meta: Any) -> list[tuple[Any, bool]]:
        return [*holder["svc"].default_sinks(meta), (mips, False)]

    svc = holder["svc"] = Service(cfg, sink_factory=sinks).start()
    print(f"demo: service on {svc.ingest_endpoint}, mode {mode}; streaming {timepoints} simulated stacks of "
          f"{'×'.join(map(str, shape))}", file=sys.stderr, flush=True)
    try:
        sent = stream_simulation(mic, svc.ingest_endpoint, timepoints, per_frame=True, acquisition_id=acq)
        finished = wait_for(
            lambda: svc.error is not None or svc.processor.status().summary_of(acq) is not None,
            timeout_s - (time.monotonic() - t_start), interval_s=0.2,
        )
    finally:
        svc.stop()
    if svc.error is not None:
        raise RuntimeError(f"the service stopped: {svc.error}")
    if not finished:
        raise RuntimeError(f"reconstruction did not finish within {timeout_s:g} s")
    acq_summary = svc.processor.status().summary_of(acq)
    assert acq_summary is not None
    n_out = int(acq_summary["counters"].get("volumes_output", 0))
    if n_out < timepoints:
        errors = "; ".join(svc.processor.status().last_errors[-3:]) or "see the log"
        raise RuntimeError(f"only {n_out} of {timepoints} stacks were reconstructed in mode '{mode}': {errors}")
    import torch

    summary = {
        "acquisition_id": acq, "mode": mode, "timepoints": timepoints, "raw_shape": list(shape),
        "messages_sent": sent["sent"], "wall_s": round(time.monotonic() - t_start, 2),
        "outputs": {"ome_zarr": str(out / f"{acq}.ome.zarr"), "mips": str(out / "mips"), "recording": str(rec)},
        "fused_voxel_size_um": _fused_voxel(out / f"{acq}.ome.zarr"),
        "per_stage_ms": acq_summary["stages"],
        "end_to_end_latency_ms": acq_summary["latency_ms"],
        "incomplete_stacks": acq_summary["incomplete_stacks"],
        "rejected_messages": acq_summary["rejected_by_error"],
        "counters": acq_summary["counters"],
        "machine": {"platform": platform.platform(), "cpus": __import__("os").cpu_count(),
                    "torch": torch.__version__, "cuda": torch.cuda.is_available()},
    }
    flat = [c for c in mips.contrast if c < 0.02]
    summary["warnings"] = [
        f"{len(flat)} of {len(mips.contrast)} fused volumes are nearly uniform (z-MIP std/mean < 2 %): the {mode} "
        "reconstruction left no contrast; compare with --mode classical"
    ] if flat else []
    for w in summary["warnings"]:
        log.warning("demo: %s", w)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _fused_voxel(dataset: Path) -> list[float] | None:
    """(z, y, x) voxel size the OME-Zarr dataset declares (read back, so the summary says what a viewer will see)."""
    try:
        doc = json.loads((dataset / "zarr.json").read_text())
        return doc["attributes"]["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"][2:]
    except (OSError, ValueError, KeyError, IndexError):
        return None


def run(args: argparse.Namespace) -> int:
    from engines.simulate.config import SimulationError
    from streamer.cli import CLIError
    from streamer.cli.simulate_cmd import _parse_shape

    if args.timepoints < 1:
        raise CLIError(f"--timepoints must be ≥ 1, got {args.timepoints}")
    if not args.timeout > 0:
        raise CLIError(f"--timeout must be > 0 seconds, got {args.timeout}")
    shape = _parse_shape(args.shape) if args.shape else None
    try:
        from streamer.cli.backend_options import backend_config_from_args
        from streamer.cli.progress import heartbeat

        # Start-up (imports, weights) and streaming show as a moving elapsed time.
        with heartbeat("demo", disable=getattr(args, "quiet", False)):
            summary = run_demo(args.out, timepoints=args.timepoints, shape=shape, mode=args.mode,
                               device=args.device, seed=args.seed, timeout_s=args.timeout,
                               backend=backend_config_from_args(args))
    except (RuntimeError, SimulationError) as err:
        raise CLIError(str(err)) from None
    print(f"demo: {summary['timepoints']} stacks reconstructed ({summary['mode']}) in {summary['wall_s']} s")
    for name, st in summary["per_stage_ms"].items():
        print(f"  {name:<14} p50 {st['p50_ms']:9.1f} ms   p99 {st['p99_ms']:9.1f} ms")
    lat = summary["end_to_end_latency_ms"]
    if lat:
        print(f"  end to end (last frame → fused volume out): p50 {lat['p50']:.0f} ms, p99 {lat['p99']:.0f} ms")
    vox = summary.get("fused_voxel_size_um")
    if vox:
        print(f"  fused voxel (z, y, x): {', '.join(f'{v * 1000:.1f}' for v in vox)} nm")
    print(f"outputs: {summary['outputs']['ome_zarr']}, {summary['outputs']['mips']}/, {args.out / 'summary.json'}")
    return 0
