"""The model-source flags (``--checkpoint``, ``--otf-dir``, ``--model``, ``--psf*``, ``--weights``), generated from
:class:`engines.sources.ReconSources` so that ``reconstruct``, ``serve`` and ``replay`` take exactly the same ones.

Each field of the model declares its flag and metavar (``json_schema_extra``); :func:`add_model_args` turns the
fields into argparse options (help text and default from the field) and :func:`sources_from_args` turns the parsed
flags back into a validated model. A new source added to the model appears in every command at once.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from engines.sources import ReconSources

_DEST = "model_"  # argparse dest prefix: keeps these apart from a command's own options


def _flag(name: str) -> str:
    extra = ReconSources.model_fields[name].json_schema_extra or {}
    return str(extra.get("flag") or "--" + name.replace("_", "-"))  # type: ignore[union-attr]


def source_fields(exclude: Iterable[str] = ()) -> list[str]:
    """Names of the source fields that become flags (``version`` and ``exclude`` left out)."""
    skip = {"version", *exclude}
    return [n for n in ReconSources.model_fields if n not in skip]


def add_model_args(parser: argparse.ArgumentParser, *, exclude: Iterable[str] = (),
                   title: str = "model sources (as for `rllsm reconstruct`)", dest_prefix: str = _DEST) -> None:
    """Add one flag per :class:`ReconSources` field; ``exclude`` names fields a command does not take.

    ``dest_prefix`` prefixes the attribute names (``args.model_checkpoint``); ``""`` gives ``args.checkpoint``.
    """
    group = parser.add_argument_group(title)
    for name in source_fields(exclude):
        field = ReconSources.model_fields[name]
        extra = field.json_schema_extra or {}
        kwargs: dict[str, Any] = {"dest": dest_prefix + name, "default": field.default, "help": field.description}
        metavar = extra.get("metavar")  # type: ignore[union-attr]
        args = typing.get_args(field.annotation)
        inner = next((a for a in args if a is not type(None)), field.annotation)
        if typing.get_origin(inner) is tuple:
            item = typing.get_args(inner)[0]
            kwargs.update(nargs=len(typing.get_args(inner)), type=item, metavar=tuple(metavar) if metavar else None)
        elif inner is Path or (isinstance(inner, type) and issubclass(inner, Path)):
            kwargs.update(type=Path, metavar=metavar)
        elif isinstance(inner, types.UnionType):  # not used today; refuse rather than guess
            raise TypeError(f"ReconSources.{name}: unsupported flag type {inner}")
        else:
            kwargs.update(type=inner, metavar=metavar)
        group.add_argument(_flag(name), **kwargs)


def sources_from_args(args: argparse.Namespace, dest_prefix: str = _DEST) -> ReconSources:
    """The parsed flags as a validated :class:`ReconSources` (a bad value is a one-line CLI error)."""
    from pydantic import ValidationError

    from engines.config import describe_validation_error
    from engines.sources import SourcesError
    from streamer.cli import CLIError

    data = {n: getattr(args, dest_prefix + n) for n in source_fields()
            if getattr(args, dest_prefix + n, None) is not None}
    try:
        return ReconSources.model_validate(data).check()
    except ValidationError as err:
        raise CLIError(describe_validation_error(err, "model sources")) from None
    except SourcesError as err:
        raise CLIError(str(err)) from None
