"""Checks on the paths a command was given, run before any work so that no result is computed and then lost.

An output must be writable, must not be a folder when a file is expected (nor a file when a folder is), must not
already exist unless ``--overwrite`` was given, and must never be one of the inputs.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from engines.errors import RllsmFileNotFoundError, RllsmIOError, RllsmValueError

#: Folder inputs: what ``rllsm simulate`` writes as raw stacks, and any other TIFF not excluded below.
DEFAULT_PATTERN = "*.tif*"
#: Never raw data: the simulator's ground truth and the files our own commands write beside their outputs.
EXCLUDED_PATTERNS: tuple[str, ...] = (
    "ground_truth*", "*.preprocessed.tif*", "*.lateral_sr.tif*", "*.view_a.tif*", "*.view_b.tif*",
    "view_A.tif*", "view_B.tif*", "psf*.tif*", "*_psf.tif*", "OTF*.tif*", "apo_*.tif*",
)


def add_overwrite_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="replace outputs that already exist (without it an existing output is an error)")


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_can_create(path: Path, what: str, folder: bool = False) -> None:
    """*path* (a file, or with *folder* a folder) can be created: its nearest existing ancestor is a writable
    folder."""
    anc = _existing_ancestor(path if folder else path.parent)
    doing = f"cannot create the {what} {path}" if folder else f"cannot write {what} {path}"
    if not anc.is_dir():
        raise RllsmValueError(f"{doing}: {anc} is a file, not a folder; choose another path")
    try:  # access() says yes to root even on a read-only mount; creating a file is the real test
        with tempfile.TemporaryFile(dir=anc):
            pass
    except OSError as err:
        raise RllsmIOError(f"{doing}: {anc} is not writable ({err.strerror or err}); "
                           "choose another output folder") from None


def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output_file(path: Path, *, inputs: Iterable[Path] = (), overwrite: bool = False,
                      what: str = "output") -> Path:
    """Refuse, before any work, an output file that cannot or must not be written; returns *path*.

    Raises
    ------
    RllsmValueError
        *path* is a folder, is one of *inputs*, exists without *overwrite*, or sits below a file.
    RllsmIOError
        Its folder is not writable.
    """
    path = Path(path)
    if path.is_dir():
        raise RllsmValueError(f"{what} {path} is a folder; give a file name such as {path / 'result.tif'}")
    for src in inputs:
        if _same(path, Path(src)) and not overwrite:
            raise RllsmValueError(f"{what} {path} is the input {src}; write to another file "
                                  "(or pass --overwrite to replace the input)")
    if path.exists() and not overwrite:
        raise RllsmValueError(f"{what} {path} already exists; pass --overwrite to replace it, or choose another name")
    _check_can_create(path, what)
    return path


def check_output_dir(path: Path, names: Sequence[str] = (), *, inputs: Iterable[Path] = (),
                     overwrite: bool = False, what: str = "output folder") -> Path:
    """Refuse an output folder that is a file, or that already holds one of *names*, unless *overwrite*."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RllsmValueError(f"{what} {path} is a file; give a folder (it is created when missing)")
    for src in inputs:
        if _same(path, Path(src)) and not path.is_dir():
            raise RllsmValueError(f"{what} {path} is the input {src}")
    taken = [n for n in names if (path / n).exists()]
    if taken and not overwrite:
        more = " …" if len(taken) > 3 else ""
        raise RllsmValueError(f"{what} {path} already holds {', '.join(taken[:3])}{more}; pass --overwrite to "
                              "replace, or choose another folder")
    _check_can_create(path, what, folder=True)
    return path


def check_input_file(path: Path, what: str = "input") -> Path:
    """An existing regular file, or an error that says what *path* is instead."""
    path = Path(path)
    if path.is_dir():
        raise RllsmValueError(f"{what} {path} is a folder; this command takes one TIFF file")
    if not path.exists():
        raise RllsmFileNotFoundError(f"{what} not found: {path}")
    if not path.is_file():
        raise RllsmValueError(f"{what} {path} is not a regular file")
    return path


def folder_inputs(folder: Path, pattern: str = DEFAULT_PATTERN) -> list[Path]:
    """The raw stacks of *folder* matching *pattern*, without ground truth and our own outputs; sorted."""
    if not folder.is_dir():
        raise RllsmFileNotFoundError(f"input folder not found: {folder}")
    found = sorted(p for p in folder.iterdir() if p.is_file() and fnmatch.fnmatch(p.name, pattern)
                   and not any(fnmatch.fnmatch(p.name, x) for x in EXCLUDED_PATTERNS))
    if not found:
        raise RllsmValueError(f"no raw stacks matching --pattern '{pattern}' in {folder} (ground-truth files and "
                              "our own outputs are skipped); give a folder of raw TIFF stacks or another --pattern")
    return found
