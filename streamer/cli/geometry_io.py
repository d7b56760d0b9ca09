"""Helpers shared by the geometry commands (deskew, preprocess, split-views): TIFF I/O and model flags."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ValidationError


def read_stack(path: Path, what: str = "stack") -> np.ndarray:
    """Read one 3-D (z, y, x) TIFF stack; every failure is a :class:`CLIError` saying what was expected."""
    import tifffile

    from streamer.cli import CLIError

    if not path.is_file():
        raise CLIError(f"{what} not found: {path}")
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shape = tuple(series.shape)
            if len(shape) != 3:
                raise CLIError(
                    f"{path}: {what} has shape {shape} ({len(shape)}-D); expected one 3-D (z, y, x) stack — "
                    "split channels/time points first"
                )
            data = series.asarray()
    except CLIError:
        raise
    except Exception as err:  # tifffile raises many types for a file that is not a TIFF
        raise CLIError(f"{path}: cannot read as a TIFF stack ({type(err).__name__}: {err})") from None
    if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)):
        raise CLIError(f"{path}: {what} holds {data.dtype} values; expected integer or floating-point intensities")
    return data


def write_stack(path: Path, data: np.ndarray, dtype: str) -> None:
    """Write a (z, y, x) stack as float32, or uint16 (values clipped to 0–65535, then truncated)."""
    import tifffile

    if dtype == "uint16":
        data = np.trunc(np.clip(data, 0, 65535)).astype(np.uint16)
    else:
        data = np.asarray(data, dtype=np.float32)
    from streamer.cli import CLIError

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(path, data, metadata={"axes": "ZYX"})
    except OSError as err:  # unwritable folder, disk full: the user's to fix, not a bug
        raise CLIError(f"cannot write {path}: {err.strerror or err}") from None


def write_report(path: Path, report: BaseModel) -> None:
    from streamer.cli import CLIError

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report.model_dump(mode="json"), indent=2) + "\n")
    except OSError as err:
        raise CLIError(f"cannot write {path}: {err.strerror or err}") from None


def progress_printer(command: str, quiet: bool = False) -> Callable[[str], None]:
    """A ``say(msg)`` that prints ``command: msg`` to stderr (stdout stays for results), or nothing when *quiet*."""

    def say(msg: str) -> None:
        if not quiet:
            print(f"{command}: {msg}", file=sys.stderr, flush=True)

    return say


@contextlib.contextmanager
def engine_errors(input_path: Path, *errors: type[Exception],
                  device_words: tuple[str, ...] = ("CUDA",)) -> Iterator[None]:
    """Report an engine's typed *errors* as a :class:`CLIError` naming *input_path*.

    A ``RuntimeError`` mentioning one of *device_words* ("CUDA" unavailable, out of memory on the device) is the
    user's choice of ``--device`` failing, so it is reported too; any other ``RuntimeError`` is a bug and keeps
    its traceback.
    """
    from streamer.cli import CLIError

    try:
        yield
    except errors as err:
        raise CLIError(f"{input_path}: {err}") from None
    except RuntimeError as err:
        if any(word in str(err) for word in device_words):
            raise CLIError(str(err)) from None
        raise


def _unwrap(ann: Any) -> Any:
    """``X | None`` → ``X``."""
    if isinstance(ann, types.UnionType) or typing.get_origin(ann) is typing.Union:
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        return args[0] if len(args) == 1 else ann
    return ann


def add_model_args(parser: argparse.ArgumentParser, model: type[BaseModel], title: str,
                   exclude: tuple[str, ...] = ("version",), prefix: str = "p_") -> None:
    """One flag per field of a pydantic params model (``--gs-window-px``), default None = model default."""
    group = parser.add_argument_group(title)
    for name, field in model.model_fields.items():
        if name in exclude:
            continue
        flag = "--" + name.replace("_", "-")
        ann = _unwrap(field.annotation)
        default = field.default
        help_text = f"{field.description or name} (default {default!r})"
        kw: dict[str, Any] = {"dest": prefix + name, "default": None, "help": help_text}
        origin = typing.get_origin(ann)
        if ann is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif origin is typing.Literal:
            kw["choices"] = list(typing.get_args(ann))
        elif origin is tuple:
            item = typing.get_args(ann)[0]
            kw.update(nargs=2, type=item, metavar=("LOW", "HIGH"))
        elif ann in (int, float):
            kw.update(type=ann, metavar="N" if ann is int else "X")
        else:  # pragma: no cover - every params field is one of the above
            kw["type"] = str
        group.add_argument(flag, **kw)


def model_from_args(args: argparse.Namespace, model: type[BaseModel], base: dict[str, Any] | None = None,
                    prefix: str = "p_", source: str = "parameters") -> Any:
    """Build ``model`` from ``base`` values overridden by the flags the user gave."""
    from engines.config import describe_validation_error
    from streamer.cli import CLIError

    values = dict(base or {})
    for name in model.model_fields:
        v = getattr(args, prefix + name, None)
        if v is not None:
            values[name] = tuple(v) if isinstance(v, list) else v
    try:
        return model(**values)
    except ValidationError as err:
        raise CLIError(describe_validation_error(err, source)) from None
