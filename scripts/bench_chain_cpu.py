"""The reconstruction chain on the CPU, this checkout against another commit, side by side in one run.

    python scripts/bench_chain_cpu.py --base /path/to/other/checkout [--shape 48,96,96] [--rounds 3] [--threads 1]

Each round runs both checkouts once, alternately, each in its own process (``PYTHONPATH`` set to that checkout),
on the same seeded simulated stack: mode ``classical`` and mode ``sr-rl`` with the same seeded small VSI-SR
network (small so that what surrounds the network — rotations, recombination, data movement — weighs in the
timing). Each process warms up once and then times ``--repeats`` whole-chain calls. Prints per-step medians of
both, the ratio base ÷ this (> 1: this checkout is faster) and the largest difference of the outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from engines.reconstruct import ReconModels, Reconstructor, ReconstructParams
    from engines.simulate.config import make_sim_config
    from engines.simulate.microscope import simulate_stack

    shape = tuple(int(v) for v in args.shape.split(","))
    cfg = make_sim_config(shape=shape, structure="beads", n_objects=40)
    raw = simulate_stack(cfg, seed=5)[0].raw
    out: dict[str, object] = {}
    for mode in ("classical", "sr-rl"):
        models = None
        if mode == "sr-rl":
            from engines.vsisr.lateral import LateralSRParams
            from engines.vsisr.network import VSISR, VSISRConfig
            from engines.vsisr.otf import generate_otfs

            torch.manual_seed(0)
            net = VSISR(VSISRConfig(features=16, n_groups=1, n_blocks=1, reduction=4, head_features=16)).eval()
            models = ReconModels(vsisr=net, otfs=generate_otfs(cfg.optics), lateral=LateralSRParams(batch_size=4))
        rec = Reconstructor(cfg.optics, ReconstructParams(mode=mode, iterations=5), models, device="cpu")
        rec(raw)  # warm-up
        runs = []
        for _ in range(args.repeats):
            c0, t0 = time.process_time(), time.perf_counter()
            res = rec(raw)
            runs.append({**res.timings_s, "total": time.perf_counter() - t0, "cpu": time.process_time() - c0})
        # CPU seconds per step (one thread: the work done, insensitive to other jobs), through the numpy-facing
        # step methods both checkouts have
        for run in runs:
            c = time.process_time()
            vol = rec.preprocess(raw)[0]
            run["cpu preprocess"], c = time.process_time() - c, time.process_time()
            sr = rec.lateral(vol)
            run["cpu lateral_sr"], c = time.process_time() - c, time.process_time()
            a, b, _ = rec.split(sr)
            run["cpu split_views"], c = time.process_time() - c, time.process_time()
            rec.fuse(a, b)
            run["cpu fuse"] = time.process_time() - c
        out[mode] = {"runs": runs, "checksum": float(np.asarray(res.fused, np.float64).sum()),
                     "sample": np.asarray(res.fused).ravel()[:: max(1, res.fused.size // 4096)].tolist()}
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, help="the other checkout (e.g. a git worktree of an older commit)")
    ap.add_argument("--shape", default="48,96,96")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    if args.base is None:
        ap.error("--base is required")
    results: dict[str, list[dict]] = {"base": [], "this": []}
    for _ in range(args.rounds):
        for name, repo in (("base", args.base.resolve()), ("this", HERE)):
            env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": str(args.threads)}
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", "--shape", args.shape,
                                   "--repeats", str(args.repeats), "--threads", str(args.threads)],
                                  cwd=repo, env=env, capture_output=True, text=True, check=True)
            results[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"shape {args.shape}, {args.threads} thread(s), {args.rounds} rounds × {args.repeats} runs per checkout, "
          f"load average {os.getloadavg()[0]:.1f}")
    for mode in ("classical", "sr-rl"):
        print(f"\n## {mode}\n\n| step | base s | this s | base ÷ this |\n|---|---:|---:|---:|")
        keys = list(results["this"][0][mode]["runs"][0])
        for k in keys:
            b = statistics.median(r[k] for res in results["base"] for r in res[mode]["runs"])
            t = statistics.median(r[k] for res in results["this"] for r in res[mode]["runs"])
            print(f"| {k} | {b:.3f} | {t:.3f} | {b / t if t else float('nan'):.2f} |")
        sb, st = results["base"][0][mode]["sample"], results["this"][0][mode]["sample"]
        peak = max(abs(v) for v in sb) or 1.0
        print(f"\nlargest |this − base| on a {len(sb)}-voxel sample: "
              f"{max(abs(a - b) for a, b in zip(sb, st)) / peak:.2e} of the peak")


if __name__ == "__main__":
    main()
