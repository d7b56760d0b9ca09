"""``rllsm export``: checkpoint → validated ONNX model (and TensorRT engine) with a manifest."""

from __future__ import annotations

import argparse

from engines.backends.manifest import Precision


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a network to ONNX / TensorRT, validated against torch",
                       description="Export VSI-SR or RL-DFN to ONNX (and optionally a TensorRT engine), validate it "
                                   "against torch on golden inputs and write manifest.json beside it.")
    p.add_argument("--model", required=True, choices=["vsi-sr", "rl-dfn"])
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="weights: .pth/.pt file (VSI-SR, RL-DFN rllsm format) or RL-DFN reference folder")
    from engines.support import ExportFormat

    p.add_argument("--format", choices=[f.value for f in ExportFormat], default=ExportFormat.ONNX.value,
                   help="engine = ONNX first, then a TensorRT engine (needs TensorRT and a GPU)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--precision", choices=[x.value for x in Precision], default="fp32",
                   help="arithmetic inside the network; inputs/outputs stay float32")
    for which in ("min", "opt", "max"):
        p.add_argument(f"--{which}-shape", metavar="NxCxHxW", default=None,
                       help=f"{which} input shape of the profile (e.g. 1x7x256x256; RL-DFN: 1x1x32x128x128)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (≥ 18; BF16 uses ≥ 22)")
    p.add_argument("--seed", type=int, default=0, help="seed of the golden inputs")
    p.add_argument("--streams", type=int, default=1, metavar="N",
                   help="TensorRT: optimisation profiles = CUDA streams served concurrently")
    p.add_argument("--workspace-gib", type=float, default=4.0, help="TensorRT builder workspace")
    from streamer.cli.paths import add_overwrite_arg

    add_overwrite_arg(p)
    p.add_argument("--no-progress", action="store_true", help="no progress messages")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from streamer.cli import CLIError
    from streamer.cli.paths import check_input_file, check_output_dir

    try:
        from engines.backends.errors import BackendError
        from export.api import export_model, parse_shape, resolve_ranges
        from export.onnx_export import ExportError
        from export.validate import ExportValidationError

        shapes = {w: parse_shape(getattr(args, f"{w}_shape")) if getattr(args, f"{w}_shape") else None
                  for w in ("min", "opt", "max")}
        ranges = resolve_ranges(args.model, shapes["min"], shapes["opt"], shapes["max"])
        # Flags first (cheap), then the files, all before the minutes of export.
        checkpoint = Path(args.checkpoint)
        if not checkpoint.is_dir():  # an RL-DFN reference checkpoint is a folder
            check_input_file(checkpoint, "--checkpoint")
        check_output_dir(Path(args.out), (f"{args.model}.onnx", "golden.npz", "manifest.json"),
                         overwrite=args.overwrite, what="export folder")
        manifest = export_model(args.model, args.checkpoint, args.out, fmt=args.format, precision=args.precision,
                                ranges=ranges, opset=args.opset, seed=args.seed, n_profiles=args.streams,
                                workspace_gib=args.workspace_gib, overwrite=args.overwrite,
                                progress=not args.no_progress)
    except (BackendError, ExportError, ExportValidationError) as err:
        raise CLIError(str(err)) from None
    except ValueError as err:  # the networks' own CheckpointError subclasses ValueError
        raise CLIError(str(err)) from None
    worst = max((c.max_abs_error for c in manifest.validation.cases), default=float("nan"))
    worst_rel = max((c.max_rel_error or 0.0 for c in manifest.validation.cases), default=float("nan"))
    print(f"exported {args.model} ({manifest.precision.value}, opset {manifest.opset}) to {args.out}: "
          f"{len(manifest.validation.cases)} golden cases passed, worst max abs error {worst:.3g} "
          f"({worst_rel:.2g} of the output's range)")
    return 0
