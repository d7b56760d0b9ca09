"""``rllsm bench --report DIR``: one command that measures the whole reconstruction on this machine's GPU.

Writes ``DIR/report.json`` and ``DIR/report.md`` with

* the machine (GPU, CUDA, torch, CuPy, TensorRT) and the GPU-marked tests run here (pass/fail/skip);
* a matmul peak measured in the same run, per precision;
* per-step and end-to-end times of one stack (default 101×768×768 uint16 on a GPU) in each mode and precision, the
  FLOP floor of each step (VSI-SR ≈ 3.1 MFLOP per input pixel per orientation, RL-DFN ≈ 2.45 MFLOP per voxel),
  the achieved TFLOP/s against that floor and its fraction of the matmul peak, peak GPU memory, and the
  host↔device transfers per stack;
* sustained volumes/s and last-plane → published latency through the live service (ZMQ in, stage worker, outputs),
  fed frame by frame with a simulated acquisition;
* parity of the GPU output against the CPU output on a small simulated stack.

Designed to finish in under 8 minutes on one H100/H200 (``budget_s``: configurations that would not fit are listed
as skipped, not silently dropped). Without a GPU it says "no GPU" and measures the CPU at a small size, so the
command itself is tested everywhere.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

#: FLOP floors of the two networks (multiply-add = 2 FLOP), from the published architectures.
VSISR_FLOP_PER_PIXEL = 3.1e6  # per input pixel per orientation
RLDFN_FLOP_PER_VOXEL = 2.45e6  # per fused voxel
GPU_SIZE = (101, 768, 768)
CPU_SIZE = (32, 64, 64)
PARITY_SIZE = (48, 96, 96)
GOALS = {"sr-rl": "≥ 1 volume/s sustained, ≤ 2 s last plane → published", "full": "≥ 0.5 volume/s sustained",
         "classical": "(no goal set)"}
#: Acquisition rate the live section streams at (volumes/s): the goal's rate, so the latency is the one a
#: microscope acquiring at that rate would see (a service slower than that shows a growing latency).
LIVE_RATE = {"sr-rl": 1.0, "full": 0.5, "classical": 1.0}


class ReportError(RuntimeError):
    """The report could not be written (bad arguments, unwritable folder)."""


def _env() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "cpus": os.cpu_count(), "torch": torch.__version__,
                            "cuda": torch.cuda.is_available()}
    if info["cuda"]:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda_runtime=torch.version.cuda, capability=f"{props.major}.{props.minor}")
    for mod in ("cupy", "tensorrt", "onnxruntime"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - any import failure means "not usable here"
            info[mod] = None
    return info


def _gpu_tests(root: Path, timeout_s: float) -> dict[str, Any]:
    """Run the ``gpu``-marked tests of a source checkout (skipped where no checkout or no GPU)."""
    tests = root / "tests"
    if not tests.is_dir():
        return {"status": "not run: no tests/ folder beside the package (run from a source checkout)"}
    files = sorted(str(p) for p in tests.glob("test_*.py") if "mark.gpu" in p.read_text(encoding="utf-8"))
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {timeout_s:g} s", "files": len(files)}
    tail = proc.stdout.strip().splitlines()[-1:] or [""]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", tail[0])}
    return {"status": "ok" if proc.returncode in (0, 5) else "failures", "returncode": proc.returncode,
            "summary": tail[0], "counts": counts, "files": len(files),
            "wall_s": round(time.perf_counter() - t0, 1),
            "failures": re.findall(r"^FAILED .*$", proc.stdout, flags=re.M)[:20]}


def _peak(device: Any, precision: str) -> float:
    """Best-of-3 square-matmul rate (TFLOP/s) at ``precision`` on ``device`` (TF32 off: fp32 means fp32)."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    n = 8192 if device.type == "cuda" else 512
    a = torch.rand(n, n, device=device, dtype=dtype)
    b = torch.rand(n, n, device=device, dtype=dtype)
    reps = 10 if device.type == "cuda" else 4
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        best = float("inf")
        for i in range(4):  # the first round warms up
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:
                best = min(best, time.perf_counter() - t)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return 2.0 * n**3 * reps / best / 1e12


def _raw_stack(size: tuple[int, int, int], seed: int = 0) -> tuple[Any, np.ndarray]:
    """A simulated raw stack of ``size``: simulated at ≤ 256 px and tiled laterally (the simulator's cost grows
    with the area; timing does not depend on the content)."""
    from engines.simulate import Microscope
    from engines.simulate.config import make_sim_config

    z, y, x = size
    tile = (z, min(y, 256), min(x, 256))
    try:
        sim = make_sim_config(shape=tile, structure="beads", n_objects=max(10, tile[1] * tile[2] // 800))
        raw = Microscope(sim, seed).acquire(0, with_ground_truth=False).raw
    except ValueError:  # a stack too thin for whole beads: plain noise with the camera offset is enough to time
        sim = make_sim_config(shape=(48, 96, 96))
        raw = (np.random.default_rng(seed).poisson(5.0, tile) + 100).astype(np.uint16)
    reps = (1, -(-y // tile[1]), -(-x // tile[2]))
    return sim.optics, np.ascontiguousarray(np.tile(raw, reps)[:z, :y, :x])


def _weights_dir(tmp: Path) -> Path:
    """Random-initialised networks at the published sizes (speed does not depend on the weights)."""
    from engines.backends.models import get_model

    for kind, name in (("vsi-sr", "vsi-sr.pt"), ("rl-dfn", "rl-dfn.pt")):
        mk = get_model(kind)
        mk.save(mk.build_random(0), tmp / name)
    return tmp


def _flop_floor(mode: str, raw_shape: tuple[int, int, int], fused_voxels: int) -> dict[str, float]:
    z, y, x = raw_shape
    floors = {}
    if mode in ("full", "sr-rl"):
        floors["lateral_sr"] = VSISR_FLOP_PER_PIXEL * 3 * max(0, z - 6) * y * x
    if mode == "full":
        floors["fuse"] = RLDFN_FLOP_PER_VOXEL * fused_voxels
    return floors


def _views(optics: Any, mode: str) -> Any:
    """Step 3's parameters: random-weight networks scramble the mirror image, so the report skips the mirror check
    in the network modes (it times the split, whatever the score)."""
    import math

    from engines.views import ViewsParams

    if mode == "classical":
        return None
    return ViewsParams(angle_deg=math.copysign(optics.objective_angle_deg, optics.skew_angle_deg), mirror_threshold=0.0)


def _time_mode(mode: str, precision: str, raw: np.ndarray, optics: Any, weights: Path, device: Any,
               repeats: int, peak: float, memory_budget_mib: float | None = None) -> dict[str, Any]:
    import torch

    from engines.backends.select import BackendConfig
    from engines.device import transfers
    from engines.reconstruct import Reconstructor, ReconstructParams, load_models

    models = None
    if mode in ("full", "sr-rl"):
        models = load_models(vsisr_checkpoint=weights / "vsi-sr.pt",
                             rldfn_weights=weights / "rl-dfn.pt" if mode == "full" else None, optics=optics,
                             backend=BackendConfig(backend="torch", precision=precision, device=str(device)))
    rec = Reconstructor(optics, ReconstructParams(mode=mode, iterations=10, views=_views(optics, mode),
                                                  memory_budget_mib=memory_budget_mib), models,
                        device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    runs = []
    counts = None
    for i in range(repeats + 1):  # the first run warms up (allocator, cuDNN autotuning, FFT plans)
        t0 = time.perf_counter()
        with transfers.measure() as got:
            res = rec(raw)
        wall = time.perf_counter() - t0
        if i:
            runs.append((wall, res.timings_s))
            counts = got()
    steps = {k: float(np.median([r[1][k] for r in runs])) for k in runs[0][1]}
    e2e = float(np.median([r[0] for r in runs]))
    floors = _flop_floor(mode, raw.shape, int(res.fused.size))
    row: dict[str, Any] = {
        "mode": mode, "precision": precision, "raw_shape": list(raw.shape), "fused_shape": list(res.fused.shape),
        "steps_s": {k: round(v, 4) for k, v in steps.items()}, "end_to_end_s": round(e2e, 4),
        "volumes_per_s": round(1.0 / e2e, 4), "repeats": repeats,
        "flop_floor": {k: v for k, v in floors.items()},
        "achieved_tflops": {k: round(v / steps[k] / 1e12, 3) for k, v in floors.items() if steps.get(k)},
        "transfers": {"h2d": counts.h2d, "h2d_mb": round(counts.h2d_bytes / 1e6, 2), "d2h": counts.d2h,
                      "d2h_mb": round(counts.d2h_bytes / 1e6, 2), "probes": counts.probes,
                      "probe_mb": round(counts.probe_bytes / 1e6, 3)} if counts else None,
    }
    row["of_peak"] = {k: round(v / peak, 4) for k, v in row["achieved_tflops"].items()} if peak > 0 else {}
    if device.type == "cuda":
        row["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    else:
        import resource

        row["peak_host_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    del rec, models
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _parity(optics_size: tuple[int, int, int], weights: Path, cuda: bool) -> list[dict[str, Any]]:
    if not cuda:
        return [{"status": "no GPU: GPU-vs-CPU parity not measured"}]
    from engines.reconstruct import Reconstructor, ReconstructParams, load_models

    optics, raw = _raw_stack(optics_size, seed=1)
    out = []
    for mode in ("classical", "sr-rl"):
        models = {}
        for dev in ("cuda", "cpu"):
            m = None if mode == "classical" else load_models(vsisr_checkpoint=weights / "vsi-sr.pt", optics=optics)
            params = ReconstructParams(mode=mode, iterations=5, views=_views(optics, mode))
            models[dev] = Reconstructor(optics, params, m, device=dev)(raw).fused
        g, c = models["cuda"], models["cpu"]
        scale = float(np.abs(c).max()) or 1.0
        r = float(np.corrcoef(g.ravel(), c.ravel())[0, 1]) if g.shape == c.shape else float("nan")
        out.append({"mode": mode, "shape": list(raw.shape), "max_abs_diff_rel": float(np.abs(g - c).max()) / scale,
                    "pearson_r": r})
    return out


def _live(mode: str, raw: np.ndarray, optics: Any, weights: Path | None, device: str, n_stacks: int,
          timeout_s: float, memory_budget_mib: float | None = None) -> dict[str, Any]:
    """Stream ``n_stacks`` copies of ``raw`` plane by plane into a live service; time what it publishes."""
    from streamer.sender import SenderConfig, StreamSender
    from streamer.service import Service, ServiceConfig, wait_for

    published: dict[int, float] = {}

    class _TimingSink:
        name = "timing"

        def __init__(self) -> None:
            from streamer.sinks.base import SinkStats

            self.stats = SinkStats()

        def setup(self, meta: Any) -> None:
            pass

        def append(self, volume: np.ndarray, index: Any) -> None:
            published[int(index.timepoint)] = time.perf_counter()
            self.stats.written += 1

        def skip(self, index: Any, reason: str) -> None:
            pass

        def close(self) -> None:
            pass

    with tempfile.TemporaryDirectory(prefix="rllsm-live-") as tmp:
        cfg = ServiceConfig(ingest="tcp://127.0.0.1:0", control="tcp://127.0.0.1:0", recording=Path(tmp) / "rec",
                            output=Path(tmp) / "out", output_format="npy", mode=mode, device=device,
                            stack_timeout_s=120.0, memory_budget_mib=memory_budget_mib, **({"weights": weights} if weights is not None else {}))
        def stages(start: Any) -> Any:
            # the service's own chain (stage_chain, as build_stages wires it), with the report's Step 3 parameters
            from engines.device import default_memory_budget_mib
            from engines.reconstruct import stage_chain
            from streamer.pipeline import Stage

            chain = stage_chain(mode, start.optics, device=device, weights=str(weights) if weights else None,
                                memory_budget_mib=memory_budget_mib or default_memory_budget_mib(device), views=_views(start.optics, mode))
            chain[:] = [Stage(s[0], s[1], getattr(s, "kind", "numpy")) for s in chain]
            return chain

        svc = Service(cfg, stage_factory=stages, sink_factory=lambda meta: [(_TimingSink(), False)]).start()
        last_plane: dict[int, float] = {}
        try:
            nz = raw.shape[0]
            # a queue that holds the whole run: the report measures the service, not the sender dropping frames
            hwm = min(1_000_000, n_stacks * nz + 16)
            period = 1.0 / LIVE_RATE.get(mode, 1.0)
            with StreamSender(SenderConfig(endpoint=svc.ingest_endpoint, sndhwm=hwm)) as snd:
                deadline = time.monotonic() + 10
                while not snd.start(optics=optics, z_count=nz, frame_shape=raw.shape[1:], dtype="uint16",
                                    n_timepoints=n_stacks, channels=("488",)):
                    if time.monotonic() > deadline:
                        raise ReportError("the live service did not accept the acquisition start")
                    time.sleep(0.05)
                t_first = time.perf_counter()
                for t in range(n_stacks):
                    for z in range(nz):  # planes spread over the stack's period, as a camera delivers them
                        wait = t_first + period * (t + (z + 1) / nz) - time.perf_counter()
                        if wait > 0:
                            time.sleep(wait)
                        if not snd.send_frame(raw[z], timepoint=t, z_index=z, z_count=nz):
                            raise ReportError(f"the sender dropped plane {z} of stack {t}")
                    last_plane[t] = time.perf_counter()
                snd.end()
            wait_for(lambda: len(published) >= n_stacks or svc.error is not None, timeout_s, interval_s=0.05)
        finally:
            svc.stop()
        errors = list(svc.processor.last_errors)
    done = sorted(published)
    lat = [published[t] - last_plane[t] for t in done if t in last_plane]
    row: dict[str, Any] = {"mode": mode, "stacks_sent": n_stacks, "stacks_published": len(done),
                           "acquisition_rate_volumes_per_s": LIVE_RATE.get(mode, 1.0),
                           "raw_shape": list(raw.shape), "errors": errors[-3:]}
    if done:
        row["latency_last_plane_to_published_s"] = {"median": round(float(np.median(lat)), 3),
                                                    "max": round(float(np.max(lat)), 3)}
        span = published[done[-1]] - t_first
        row["sustained_volumes_per_s"] = round(len(done) / span, 4) if span > 0 else None
        if len(done) >= 3:  # steady state: between the first and the last output
            row["steady_volumes_per_s"] = round((len(done) - 1) / (published[done[-1]] - published[done[0]]), 4)
    return row


def run_report(out_dir: str | os.PathLike[str], *, size: tuple[int, int, int] | None = None,
               modes: tuple[str, ...] | None = None, precisions: tuple[str, ...] | None = None,
               repeats: int = 2, live_stacks: int | None = None, budget_s: float = 420.0, run_tests: bool = True,
               device: str | None = None, memory_budget_mib: float | None = None) -> dict[str, Any]:
    """Measure and write ``report.json`` + ``report.md`` into ``out_dir``; returns the report as a dict.

    ``memory_budget_mib`` (MiB; None: from the device's free memory) bounds each reconstruction as ``--memory-budget``
    does for ``rllsm reconstruct`` and ``serve``.
    """
    import torch

    from engines.device import pick_device

    t_start = time.perf_counter()
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ReportError(f"cannot create the report folder {out}: {err}") from None
    dev = pick_device(device)
    cuda = dev.type == "cuda"
    size = tuple(size) if size else (GPU_SIZE if cuda else CPU_SIZE)  # type: ignore[assignment]
    precisions = precisions or (("fp32", "bf16", "fp16") if cuda else ("fp32",))
    # On a CPU the published-size networks take minutes per stack: only the network-free mode unless asked.
    cpu_default = modes is None and not cuda
    modes = modes or (("classical", "sr-rl", "full") if cuda else ("classical",))
    bad = [p for p in precisions if p not in ("fp32", "bf16", "fp16")] + [m for m in modes if m not in GOALS]
    if bad:
        raise ReportError(f"unknown mode/precision {bad}; modes: {', '.join(GOALS)}; precisions: fp32, bf16, fp16")
    live_stacks = live_stacks if live_stacks is not None else (5 if cuda else 2)
    report: dict[str, Any] = {"version": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "device": str(dev), "gpu": cuda, "environment": _env(), "size": list(size),
                              "flop_floors": {"vsi-sr_flop_per_input_pixel_per_orientation": VSISR_FLOP_PER_PIXEL,
                                              "rl-dfn_flop_per_voxel": RLDFN_FLOP_PER_VOXEL},
                              "goals": GOALS, "skipped": []}
    if cpu_default:
        report["skipped"].append("sr-rl, full: not timed on the CPU by default (minutes per stack at the published "
                                 "network size); ask for them with --modes")
    if not cuda:
        report["note"] = (f"no GPU: torch {torch.__version__} sees no CUDA device; CPU figures at {size} only, "
                          "GPU-vs-CPU parity not measured")
    root = Path(__file__).resolve().parents[1]
    if run_tests:
        report["gpu_tests"] = _gpu_tests(root, timeout_s=min(180.0, budget_s / 3)) if cuda else {
            "status": "no GPU: the gpu-marked tests skip here"}
    report["peak_tflops"] = {p: round(_peak(dev, p), 3) for p in precisions if cuda or p != "fp16"}
    optics, raw = _raw_stack(size)
    with tempfile.TemporaryDirectory(prefix="rllsm-report-") as tmp:
        weights = _weights_dir(Path(tmp))
        rows = []
        for mode in modes:
            for p in precisions if mode != "classical" else ("fp32",):
                elapsed = time.perf_counter() - t_start
                if p == "fp16" and not cuda:
                    report["skipped"].append(f"{mode} {p}: fp16 needs a GPU")
                    continue
                if rows and elapsed + 1.5 * (repeats + 1) * rows[-1]["end_to_end_s"] > budget_s * 0.75:
                    report["skipped"].append(f"{mode} {p}: would not fit the {budget_s:g} s budget")
                    continue
                try:
                    rows.append(_time_mode(mode, p, raw, optics, weights, dev, repeats,
                                           report["peak_tflops"].get(p, 0.0), memory_budget_mib))
                except Exception as err:  # noqa: BLE001 - one failing configuration is reported, not fatal
                    report["skipped"].append(f"{mode} {p}: {type(err).__name__}: {err}")
        report["timings"] = rows
        live = []
        for mode in modes:
            if time.perf_counter() - t_start > budget_s * 0.85:
                report["skipped"].append(f"live {mode}: out of time budget")
                continue
            try:
                live.append(_live(mode, raw, optics, weights if mode != "classical" else None, str(dev),
                                  live_stacks, timeout_s=max(30.0, budget_s - (time.perf_counter() - t_start)),
                                  memory_budget_mib=memory_budget_mib))
            except Exception as err:  # noqa: BLE001
                report["skipped"].append(f"live {mode}: {type(err).__name__}: {err}")
        report["live"] = live
        report["parity"] = _parity(PARITY_SIZE, weights, cuda)
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "report.md").write_text(to_markdown(report))
    return report


def to_markdown(r: dict[str, Any]) -> str:
    """The report as Markdown (what BENCHMARKS.md quotes)."""
    env = r["environment"]
    head = env.get("gpu") or f"no GPU ({env['platform']}, {env['cpus']} CPUs)"
    lines = [f"# rllsm GPU report — {head}", "", f"Created {r['created']}; torch {env['torch']}, CUDA "
             f"{env.get('cuda_runtime') or '–'}, CuPy {env.get('cupy') or '–'}, TensorRT {env.get('tensorrt') or '–'}; "
             f"stack {'×'.join(map(str, r['size']))} uint16; wall {r.get('wall_s', '?')} s.", ""]
    if r.get("note"):
        lines += [f"**{r['note']}**", ""]
    if "gpu_tests" in r:
        lines += [f"GPU-marked tests: {r['gpu_tests'].get('summary') or r['gpu_tests']['status']}", ""]
    lines += ["Matmul peak in this run: " + ", ".join(f"{p} {v:.2f} TFLOP/s" for p, v in r["peak_tflops"].items()),
              "", "FLOP floors: VSI-SR ≈ 3.1 MFLOP per input pixel per orientation; RL-DFN ≈ 2.45 MFLOP per voxel.",
              "", "| mode | precision | preprocess s | lateral SR s | split s | fuse s | end to end s | vol/s | "
              "achieved TFLOP/s (of peak) | peak mem GiB | copies in/out |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in r.get("timings", []):
        s = t["steps_s"]
        ach = "; ".join(f"{k} {v:.2f} ({t['of_peak'].get(k, 0):.0%})" for k, v in t["achieved_tflops"].items()) or "–"
        mem = t.get("peak_gpu_memory_gib", t.get("peak_host_rss_gib", "–"))
        tr = t.get("transfers") or {}
        lines.append(f"| {t['mode']} | {t['precision']} | {s.get('preprocess', 0):.3f} | {s.get('lateral_sr', 0):.3f} "
                     f"| {s.get('split_views', 0):.3f} | {s.get('fuse', 0):.3f} | {t['end_to_end_s']:.3f} | "
                     f"{t['volumes_per_s']:.3f} | {ach} | {mem} | {tr.get('h2d', '–')}/{tr.get('d2h', '–')} |")
    lines += ["", "Live service (a simulated acquisition streamed plane by plane over ZMQ at the goal's rate):", "",
              "| mode | stacks | sustained vol/s | steady vol/s | last plane → published (median / max s) | goal |",
              "|---|---|---|---|---|---|"]
    for lv in r.get("live", []):
        lat = lv.get("latency_last_plane_to_published_s") or {}
        lines.append(f"| {lv['mode']} | {lv['stacks_published']}/{lv['stacks_sent']} | "
                     f"{lv.get('sustained_volumes_per_s', '–')} | {lv.get('steady_volumes_per_s', '–')} | "
                     f"{lat.get('median', '–')} / {lat.get('max', '–')} | {GOALS.get(lv['mode'], '')} |")
    lines += ["", "Parity, GPU vs CPU:", ""]
    for p in r.get("parity", []):
        lines.append(f"- {p['mode']} {p.get('shape')}: max |GPU − CPU| / max|CPU| = {p['max_abs_diff_rel']:.2e}, "
                     f"r = {p['pearson_r']:.6f}" if "mode" in p else f"- {p['status']}")
    if r.get("skipped"):
        lines += ["", "Skipped:", ""] + [f"- {s}" for s in r["skipped"]]
    return "\n".join(lines) + "\n"
