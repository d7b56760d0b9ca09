"""Shared CLI options: the optical configuration as a file plus one flag per field."""

from __future__ import annotations

import argparse
from enum import Enum
from typing import Any

from engines.config import ConfigError, OpticsConfig, load_optics


def add_optics_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--config FILE`` and one ``--<field>`` flag per :class:`OpticsConfig` field."""
    group = parser.add_argument_group("optics (override the config file)")
    group.add_argument("--config", metavar="FILE", help="optics/acquisition config (.yaml, .toml or .json)")
    for name, field in OpticsConfig.model_fields.items():
        if name == "version":
            continue
        flag = "--" + name.replace("_", "-")
        ann = field.annotation
        kwargs: dict[str, Any] = {"dest": f"optics_{name}", "default": None, "help": field.description}
        if isinstance(ann, type) and issubclass(ann, Enum):
            kwargs["choices"] = [m.value for m in ann]
        else:
            kwargs["type"] = float
            kwargs["metavar"] = "X"
        group.add_argument(flag, **kwargs)


def optics_from_args(args: argparse.Namespace) -> OpticsConfig:
    """Resolve the config file and flag overrides into one validated :class:`OpticsConfig`."""
    from streamer.cli import CLIError

    overrides = {
        name: getattr(args, f"optics_{name}")
        for name in OpticsConfig.model_fields
        if getattr(args, f"optics_{name}", None) is not None
    }
    try:
        return load_optics(getattr(args, "config", None), overrides)
    except ConfigError as err:
        raise CLIError(str(err)) from None
