"""Helpers shared by the geometry commands (deskew, preprocess, split-views): TIFF I/O and model flags."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ValidationError

from streamer.cli import CLIError

_log = logging.getLogger(__name__)


#: A voxel size (z, y, x) in µm, as every TIFF we write records it and every step reads it back.
Voxel = tuple[float, float, float]


def _check_complete(tif: Any, series: Any, path: Path) -> None:
    """A file cut off while copying still parses; compare what the header promises with what is there."""
    size = path.stat().st_size
    need = 0
    if series.dataoffset is not None:
        need = int(series.dataoffset) + int(series.nbytes)
    else:
        for page in series.pages:
            if page is None:
                continue
            offsets, counts = getattr(page, "dataoffsets", ()), getattr(page, "databytecounts", ())
            need = max([need, *(int(o) + int(c) for o, c in zip(offsets, counts))])
    ij = tif.imagej_metadata or {}
    planes = int(np.prod(series.shape[:-2])) if len(series.shape) > 2 else 1
    if need > size or (ij.get("images") and int(ij["images"]) > planes):
        promised = f"{ij['images']} planes" if ij.get("images") else f"{need} bytes"
        raise CLIError(f"{path}: the TIFF is truncated (its header promises {promised}, the file holds "
                       f"{size} bytes); it was cut off while writing or copying — copy it again")


def read_stack_voxel(path: Path, what: str = "stack", *, min_planes: int = 1, check_values: bool = True,
                     needed_by: str = "this step") -> tuple[np.ndarray, Voxel | None]:
    """Read one 3-D (z, y, x) TIFF stack and the voxel size it records (None when it records none).

    Every failure is a :class:`CLIError` saying what was expected: a folder or a missing file, a file that is not
    a TIFF or is truncated, more or fewer than 3 axes, fewer than *min_planes* planes, a non-numeric dtype and
    (with *check_values*) NaN/infinite voxels or a stack with one value throughout.
    """
    import logging

    import tifffile

    from engines.support import check_stack
    from streamer.cli.paths import check_input_file

    check_input_file(path, what)
    tiff_log = logging.getLogger("tifffile")
    level = tiff_log.level
    tiff_log.setLevel(logging.CRITICAL)  # its warnings about a damaged file would be lines besides our one
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            _check_complete(tif, series, path)
            shape = tuple(series.shape)
            if len(shape) != 3:
                raise CLIError(
                    f"{path}: {what} has shape {shape} ({len(shape)}-D); expected one 3-D (z, y, x) stack — "
                    "split channels/time points first"
                )
            data = series.asarray()
            voxel = _voxel_of(tif)
    except CLIError:
        raise
    except Exception as err:  # tifffile raises many types for a file that is not a TIFF
        raise CLIError(f"{path}: cannot read as a TIFF stack ({type(err).__name__}: {err})") from None
    finally:
        tiff_log.setLevel(level)
    try:
        check_stack(data, what, min_planes=min_planes, check_values=check_values, needed_by=needed_by)
    except (ValueError, TypeError) as err:
        raise CLIError(f"{path}: {err}") from None
    return data, voxel


def read_stack(path: Path, what: str = "stack", *, min_planes: int = 1, check_values: bool = True,
               needed_by: str = "this step") -> np.ndarray:
    """:func:`read_stack_voxel` without the voxel size."""
    return read_stack_voxel(path, what, min_planes=min_planes, check_values=check_values, needed_by=needed_by)[0]


def read_voxel(path: Path) -> Voxel | None:
    """The voxel size a TIFF records, without reading its pixels; None when absent or unreadable."""
    import logging

    import tifffile

    tiff_log = logging.getLogger("tifffile")
    level = tiff_log.level
    tiff_log.setLevel(logging.CRITICAL)
    try:
        with tifffile.TiffFile(path) as tif:
            return _voxel_of(tif)
    except Exception:  # read_stack reports an unreadable file with its reason
        return None
    finally:
        tiff_log.setLevel(level)


def _voxel_of(tif: Any) -> Voxel | None:
    """(z, y, x) µm from ImageJ metadata (spacing + resolution) or OME pixel sizes; None when absent."""
    try:
        if tif.is_ome and tif.ome_metadata:
            import re

            def get(name: str) -> float | None:
                m = re.search(rf'{name}="([0-9.eE+-]+)"', tif.ome_metadata)
                return float(m.group(1)) if m else None

            z, y, x = get("PhysicalSizeZ"), get("PhysicalSizeY"), get("PhysicalSizeX")
            if z and y and x:
                return (z, y, x)
        ij = tif.imagej_metadata or {}
        page = tif.pages[0]
        if "spacing" in ij and "XResolution" in page.tags and "YResolution" in page.tags:
            xr, yr = page.tags["XResolution"].value, page.tags["YResolution"].value
            dx, dy = xr[1] / xr[0], yr[1] / yr[0]
            unit = str(ij.get("unit", "um")).lower()
            scale = {"um": 1.0, "micron": 1.0, "µm": 1.0, "nm": 1e-3, "mm": 1e3}.get(unit, 1.0)
            return (float(ij["spacing"]) * scale, dy * scale, dx * scale)
    except (KeyError, ValueError, ZeroDivisionError, TypeError, IndexError):
        return None
    return None


def write_stack(path: Path, data: np.ndarray, dtype: str, voxel_um: Voxel | None = None) -> None:
    """Write a (z, y, x) stack as float32, or uint16 (values clipped to 0–65535, then truncated).

    With *voxel_um* (z, y, x in µm) the file is an ImageJ hyperstack that records it, so Fiji/napari and the next
    ``rllsm`` step know the geometry. A failed write leaves no partial file behind.
    """
    import tifffile

    if dtype == "uint16":
        data = np.trunc(np.clip(data, 0, 65535)).astype(np.uint16)
    else:
        data = np.asarray(data, dtype=np.float32)
    kwargs: dict[str, Any] = {"metadata": {"axes": "ZYX"}}
    if voxel_um is not None:
        dz, dy, dx = (float(v) for v in voxel_um)
        kwargs = {"imagej": True, "resolution": (1.0 / dx, 1.0 / dy),
                  "metadata": {"axes": "ZYX", "spacing": dz, "unit": "um"}}
    tmp = path.with_name(f".{path.name}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(tmp, data, **kwargs)
        tmp.replace(path)  # the finished file appears at once: an interrupted write never looks like a result
    except OSError as err:  # unwritable folder, disk full: the user's to fix, not a bug
        raise CLIError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def voxel_from(args_value: Voxel | None, file_value: Voxel | None, what: str,
               default: Voxel | None = None) -> Voxel | None:
    """The voxel size to use: an explicit value wins (with a warning when the file says otherwise), then the file's."""
    if args_value is not None:
        if file_value is not None and not np.allclose(args_value, file_value, rtol=1e-3):
            _log.warning("%s: the flags give voxel %s µm but the file records %s µm; using the flags", what,
                         _fmt(args_value), _fmt(file_value))
        return args_value
    return file_value if file_value is not None else default


def _fmt(v: Voxel) -> str:
    return "×".join(f"{x:.4g}" for x in v)


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
