"""Benchmark of Step 2 (lateral isotropic SR): ours vs the published code path, side by side in one run.

    .venv/bin/python scripts/bench_lateral_sr.py [--ref /tmp/ref] [--shape 32 128 128] [--threads 2]

Both pipelines get the same seeded stack and the same seeded random network weights (speed does not
depend on the weights).  Prints wall times, the time inside the network, the ratio, the network's
achieved GFLOP/s against a large float32 matmul measured in the same run, and the agreement of the
outputs (Pearson r, NRMSE after min–max scaling).  The published code is only imported from ``--ref``;
nothing of it lives in this repository.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "fixtures" / "vsisr"))

from seeded import reference_state, seeded_volume  # noqa: E402

from engines.vsisr.checkpoint import model_from_object  # noqa: E402
from engines.vsisr.lateral import LateralSRParams, TorchPredictor, lateral_sr, window_centres  # noqa: E402
from engines.vsisr.otf import load_otfs  # noqa: E402
from engines.vsisr.rotate import rotated_shape  # noqa: E402

SEED = 777


def conv_flops(h: int, w: int) -> float:
    """Multiply–adds ×2 of one VSI-SR forward on an h×w window (convolutions only; attention is <0.1 %)."""
    hw, hw2 = h * w, int(1.5 * h) * int(1.5 * w)
    f = 2 * 9 * (7 * 64 * hw + 16 * 2 * 64 * 64 * hw + 64 * 256 * hw2 + 256 * 3 * hw2)
    return float(f)


def matmul_peak(n: int = 2048, reps: int = 5) -> tuple[float, float]:
    """Best float32 GFLOP/s of an n³ matmul: by wall clock, and by CPU seconds ÷ threads.

    On a shared machine the wall figure drops with the load; the CPU-time figure estimates what the
    threads reach while they actually run, and is the one the network is compared with.
    """
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best_wall = best_cpu = float("inf")
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        torch.mm(a, b)
        best_wall = min(best_wall, time.perf_counter() - t)
        best_cpu = min(best_cpu, (time.process_time() - c) / torch.get_num_threads())
    return 2 * n**3 / best_wall / 1e9, 2 * n**3 / best_cpu / 1e9


def conv_peak(reps: int = 3) -> float:
    """Best GFLOP/s (per CPU-second ÷ threads) of one large 3×3 convolution, 256→256 channels on 96×96,
    channels-last: oneDNN's best case, a tighter ceiling for a conv network than the BLAS matmul
    (MKL's sgemm does not take its fastest path on every x86 vendor)."""
    conv = torch.nn.Conv2d(256, 256, 3, padding=1).eval().to(memory_format=torch.channels_last)
    x = torch.randn(1, 256, 96, 96).contiguous(memory_format=torch.channels_last)
    flops = 2 * 9 * 256 * 256 * 96 * 96
    best = float("inf")
    with torch.inference_mode():
        conv(x)
        for _ in range(reps):
            c = time.process_time()
            conv(x)
            best = min(best, (time.process_time() - c) / torch.get_num_threads())
    return flops / best / 1e9


def scaled(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    return (a - a.min()) / (a.max() - a.min())


def agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    a, b = scaled(a), scaled(b)
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1]), float(np.sqrt(np.mean((a - b) ** 2)))


def children_cpu() -> float:
    """CPU seconds of finished child processes (user + system)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@dataclass
class Timing:
    wall: float
    net_wall: float
    cpu: float
    net_cpu: float


class Timed(torch.nn.Module):
    """Wraps the published generator to time its forward calls."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.seconds = 0.0
        self.cpu = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, c = time.perf_counter(), time.process_time()
        y = self.inner(x)
        self.seconds += time.perf_counter() - t
        self.cpu += time.process_time() - c
        return y


def run_reference(ref: Path, vol: np.ndarray, shapes: list) -> tuple[Timing, np.ndarray]:
    import tifffile

    from make_lateral import _stub_unused_imports

    _stub_unused_imports()
    sys.path.insert(0, str(ref))
    from Code_for_2D_IsoRecon.model.meta_SR_2D_GAN import Generator
    from Code_for_2D_IsoRecon.utils.fun_recon import isotropic_recon, rotation

    gen = Generator(in_channel=7, n_ResGroup=4, n_RCAB=4, out_channel=3)
    gen.load_state_dict(reference_state(shapes, SEED))
    timed = Timed(gen.eval())
    work = Path(tempfile.mkdtemp(prefix="vsisr_bench_"))
    try:
        stack = work / "001.tif"
        tifffile.imwrite(stack, vol)
        out = work / "recon"
        out.mkdir()
        t0, c0, k0 = time.perf_counter(), time.process_time(), children_cpu()
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):  # the published code prints a line per plane
            nz = rotation(str(stack), timed, torch.device("cpu"), str(work / "sr"), str(work / "wf"), 1)
            param = {
                "Nz": nz - 6, "tp": 1, "lambda": 488e-3, "core_num": 1, "n_ang": 3, "wf_sigma": 0.1,
                "save_name": "vol", "offset_ang": 0, "apo_factor": 2, "isApoBand0": True,
                "image_folder": str(work / "sr"), "wf": str(work / "wf"), "otf_weight": 8.0,
                "use_origin_sr0": False, "origin_sr0": "", "z_offset": 0, "z_range": 0, "adjust_intens": 1,
                "adjust_thresh": 99.0,
            }
            isotropic_recon(str(ref / "Code_for_2D_IsoRecon" / "OTF") + "/", str(out), param)
        # the published recombination runs in a multiprocessing pool: count its worker's CPU too
        cpu = time.process_time() - c0 + children_cpu() - k0
        timing = Timing(time.perf_counter() - t0, timed.seconds, cpu, timed.cpu)
        result = tifffile.imread(out / "vol.tif")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return timing, result


def run_ours(vol, model, otfs, params) -> tuple[Timing, np.ndarray]:
    pred = TorchPredictor(model, "cpu", precision=params.precision)
    spent = [0.0, 0.0]

    def timed(x):
        t, c = time.perf_counter(), time.process_time()
        y = pred(x)
        spent[0] += time.perf_counter() - t
        spent[1] += time.process_time() - c
        return y

    t0, c0 = time.perf_counter(), time.process_time()
    out = lateral_sr(vol, timed, otfs, params, device="cpu")
    return Timing(time.perf_counter() - t0, spent[0], time.process_time() - c0, spent[1]), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", type=Path, default=Path("/tmp/ref"))
    ap.add_argument("--shape", type=int, nargs=3, default=(32, 128, 128))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--otf-dir", type=Path, default=REPO.parent / "shared" / "data" / "otf-meta-rlls-vsim")
    ap.add_argument("--skip-reference", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    nz, ny, nx = args.shape
    vol = seeded_volume(tuple(args.shape), SEED + 1)
    from engines.vsisr.network import VSISR

    shapes = [tuple(p.shape) for p in VSISR().reference_parameters()]
    model = model_from_object(reference_state(shapes, SEED)).eval()
    otfs = load_otfs(args.otf_dir, 488)

    print(f"machine: {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, stack {nz}×{ny}×{nx}")
    peak_wall, peak = matmul_peak()
    print(f"float32 matmul peak (2048³): {peak:.1f} GFLOP/s per CPU-time ({peak_wall:.1f} by wall clock)")
    cpeak = conv_peak()
    print(f"float32 conv peak (3×3, 256→256, 96², oneDNN): {cpeak:.1f} GFLOP/s per CPU-time")

    windows = len(window_centres(nz, 1))
    flops = windows * (conv_flops(ny, nx) + 2 * conv_flops(*rotated_shape(ny, nx, 60)))
    print(f"network work per stack: {windows} windows × 3 orientations = {flops / 1e9:.1f} GFLOP")

    rows = []
    ours_t, ours = run_ours(vol, model, otfs, LateralSRParams(batch_size=args.batch_size))
    rows.append(("ours stride 1", ours_t, flops))
    bf_t, bf = run_ours(vol, model, otfs, LateralSRParams(batch_size=args.batch_size, precision="bf16"))
    rows.append(("ours bf16", bf_t, flops))
    fast_t, fast = run_ours(vol, model, otfs, LateralSRParams(batch_size=args.batch_size, stride=3))
    w3 = len(window_centres(nz, 3))
    rows.append(("ours stride 3", fast_t, flops * w3 / windows))
    if not args.skip_reference:
        ref_t, ref = run_reference(args.ref, vol, shapes)
        rows.append(("published", ref_t, flops))

    print(f"load average during run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
          "(wall times suffer from other jobs; CPU seconds much less)")
    print(f"{'pipeline':<15}{'wall s':>8}{'net wall':>10}{'other':>8} |{'CPU s':>8}{'net CPU':>9}{'other':>8}"
          f" |{'net GFLOP/s (per CPU-s ÷ threads)':>35}{'% matmul':>9}{'% conv':>8}")
    for name, t, f in rows:
        gf = f / (t.net_cpu / args.threads) / 1e9
        print(f"{name:<15}{t.wall:8.1f}{t.net_wall:10.1f}{t.wall - t.net_wall:8.1f} |{t.cpu:8.1f}{t.net_cpu:9.1f}"
              f"{t.cpu - t.net_cpu:8.1f} |{gf:35.1f}{100 * gf / peak:8.1f}%{100 * gf / cpeak:7.1f}%")
    if not args.skip_reference:
        print(f"published / ours, wall: stride 1 ×{ref_t.wall / ours_t.wall:.2f}, stride 3 ×{ref_t.wall / fast_t.wall:.2f}; "
              f"CPU: stride 1 ×{ref_t.cpu / ours_t.cpu:.2f}, stride 3 ×{ref_t.cpu / fast_t.cpu:.2f}; "
              f"outside the network (CPU) ×{(ref_t.cpu - ref_t.net_cpu) / max(ours_t.cpu - ours_t.net_cpu, 1e-9):.1f}")
        r, e = agreement(ours, ref)
        print(f"ours stride 1 vs published: r = {r:.6f}, NRMSE = {100 * e:.4f} %")
    r, e = agreement(bf, ours)
    print(f"bf16 vs fp32 (random-weight network): r = {r:.6f}, NRMSE = {100 * e:.3f} %")
    r, e = agreement(fast, ours)
    print(f"stride 3 vs stride 1 (random-weight network): r = {r:.4f}, NRMSE = {100 * e:.2f} %")

    def consistent(x: np.ndarray) -> torch.Tensor:
        # a predictor that agrees with itself across windows (each channel = its plane, enlarged 1.5×)
        t = torch.from_numpy(x[:, 2:5])
        return torch.nn.functional.interpolate(t, scale_factor=1.5, mode="bilinear", align_corners=False)

    s1 = lateral_sr(vol, consistent, otfs, LateralSRParams(stride=1), device="cpu")
    s3 = lateral_sr(vol, consistent, otfs, LateralSRParams(stride=3), device="cpu")
    r, e = agreement(s3, s1)
    print(f"stride 3 vs stride 1 (self-consistent plane predictor): r = {r:.5f}, NRMSE = {100 * e:.3f} %")


if __name__ == "__main__":
    main()
