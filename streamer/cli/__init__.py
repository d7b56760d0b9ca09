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
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

from engines.errors import RllsmError
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


class CLIError(RllsmError):
    """An error the user can fix; printed as one line without a traceback, exit status 2."""


class _DefaultsFormatter(argparse.HelpFormatter):
    """Show each option's default in ``--help`` unless the text already names it or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or default in (None, False, argparse.SUPPRESS) or "default" in text.lower()
                or "%(default)" in text or isinstance(action, argparse._HelpAction)):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line naming the command and pointing at its ``--help``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _add_global_flags(parser: argparse.ArgumentParser, default: Any) -> None:
    """``--debug`` and ``-q``; on a sub-command too, so that ``rllsm fuse ... -q`` works as ``rllsm -q fuse ...``."""
    parser.add_argument("--debug", action="store_true", default=default,
                        help="show the full traceback of an error (and debug log output)")
    parser.add_argument("-q", "--quiet", action="store_true", default=default,
                        help="no progress bars or progress messages (results and errors still print)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="rllsm",
        description="Real-time Meta-rLLS-VSIM reconstruction for reflective lattice light-sheet microscopy.",
    )
    parser.add_argument("--version", action="version", version=f"rllsm-vsim {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    _add_global_flags(parser, False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in command_modules():
        importlib.import_module(name).register(sub)
    for p in sub.choices.values():
        p.formatter_class = _DefaultsFormatter
        for action in p._actions:  # argparse prints no help line at all for a flag without help text
            if action.option_strings and action.help is None and action.default not in (None, False):
                action.help = "(default: %(default)s)"
        # SUPPRESS: a sub-command's unset flag must not reset the value given before the command name.
        _add_global_flags(p, argparse.SUPPRESS)
    return parser


def one_line(err: BaseException) -> str:
    """The error's text on one line (pydantic and some libraries write several)."""
    if isinstance(err, OSError) and not isinstance(err, RllsmError) and err.strerror:
        text = f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; every expected failure is one line on stderr and exit status 2.

    Exit status: 0 done, 1 an unexpected error (a bug: rerun with ``--debug`` for the traceback), 2 a mistake
    in the command line, the inputs or the environment that the message names, 130 interrupted.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.debug else logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.quiet:  # every command's own progress switch follows the global one
        args.no_progress = True
    name = f"rllsm {args.command}"
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except (RllsmError, OSError, MemoryError) as err:
        # Ours are typed and say what to do; OSError is the file system's answer (permission, disk full).
        if args.debug:
            traceback.print_exc()
        hint = "; reduce the volume or use --tile N to work in pieces" if isinstance(err, MemoryError) else ""
        print(f"{name}: error: {one_line(err)}{hint}", file=sys.stderr)
        return 2
    except Exception as err:  # a bug or a failure nobody anticipated: say so, keep the traceback behind --debug
        if args.debug:
            traceback.print_exc()
        print(f"{name}: error: unexpected {type(err).__name__}: {one_line(err)[:500]} "
              f"(rerun with --debug for the traceback, and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
