"""Store trained checkpoints as the package's float16 demo weights and check what the rounding costs.

``python -m engines.weights.pack VSISR.pth [RLDFN.pt]`` writes ``vsisr_demo.pt`` (and ``rldfn_demo.pt``) next to
this file, reloads them and prints the largest relative output change on a random input. VSI-SR alone comes first
when the RL-DFN demo is trained on views the demo VSI-SR made (``make_demo_weights.sh``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent


def _half(obj: dict) -> dict:
    out = dict(obj)
    out["state_dict"] = {k: v.half() if v.is_floating_point() else v for k, v in obj["state_dict"].items()}
    return out


def main(argv: list[str] | None = None) -> int:
    from engines.rldfn.checkpoint import load_rldfn
    from engines.vsisr.checkpoint import load_checkpoint

    args = (argv if argv is not None else sys.argv[1:])[:2]
    if not args:
        print("usage: python -m engines.weights.pack VSISR.pth [RLDFN.pt]", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    jobs = [(args[0], "vsisr_demo.pt", load_checkpoint, (torch.rand(1, 7, 32, 32),))]
    if len(args) > 1:
        jobs.append((args[1], "rldfn_demo.pt", load_rldfn, (torch.rand(1, 1, 16, 32, 32), torch.rand(1, 1, 16, 32, 32))))
    for src, dst, load, x in jobs:
        blob = torch.load(src, map_location="cpu", weights_only=True)
        torch.save(_half(blob), HERE / dst)
        full, half = load(src).eval(), load(HERE / dst).eval()
        with torch.no_grad():
            a, b = full(*x), half(*x)
        rel = float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))
        print(f"{dst}: {(HERE / dst).stat().st_size / 1e6:.2f} MB, max relative output change fp16 vs fp32 {rel:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
