"""``rllsm bench``: throughput/latency of the networks per backend, with ratios measured side by side."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark the networks on each backend (per step and end to end)",
                       description="Measure latency, throughput, achieved FLOP/s and fraction of the device's peak (the faster "
                                   "of a large matmul and a 3×3 convolution, measured in the same run) for VSI-SR (Step 2) or RL-DFN on several backends in one interleaved run.")
    p.add_argument("--model", choices=["vsi-sr", "rl-dfn"], default="vsi-sr")
    p.add_argument("--volume", default="13x64x64", metavar="ZxYxX",
                   help="VSI-SR: deskewed stack Z×Y×X; RL-DFN: patch Z×Y×X (multiples of 4)")
    p.add_argument("--backends", default="torch,onnxruntime",
                   help="comma-separated, first is the baseline of the ratios "
                        "(torch, onnxruntime, onnxruntime-cuda, onnxruntime-tensorrt, tensorrt)")
    from engines.support import Precision

    p.add_argument("--precision", choices=[x.value for x in Precision], default=Precision.FP32.value)
    p.add_argument("--checkpoint", default=None, help="weights (default: random init — speed does not depend on them)")
    p.add_argument("--batch", type=int, default=4, help="VSI-SR windows per network call")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch and ONNX Runtime (0 = default)")
    p.add_argument("--device", default=None, help="torch device (default: CUDA when present)")
    p.add_argument("--no-end-to-end", action="store_true", help="only the network step")
    p.add_argument("--no-progress", action="store_true", help="no elapsed-time line on stderr")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from streamer.cli import CLIError

    from engines.backends.errors import BackendError
    from export.api import parse_shape
    from export.bench import bench

    for flag, value, low in (("--repeats", args.repeats, 1), ("--batch", args.batch, 1), ("--warmup", args.warmup, 0)):
        if value < low:
            raise CLIError(f"{flag} must be ≥ {low}, got {value}")
    from streamer.cli.progress import heartbeat

    try:
        shape = parse_shape(args.volume)
        if len(shape) != 3:
            raise CLIError(f"--volume needs Z×Y×X, got {args.volume}")
        with heartbeat(f"bench {args.model} ({args.backends})", disable=args.no_progress):
            result = bench(args.model, shape, [b.strip() for b in args.backends.split(",") if b.strip()],
                           precision=args.precision, checkpoint=args.checkpoint, batch=args.batch,
                           repeats=args.repeats, warmup=args.warmup, threads=args.threads, device=args.device,
                           end_to_end=not args.no_end_to_end)
    except (BackendError, ValueError) as err:
        raise CLIError(str(err)) from None
    print(f"rllsm bench --model {args.model} --volume {args.volume} --precision {args.precision}")
    print(result.table())
    return 0
