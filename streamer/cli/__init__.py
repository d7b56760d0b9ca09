"""The ``rllsm`` command line: a thin layer over plain functions that tests call too.

Each command lives in its own module exposing ``register(subparsers)``; the module is imported only
when the CLI starts, and heavy imports happen inside the command's function.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Sequence

from streamer import __version__

# Sub-commands are the modules ``streamer/cli/*_cmd.py``; this order comes first in --help, the rest after.
HELP_ORDER: tuple[str, ...] = (
    "demo", "serve", "simulate", "replay", "watch", "status",
    "deskew", "preprocess", "lateral_sr", "split_views", "fuse", "reconstruct",
    "export", "bench", "prepare_data", "finetune", "train_meta", "train_fusion", "config",
)


def command_modules() -> list[str]:
    """Names of the command modules, discovered so that adding a command touches no shared file."""
    found = [m.name[: -len("_cmd")] for m in pkgutil.iter_modules(__path__) if m.name.endswith("_cmd")]
    rank = {name: i for i, name in enumerate(HELP_ORDER)}
    found.sort(key=lambda n: (rank.get(n, len(rank)), n))
    return [f"{__name__}.{n}_cmd" for n in found]


class CLIError(Exception):
    """An error the user can fix; printed without a traceback, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rllsm",
        description="Real-time Meta-rLLS-VSIM reconstruction for reflective lattice light-sheet microscopy.",
    )
    parser.add_argument("--version", action="version", version=f"rllsm-vsim {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in command_modules():
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CLIError as err:
        print(f"rllsm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rllsm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
