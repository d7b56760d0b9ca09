"""``rllsm watch``: subscribe to the live display stream and write each MIP as a PNG."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("watch", help="write the live MIPs of a running service as PNG files")
    p.add_argument("--connect", default="tcp://127.0.0.1:5556", metavar="ENDPOINT",
                   help="display stream of the service (default: %(default)s)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for <acquisition>_t00000_c0_mipz.png files")
    p.add_argument("--count", type=int, default=None, metavar="N", help="stop after N PNGs (default: run until ^C)")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="fail if no MIP arrives for S seconds (default: wait forever)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # The folder must be usable before any work (a resume state inside it is kept, by design).
    from pathlib import Path

    from streamer.cli.paths import check_output_dir

    check_output_dir(Path(args.out), ())
    from streamer.cli import CLIError
    from streamer.display import DisplayError, watch

    if args.count is not None and args.count < 1:
        raise CLIError(f"--count must be ≥ 1, got {args.count}")
    if args.timeout is not None and args.timeout <= 0:
        raise CLIError(f"--timeout must be > 0 seconds, got {args.timeout}")
    try:
        paths = watch(args.connect, args.out, count=args.count, timeout=args.timeout)
    except DisplayError as err:
        raise CLIError(str(err)) from None
    print(f"wrote {len(paths)} PNG(s) to {args.out}")
    return 0
