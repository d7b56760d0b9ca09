"""Shared CLI options: the optical configuration as a file plus one flag per field, and the memory budget."""

from __future__ import annotations

import argparse
import logging
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from engines.config import (
    ConfigError,
    OpticsConfig,
    describe_validation_error,
    load_optics,
    read_optics_mapping,
)
from engines.errors import RllsmError
from streamer.cli import CLIError

log = logging.getLogger(__name__)


def add_optics_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--config FILE`` and one ``--<field>`` flag per :class:`OpticsConfig` field."""
    group = parser.add_argument_group("optics (override the config file)")
    group.add_argument("--config", metavar="FILE", help="optics/acquisition config (.yaml, .toml or .json)")
    for name, field in OpticsConfig.model_fields.items():
        if name == "version":
            continue
        flag = "--" + name.replace("_", "-")
        ann = field.annotation
        default = field.default.value if isinstance(field.default, Enum) else field.default
        kwargs: dict[str, Any] = {"dest": f"optics_{name}", "default": None,
                                  "help": f"{field.description} (default: {default})"}
        if isinstance(ann, type) and issubclass(ann, Enum):
            kwargs["choices"] = [m.value for m in ann]
        else:
            kwargs["type"] = float
            kwargs["metavar"] = "X"
        group.add_argument(flag, **kwargs)


def optics_from_args(args: argparse.Namespace) -> OpticsConfig:
    """Resolve the config file and flag overrides into one validated :class:`OpticsConfig`."""
    overrides = {
        name: getattr(args, f"optics_{name}")
        for name in OpticsConfig.model_fields
        if getattr(args, f"optics_{name}", None) is not None
    }
    try:
        return load_optics(getattr(args, "config", None), overrides)
    except ConfigError as err:
        text = " ".join(str(err).split())
        for name in overrides:  # a value from a flag is named as the flag the user typed
            text = text.replace(f"field '{name}' =", f"--{name.replace('_', '-')} (field '{name}') =")
        raise CLIError(text) from None


def explicit_optics(args: argparse.Namespace) -> set[str]:
    """Optics fields the user stated: a flag, or a key of the ``--config`` file (not a default)."""
    given = {name for name in OpticsConfig.model_fields if getattr(args, f"optics_{name}", None) is not None}
    if getattr(args, "config", None):
        try:
            given |= set(read_optics_mapping(Path(args.config)))
        except ConfigError:
            pass  # optics_from_args has reported it already
    return given


def optics_with_voxel(args: argparse.Namespace, optics: OpticsConfig, voxel: tuple[float, float, float] | None,
                      what: str) -> OpticsConfig:
    """Fill pixel size and stage step from a raw stack's recorded voxel (z = stage step, x = pixel).

    What the user stated (flag or config file) wins; a contradiction with the file is logged as a warning.
    """
    if voxel is None:
        return optics
    stated = explicit_optics(args)
    update: dict[str, float] = {}
    for field, value in (("stage_step_um", voxel[0]), ("pixel_size_um", voxel[2])):
        if field in stated:
            if abs(getattr(optics, field) - value) > 1e-3 * value:
                log.warning("%s records %s = %.4g µm but %.4g µm was given; using the given value", what, field,
                            value, getattr(optics, field))
        else:
            update[field] = value
    if not update:
        return optics
    try:
        return OpticsConfig.model_validate({**optics.model_dump(), **update})
    except ValidationError as err:
        raise CLIError(f"{what}: recorded voxel size {voxel} µm is not usable: {describe_validation_error(err)}; "
                       "give --pixel-size-um/--stage-step-um") from None


def memory_budget_arg(text: str) -> float | None:
    """argparse ``type`` of ``--memory-budget``: MiB, or ``auto`` (→ None); a bad value is a one-line usage error."""
    from engines.support import parse_memory_budget

    try:
        return parse_memory_budget(text)
    except RllsmError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _deprecated_gb(text: str) -> float | None:
    """``--memory-budget-gb`` (GB = 1e9 bytes), kept hidden for old scripts: converted to MiB with a warning."""
    import warnings

    from engines.support import bytes_to_mib, parse_memory_budget

    try:
        gb = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of GB; use --memory-budget MIB instead") from None
    warnings.warn("--memory-budget-gb is deprecated; use --memory-budget in MiB "
                  f"(--memory-budget {bytes_to_mib(gb * 1e9):.0f})", FutureWarning, stacklevel=2)
    try:
        return parse_memory_budget(bytes_to_mib(gb * 1e9))
    except RllsmError as err:
        raise argparse.ArgumentTypeError(f"{text} GB: {err}") from None


def add_memory_budget_arg(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *,
                          deprecated_gb: bool = False) -> None:
    """``--memory-budget MIB|auto``, the same flag, unit, parser and help on every command that has a budget.

    The value lands in ``args.memory_budget``: MiB (:data:`engines.support.MemoryBudgetMiB`) or ``None`` for auto.
    *deprecated_gb* adds the old ``--memory-budget-gb`` as a hidden alias that converts and warns.
    """
    from engines.support import MEMORY_BUDGET_HELP

    parser.add_argument("--memory-budget", type=memory_budget_arg, default=None, metavar="MIB|auto",
                        dest="memory_budget", help=MEMORY_BUDGET_HELP)
    if deprecated_gb:
        parser.add_argument("--memory-budget-gb", type=_deprecated_gb, dest="memory_budget", metavar="GB",
                            help=argparse.SUPPRESS)
