"""``rllsm replay``: re-send a recording to a service, or process it in this process."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("replay", help="re-send a recording to a service (--connect) or process it (--offline)")
    p.add_argument("recording", type=Path, help="recording folder written by `rllsm serve`")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--connect", metavar="ENDPOINT", help="service ingest endpoint, e.g. tcp://127.0.0.1:5555")
    g.add_argument("--offline", action="store_true", help="process in this process, without sockets")
    p.add_argument("--speed", default="original", help="original, max, or a factor such as 2 (default: original)")
    p.add_argument("--out", type=Path, help="output folder (with --offline)")
    p.add_argument("--format", dest="output_format", choices=["zarr", "tiff", "npy"], default="npy",
                   help="with --offline: OME-Zarr, OME-TIFF or .npy files, written exactly as `rllsm serve --format` "
                   "writes them (default %(default)s, the format to diff against a live run's npy output)")
    p.add_argument("--mode", choices=["auto", "full", "sr-rl", "classical", "deskew", "none"], default="auto",
                   help="with --offline: what to do with each stack (default %(default)s: the best that the "
                   "available weights support, as `rllsm serve`)")
    p.add_argument("--device", help="cpu, cuda (default: CUDA if present)")
    p.add_argument("--fused-depth", type=int, metavar="N",
                   help="with --offline: planes of the fused output grid, as for `rllsm serve`")
    p.add_argument("--stack-timeout", type=float, default=5.0, metavar="S", help="as for `rllsm serve`")
    p.add_argument("--keys", nargs=2, metavar=("CLIENT_SECRET", "SERVER_PUBLIC"), help="CURVE client keys")
    from streamer.distributed.cli import add_cluster_args

    add_cluster_args(p, "with --offline, one task per stack, each written to DIR/<acquisition>.ome.zarr, resumable")
    from streamer.cli.backend_options import add_backend_args
    from streamer.cli.model_options import add_model_args
    from streamer.cli.options import add_memory_budget_arg

    add_memory_budget_arg(p.add_argument_group("memory, with --offline"))
    add_model_args(p, title="model sources, with --offline (as for `rllsm reconstruct` and `serve`)")
    add_backend_args(p, device=False)  # --offline, networks: what runs them
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from engines.support import resolve_mode
    from streamer.cli import CLIError
    from streamer.pipeline import PipelineError
    from streamer.recording import RecordingError
    from streamer.replay import ReplayError, parse_speed, replay_offline, replay_to
    from streamer.outputs import CriticalOutputError
    from streamer.sinks.base import SinkError

    if not args.offline and (args.workers is not None or args.scheduler is not None):
        raise CLIError("--workers/--scheduler go with --offline (a service given with --connect runs its own)")
    try:
        if args.offline:
            if args.out is None:
                raise CLIError("--offline needs --out DIR")
            from streamer.cli.backend_options import backend_config_from_args
            from streamer.cli.model_options import sources_from_args

            src = sources_from_args(args)
            mode = resolve_mode(args.mode, vsisr=src.checkpoint is not None or src.weights is not None,
                                rldfn=src.model is not None or src.weights is not None)
            if args.workers is not None or args.scheduler is not None:  # one OME-Zarr per acquisition on Dask
                from streamer.distributed.cli import run_replay

                return run_replay(args, backend_config_from_args(args), src, mode)
            summary = replay_offline(args.recording, args.out, mode=mode, device=args.device,
                                     timeout_s=args.stack_timeout, sources=src,
                                     output_format=args.output_format, fused_depth=args.fused_depth,
                                     backend=backend_config_from_args(args), memory_budget_mib=args.memory_budget)
        else:
            keys = tuple(args.keys) if args.keys else None
            summary = replay_to(args.recording, args.connect, speed=parse_speed(args.speed), client_keys=keys)
    except (ReplayError, RecordingError, PipelineError, SinkError, CriticalOutputError) as err:
        raise CLIError(str(err)) from None
    print(json.dumps(summary, indent=1, default=str))
    return 0
