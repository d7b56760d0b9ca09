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
    p.add_argument("--repeats", type=int, default=None, help="timed runs (default 5; --report: 2)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch and ONNX Runtime (0 = default)")
    p.add_argument("--device", default=None, help="torch device (default: CUDA when present)")
    p.add_argument("--no-end-to-end", action="store_true", help="only the network step")
    g = p.add_argument_group("whole-pipeline report (--report)")
    g.add_argument("--report", metavar="DIR", default=None,
                   help="instead of the network table: measure the whole reconstruction (each mode and precision, "
                        "the live service fed by the simulator, GPU-vs-CPU parity, the gpu-marked tests) and write "
                        "DIR/report.json and DIR/report.md; < 8 min on one H100/H200; without a GPU it says so and "
                        "measures the CPU at a small size")
    g.add_argument("--size", default=None, metavar="ZxYxX",
                   help="raw stack of the report (default 101x768x768 on a GPU, 32x64x64 on the CPU)")
    g.add_argument("--modes", default=None,
                   help="report: modes to time (default classical,sr-rl,full on a GPU, classical on the CPU)")
    g.add_argument("--precisions", default=None,
                   help="report: network precisions (default fp32,bf16,fp16 on a GPU, fp32 on the CPU)")
    g.add_argument("--live-stacks", type=int, default=None, help="report: stacks streamed per mode (GPU 5, CPU 2)")
    g.add_argument("--budget-s", type=float, default=420.0,
                   help="report: time budget; configurations that would not fit are listed as skipped")
    g.add_argument("--no-tests", action="store_true", help="report: do not run the gpu-marked tests")
    from streamer.cli.options import add_memory_budget_arg

    add_memory_budget_arg(g)
    p.add_argument("--no-progress", action="store_true", help="no elapsed-time line on stderr")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from engines.backends.errors import BackendError
    from export.api import parse_shape
    from export.bench import bench
    from streamer.cli import CLIError

    for flag, value, low in (("--repeats", args.repeats, 1), ("--batch", args.batch, 1), ("--warmup", args.warmup, 0),
                             ("--live-stacks", args.live_stacks, 1)):
        if value is not None and value < low:
            raise CLIError(f"{flag} must be ≥ {low}, got {value}")
    if args.report is not None:
        return _report(args)
    args.repeats = 5 if args.repeats is None else args.repeats
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


def _report(args: argparse.Namespace) -> int:
    from export.api import parse_shape
    from streamer.bench_report import ReportError, run_report
    from streamer.cli import CLIError

    if args.budget_s <= 0:
        raise CLIError(f"--budget-s must be > 0, got {args.budget_s:g}")
    try:
        size = tuple(parse_shape(args.size)) if args.size else None
        if size is not None and len(size) != 3:
            raise CLIError(f"--size needs Z×Y×X, got {args.size}")
        report = run_report(
            args.report, size=size,
            modes=tuple(m.strip() for m in args.modes.split(",") if m.strip()) if args.modes else None,
            precisions=tuple(p.strip() for p in args.precisions.split(",") if p.strip()) if args.precisions else None,
            repeats=args.repeats or 2, live_stacks=args.live_stacks, budget_s=args.budget_s,
            run_tests=not args.no_tests, device=args.device, memory_budget_mib=args.memory_budget)
    except (ReportError, ValueError, RuntimeError) as err:
        raise CLIError(str(err)) from None
    print(f"report written to {args.report}/report.md and report.json ({report['wall_s']} s)"
          + ("" if report["gpu"] else f"; {report['note']}"))
    return 0
