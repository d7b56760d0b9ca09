"""Benchmark of step 4 fusion: RL-DFN untiled vs tiled (time, peak memory, agreement) and classical joint RL.

    .venv/bin/python scripts/bench_fusion.py [--shape 24 64 64] [--tile 48] [--overlap 24] [--threads 1]
                                             [--repeat 2] [--device cpu]

Every configuration runs in a fresh child process on the same seeded views (beads blurred by two PSFs tilted
±30.8°) with the reference-width RL-DFN (64 channels, seeded random weights — speed does not depend on the
values), so the child's peak resident memory belongs to that configuration alone. Printed per configuration:
best-of-``repeat`` wall time, growth of peak RSS over the process's state before fusing (CPU) or peak
CUDA memory, and our pre-run estimate of one patch's
memory; then the tiled/untiled time ratio and the tiled-vs-untiled NRMSE away from the border.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "fixtures" / "rldfn"))


def _psf(angle: float, n: int = 11) -> np.ndarray:
    z, y, x = np.meshgrid(*[np.arange(n) - (n - 1) / 2] * 3, indexing="ij")
    u, v = np.cos(angle) * z + np.sin(angle) * x, -np.sin(angle) * z + np.cos(angle) * x
    return np.exp(-(u**2) / 8 - v**2 / 2 - y**2 / 2).astype(np.float32)


def _views(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    from scipy.signal import fftconvolve

    rng = np.random.default_rng(0)
    obj = (rng.random(shape) > 0.995).astype(np.float32) * 100
    return tuple(  # type: ignore[return-value]
        (fftconvolve(obj, _psf(a), mode="same") + 1.0).astype(np.float32) for a in (0.54, -0.54)
    )


def child(cfg: dict) -> dict:
    """Run one configuration; returns timings and memory (called in a fresh process)."""
    import torch

    from engines.device import pick_device
    from engines.rldfn.classical import classical_fuse
    from engines.rldfn.fuse import fuse_rldfn
    from engines.rldfn.model import RLDFN
    from engines.rldfn.network import DualViewFusionNet
    from engines.rldfn.tiling import estimate_patch_bytes, round_up
    from seeded_weights import seed_module

    torch.set_num_threads(cfg["threads"])
    dev = pick_device(cfg["device"])
    shape = tuple(cfg["shape"])
    va, vb = _views(shape)
    out_path = Path(cfg["out"])
    times = []
    if cfg["mode"] == "classical":
        run = lambda: classical_fuse(va, vb, _psf(0.54), _psf(-0.54), iterations=cfg["iterations"], device=dev)  # noqa: E731
        estimate = None
    else:
        net = DualViewFusionNet()
        for fname, part in (("net_FA.pth", "feature_a"), ("net_FB.pth", "feature_b"), ("net_G.pth", "unet")):
            seed_module(getattr(net, part), 1, fname)
        model = RLDFN(net.eval(), _psf(0.54), _psf(-0.54))
        tile = cfg["tile"]
        run = lambda: fuse_rldfn(va, vb, model, tile=tile, overlap=cfg["overlap"], device=dev)  # noqa: E731
        patch = tuple(round_up(n) for n in shape) if tile == "none" else tuple(min(tile, round_up(n)) for n in shape)
        estimate = estimate_patch_bytes(patch)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    baseline = 0 if dev.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for _ in range(cfg["repeat"]):
        t0 = time.perf_counter()
        out = run()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    np.save(out_path, out)
    peak = (torch.cuda.max_memory_allocated(dev) if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline)
    return {"best_s": min(times), "peak_bytes": peak, "estimate_bytes": estimate, "device": str(dev)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=[24, 64, 64], metavar=("Z", "Y", "X"))
    ap.add_argument("--tile", type=int, default=48)
    ap.add_argument("--overlap", type=int, default=24)
    ap.add_argument("--iterations", type=int, default=10, help="classical iterations")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--device", default=None)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    import tempfile

    import torch

    base = {"shape": args.shape, "threads": args.threads, "repeat": args.repeat, "device": args.device,
            "overlap": args.overlap, "iterations": args.iterations}
    configs = {
        "rldfn untiled": {**base, "mode": "rldfn", "tile": "none"},
        f"rldfn tile {args.tile} overlap {args.overlap}": {**base, "mode": "rldfn", "tile": args.tile},
        f"classical {args.iterations} it": {**base, "mode": "classical", "tile": "none"},
    }
    print(f"# machine: {platform.machine()} {platform.system()}, torch {torch.__version__}, "
          f"threads {args.threads}, volume {'×'.join(map(str, args.shape))} (Z×Y×X), best of {args.repeat}")
    results, outputs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in configs.items():
            cfg["out"] = str(Path(tmp) / f"{len(results)}.npy")
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True,
                                  text=True, check=True, cwd=REPO)
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
            outputs[name] = np.load(cfg["out"])
            r = results[name]
            est = "" if r["estimate_bytes"] is None else f", estimated patch {r['estimate_bytes'] / 2**20:7.0f} MiB"
            print(f"{name:32s} {r['best_s']:8.2f} s   peak +{r['peak_bytes'] / 2**20:6.0f} MiB{est}   ({r['device']})")
    names = list(configs)
    whole, tiled = outputs[names[0]], outputs[names[1]]
    inner = (slice(6, -6),) * 3
    nrmse = np.sqrt(np.mean((tiled[inner] - whole[inner]) ** 2)) / np.ptp(whole[inner])
    print(f"tiled / untiled time ratio: {results[names[1]]['best_s'] / results[names[0]]['best_s']:.2f}")
    print(f"tiled / untiled peak memory ratio: {results[names[1]]['peak_bytes'] / results[names[0]]['peak_bytes']:.2f}")
    print(f"tiled vs untiled NRMSE (6 voxels from the border excluded): {nrmse:.4f}")
    print(f"classical / rldfn-untiled time ratio: {results[names[2]]['best_s'] / results[names[0]]['best_s']:.2f}")


if __name__ == "__main__":
    main()
