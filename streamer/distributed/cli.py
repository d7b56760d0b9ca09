"""The few lines the commands call: the ``--workers``/``--scheduler`` flags and the error translation."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of workers, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"--workers must be at least 1, got {n}")
    return n


def add_cluster_args(p: argparse.ArgumentParser, what: str, workers: bool = True) -> None:
    """``--workers N`` (an embedded cluster) and ``--scheduler ADDRESS`` (a running one), mutually exclusive."""
    g = p.add_mutually_exclusive_group()
    if workers:
        g.add_argument("--workers", type=_positive, metavar="N",
                       help=f"run on N local Dask worker processes (one per GPU where GPUs exist): {what}")
    g.add_argument("--scheduler", metavar="ADDRESS",
                   help="run on a running Dask scheduler, e.g. tcp://10.0.0.5:8786 (needs `pip install "
                   "rllsm-vsim[cluster]` on every worker and a filesystem they share)")


def run_reconstruct(args: argparse.Namespace, inputs: Sequence[Path], optics: Any = None) -> int:
    from streamer.cli import CLIError
    from streamer.distributed.errors import DistributedError
    from streamer.distributed.offline import reconstruct_distributed

    try:
        summary = reconstruct_distributed(args, inputs, optics, progress=not getattr(args, "no_progress", False))
    except DistributedError as err:
        raise CLIError(str(err)) from None
    print(json.dumps(summary.as_dict(), indent=1))
    return 1 if summary.failed else 0


def run_replay(args: argparse.Namespace, backend: Any, sources: Any = None, mode: str | None = None) -> int:
    """Print the report; exit status 1 when a volume failed (it is named there), else 0."""
    from streamer.cli import CLIError
    from streamer.distributed.errors import DistributedError
    from streamer.distributed.offline import replay_distributed

    try:
        report = replay_distributed(args.recording, args.out, workers=args.workers, scheduler=args.scheduler,
                                    mode=str(mode or args.mode), device=args.device, backend=backend,
                                    sources=sources, fused_depth=getattr(args, "fused_depth", None),
                                    memory_budget_mib=getattr(args, "memory_budget", None))
    except DistributedError as err:
        raise CLIError(str(err)) from None
    print(json.dumps(report, indent=1, default=str))
    return 1 if any(a["failed"] for a in report["acquisitions"].values()) else 0
