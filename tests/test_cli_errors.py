"""Every row of docs/errors.md is run through the real CLI and must print exactly the documented line.

The table is the specification: each mistake gives one line ``rllsm CMD: error: …`` on stderr, exit status 2, no
traceback, and writes nothing. The files the rows name are built here, small and deterministic.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "errors.md"
ROW = re.compile(r"^\|\s*(\d+)\s*\|(.+?)\|\s*`(rllsm [^`]+)`\s*\|\s*`([^`]+)`\s*\|\s*$")


def doc_rows() -> list[tuple[int, str, str, str]]:
    rows = []
    for line in DOC.read_text().splitlines():
        m = ROW.match(line)
        if m:
            rows.append((int(m.group(1)), m.group(2).strip(), m.group(3), m.group(4).replace("\\|", "|")))
    return rows


ROWS = doc_rows()


def build_files(d: Path) -> None:
    """The inputs the table's commands name (``{d}`` in the table)."""
    rng = np.random.default_rng(0)
    raw = rng.integers(100, 1000, (8, 16, 24), dtype=np.uint16)
    tifffile.imwrite(d / "raw.tif", raw, imagej=True, resolution=(10.0, 10.0),
                     metadata={"axes": "ZYX", "spacing": 0.2, "unit": "um"})
    tifffile.imwrite(d / "existing.tif", raw)
    tifffile.imwrite(d / "thin.tif", raw[:3])
    tifffile.imwrite(d / "plane.tif", raw[0])
    tifffile.imwrite(d / "hyper.tif", np.stack([raw, raw]), metadata={"axes": "CZYX"})
    nan = rng.random((8, 16, 24)).astype(np.float32)
    nan.reshape(-1)[::100] = np.nan
    tifffile.imwrite(d / "nan.tif", nan)
    inf = rng.random((8, 16, 24)).astype(np.float32)
    inf[0, 0, 0] = np.inf
    tifffile.imwrite(d / "inf.tif", inf)
    tifffile.imwrite(d / "zeros.tif", np.zeros((8, 16, 24), np.uint16))
    tifffile.imwrite(d / "flat.tif", np.full((8, 16, 24), 7.5, np.float32))
    tifffile.imwrite(d / "complex.tif", (rng.random((8, 16, 24)) + 1j).astype(np.complex64))
    full = (d / "raw.tif").read_bytes()
    (d / "truncated.tif").write_bytes(full[: len(full) // 2])
    (d / "notes.tif").write_text("exposure 10 ms, 488 nm\n")
    (d / "file").write_text("a file where a folder is expected\n")
    (d / "bad.yaml").write_text("pixel_size_um: [0.1, 0.2\nstage_step_um: 0.2\n")
    (d / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (d / "unknown.yaml").write_text("pixel_size_um: 0.1\nzoom: 2\n")
    (d / "range.yaml").write_text("na_detection: 5\n")
    (d / "cfg.ini").write_text("[optics]\npixel_size_um = 0.1\n")
    (d / "cfgdir.yaml").mkdir()
    views = rng.random((12, 16, 16)).astype(np.float32) + 0.1
    tifffile.imwrite(d / "view_a.tif", views)
    tifffile.imwrite(d / "view_b.tif", views[::-1].copy())
    tifffile.imwrite(d / "view_small.tif", views[:, :12].copy())
    (d / "gt").mkdir()
    tifffile.imwrite(d / "gt" / "ground_truth_t0000.tif", raw.astype(np.float32))
    (d / "sim").mkdir()
    tifffile.imwrite(d / "sim" / "raw_t0000.tif", raw)
    (d / "split").mkdir()
    tifffile.imwrite(d / "split" / "view_A.tif", raw)
    (d / "export").mkdir()
    for name in ("vsi-sr.onnx", "golden.npz", "manifest.json"):
        (d / "export" / name).write_text("{}")
    (d / "simout").mkdir()
    (d / "simout" / "metadata.json").write_text("{}")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("errors")
    build_files(d)
    return d


def _listing(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


def test_the_table_has_at_least_30_distinct_rows() -> None:
    numbers = [r[0] for r in ROWS]
    assert len(ROWS) >= 30 and numbers == list(range(1, len(ROWS) + 1)), numbers
    assert len({r[2] for r in ROWS}) == len(ROWS), "each row is another command line"


@pytest.mark.parametrize("number, mistake, command, message", ROWS, ids=[f"{r[0]}-{r[1][:40]}" for r in ROWS])
def test_documented_mistake_gives_documented_line(files: Path, capsys: pytest.CaptureFixture[str], number: int,
                                                  mistake: str, command: str, message: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from streamer.cli import main

    monkeypatch.setenv("RLLSM_DEVICE", "cpu")
    before = _listing(files)
    argv = [a.replace("{d}", str(files)) for a in shlex.split(command)[1:]]
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's own usage errors
        code = stop.code
    err = capsys.readouterr().err
    want = message.replace("{d}", str(files))
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert code == 2, err
    assert errors == [want], f"row {number}: got\n{err}"
    assert "Traceback" not in err
    assert _listing(files) == before, f"row {number} left files behind"


@pytest.mark.parametrize("number", [1, 7, 19])
def test_rows_through_the_console_entry_point(files: Path, number: int) -> None:
    """A few rows in a fresh interpreter: the same line and exit status, and stderr holds nothing else."""
    _, _, command, message = ROWS[number - 1]
    argv = [a.replace("{d}", str(files)) for a in shlex.split(command)[1:]]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RLLSM_DEVICE": "cpu"}
    r = subprocess.run([sys.executable, "-m", "streamer", *argv], capture_output=True, text=True, env=env,
                       timeout=120, cwd=REPO)
    assert r.returncode == 2
    assert r.stderr.strip() == message.replace("{d}", str(files))


def test_debug_shows_the_traceback_and_a_bug_is_one_line_with_exit_1(
        files: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import streamer.cli.config_cmd as config_cmd
    from streamer.cli import main

    assert main(["--debug", "deskew", str(files / "nope.tif"), str(files / "o.tif")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().endswith(f"raw stack not found: {files / 'nope.tif'}")
    # A bug (not one of our typed errors) is exit status 1, one line, and points at --debug.
    monkeypatch.setattr(config_cmd, "run", lambda args: 1 / 0)
    assert main(["config"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unexpected ZeroDivisionError" in err[0] and "--debug" in err[0]
    assert main(["config", "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err
