"""The command line's promises beyond single error lines: geometry travels with the files, folders hold raw stacks
only, outputs are never silently replaced, -q is quiet, defaults agree across commands, a failed export leaves
nothing. Real files and the real ``main``; small stacks.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import tifffile

from engines.support import Mode, check_stack, default_mode
from streamer.cli import build_parser, main
from streamer.cli.geometry_io import read_stack_voxel, read_voxel, write_stack

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLLSM_DEVICE", "cpu")


def _raw(path: Path, dx: float = 0.1, dz: float = 0.3, shape: tuple[int, int, int] = (12, 24, 32)) -> np.ndarray:
    data = np.random.default_rng(1).integers(100, 2000, shape, dtype=np.uint16)
    tifffile.imwrite(path, data, imagej=True, resolution=(1 / dx, 1 / dx),
                     metadata={"axes": "ZYX", "spacing": dz, "unit": "um"})
    return data


def test_written_voxel_size_reads_back_in_our_reader_and_as_imagej(tmp_path: Path) -> None:
    data = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    write_stack(tmp_path / "v.tif", data, "float32", voxel_um=(0.25, 0.0617, 0.0617))
    got, voxel = read_stack_voxel(tmp_path / "v.tif")
    np.testing.assert_array_equal(got, data)
    assert voxel == pytest.approx((0.25, 0.0617, 0.0617), rel=1e-6)
    with tifffile.TiffFile(tmp_path / "v.tif") as tif:  # what Fiji reads
        assert tif.imagej_metadata["spacing"] == pytest.approx(0.25) and tif.imagej_metadata["unit"] == "um"
    assert not list(tmp_path.glob(".*partial")), "the temporary file is renamed, not left"


def test_deskew_takes_the_geometry_from_the_file_and_records_the_deskewed_voxel(tmp_path: Path) -> None:
    _raw(tmp_path / "raw.tif", dx=0.1, dz=0.3)
    assert main(["-q", "deskew", str(tmp_path / "raw.tif"), str(tmp_path / "d.tif")]) == 0
    dz, dy, dx = read_voxel(tmp_path / "d.tif")
    assert (dy, dx) == pytest.approx((0.1, 0.1)) and dz == pytest.approx(0.3 * math.sin(math.radians(30.8)))
    # The same numbers by hand give the same file: the recorded geometry is what was used.
    assert main(["deskew", str(tmp_path / "raw.tif"), str(tmp_path / "e.tif"), "--dx", "0.1", "--dz", "0.3"]) == 0
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "d.tif"), tifffile.imread(tmp_path / "e.tif"))
    # A flag that contradicts the file wins, with a warning.
    assert main(["deskew", str(tmp_path / "raw.tif"), str(tmp_path / "f.tif"), "--pixel-size-um", "0.2"]) == 0
    assert read_voxel(tmp_path / "f.tif")[2] == pytest.approx(0.2)


def test_lateral_sr_output_records_pixel_over_1_5(tmp_path: Path) -> None:
    from engines.vsisr.checkpoint import save_checkpoint
    from engines.vsisr.network import VSISR, VSISRConfig

    save_checkpoint(VSISR(VSISRConfig(n_groups=1, n_blocks=1)), tmp_path / "tiny.pth", layout="rllsm")
    rng = np.random.default_rng(2)
    write_stack(tmp_path / "d.tif", rng.random((9, 16, 20)) * 1000, "uint16", voxel_um=(0.1, 0.09, 0.09))
    assert main(["-q", "lateral-sr", str(tmp_path / "d.tif"), str(tmp_path / "sr.tif"), "--checkpoint",
                 str(tmp_path / "tiny.pth"), "--stride", "3"]) == 0
    assert read_voxel(tmp_path / "sr.tif") == pytest.approx((0.1, 0.06, 0.06))


def test_overwrite_is_refused_then_allowed_also_for_the_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    raw = _raw(tmp_path / "a.tif")
    assert main(["deskew", str(tmp_path / "a.tif"), str(tmp_path / "a.tif")]) == 2
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "a.tif"), raw)  # untouched
    assert "is the input" in capsys.readouterr().err
    assert main(["deskew", str(tmp_path / "a.tif"), str(tmp_path / "a.tif"), "--overwrite"]) == 0
    assert tifffile.imread(tmp_path / "a.tif").shape[2] > raw.shape[2]  # now the deskewed stack


def test_quiet_silences_progress_but_not_results(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _raw(tmp_path / "raw.tif", shape=(16, 32, 40))
    assert main(["preprocess", str(tmp_path / "raw.tif"), str(tmp_path / "p.tif")]) == 0
    loud = capsys.readouterr()
    assert "preprocess:" in loud.err and "wrote" in loud.out
    assert main(["preprocess", str(tmp_path / "raw.tif"), str(tmp_path / "q.tif"), "-q"]) == 0
    quiet = capsys.readouterr()
    assert quiet.err == "" and "wrote" in quiet.out


def test_folder_input_reconstructs_raw_stacks_only_with_their_geometry(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    sim, out = tmp_path / "sim", tmp_path / "out"
    assert main(["-q", "simulate", "--out", str(sim), "--shape", "48,96,96", "--structure", "beads",
                 "--pixel-size-um", "0.11"]) == 0
    assert {p.name for p in sim.glob("*.tif")} == {"raw_t0000.tif", "ground_truth_t0000.tif"}
    argv = ["-q", "reconstruct", str(sim), str(out), "--mode", "classical", "--iterations", "2"]
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["raw_t0000.json", "raw_t0000.tif"]
    summary = json.loads((out / "raw_t0000.json").read_text())
    assert summary["voxel_um"] == pytest.approx(0.11)  # from the raw file, no --config given
    assert read_voxel(out / "raw_t0000.tif") == pytest.approx((0.11, 0.11, 0.11))
    capsys.readouterr()
    assert main(argv) == 2 and "already holds raw_t0000.tif" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0


def test_every_reconstructing_command_defaults_to_the_same_rule() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in ("reconstruct", "serve", "replay", "demo", "fuse"):
        mode = next(a for a in sub.choices[name]._actions if a.dest == "mode")
        assert mode.default == "auto", name
    assert default_mode(vsisr=True, rldfn=True, demo_installed=True) is Mode.FULL
    assert default_mode(vsisr=True, rldfn=False, demo_installed=False) is Mode.SR_RL
    assert default_mode(vsisr=False, rldfn=False, demo_installed=True) is Mode.SR_RL
    assert default_mode(vsisr=False, rldfn=False, demo_installed=False) is Mode.CLASSICAL


def test_help_shows_defaults(capsys: pytest.CaptureFixture) -> None:
    for argv, shown in ((["reconstruct", "--help"], ["(default: 24)", "(default: *.tif*)", "(default: 0.0926)"]),
                        (["fuse", "--help"], ["default 1)", "(default: auto)"]),
                        (["bench", "--help"], ["(default: 13x64x64)", "(default: 1)"])):
        with pytest.raises(SystemExit):
            main(argv)
        text = " ".join(capsys.readouterr().out.split())
        for s in shown:
            assert s in text, (argv, s)


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_a_truncated_tiff_is_named_as_truncated(tmp_path: Path, cut: float) -> None:
    from streamer.cli import CLIError

    tifffile.imwrite(tmp_path / "s.tif", np.arange(8 * 32 * 32, dtype=np.uint16).reshape(8, 32, 32))
    full = (tmp_path / "s.tif").read_bytes()
    (tmp_path / "t.tif").write_bytes(full[: int(len(full) * cut)])  # the pixel data ends near 93 % of the file
    with pytest.raises(CLIError, match="truncated"):
        read_stack_voxel(tmp_path / "t.tif")


@pytest.mark.parametrize("data, words", [
    (np.zeros((0, 4, 4), np.float32), "empty"),
    (np.ones((3, 4, 4), bool), "bool"),
    (np.ones((4, 4), np.float32), "2-D"),
    (np.full((3, 4, 4), np.nan, np.float32), "48 NaN"),
    (np.full((3, 4, 4), 5, np.uint16), "single value 5"),
])
def test_check_stack_refuses_what_no_step_can_use(data: np.ndarray, words: str) -> None:
    with pytest.raises((ValueError, TypeError), match=words):
        check_stack(data, "stack")


def test_a_failed_export_leaves_no_folder_behind(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from engines.vsisr.checkpoint import save_checkpoint
    from engines.vsisr.network import VSISR, VSISRConfig

    save_checkpoint(VSISR(VSISRConfig(n_groups=1, n_blocks=1)), tmp_path / "tiny.pth", layout="rllsm")
    out = tmp_path / "new" / "deeper" / "export"
    # BF16 ONNX cannot run on ONNX Runtime's CPU provider: the export stops after the ONNX file was made.
    code = main(["-q", "export", "--model", "vsi-sr", "--checkpoint", str(tmp_path / "tiny.pth"), "--out", str(out),
                 "--precision", "bf16", "--min-shape", "1x7x16x16", "--opt-shape", "1x7x16x16",
                 "--max-shape", "1x7x24x24"])
    assert code == 2, capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_an_interrupted_export_leaves_nothing_behind(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import export.api
    from engines.vsisr.checkpoint import save_checkpoint
    from engines.vsisr.network import VSISR, VSISRConfig

    save_checkpoint(VSISR(VSISRConfig(n_groups=1, n_blocks=1)), tmp_path / "tiny.pth", layout="rllsm")

    def ctrl_c(*args: object, **kwargs: object) -> None:  # Ctrl-C while the exported graph is being checked
        raise KeyboardInterrupt

    monkeypatch.setattr(export.api, "check_structure", ctrl_c)
    out = tmp_path / "made" / "export"
    code = main(["-q", "export", "--model", "vsi-sr", "--checkpoint", str(tmp_path / "tiny.pth"), "--out", str(out),
                 "--min-shape", "1x7x16x16", "--opt-shape", "1x7x16x16", "--max-shape", "1x7x24x24"])
    assert code == 130 and "interrupted" in capsys.readouterr().err
    assert not (tmp_path / "made").exists()


def test_split_views_takes_dx_from_the_file_as_written_after_lateral_sr(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """A lateral-SR output records pixel / 1.5; split-views must use it without a hand-computed --dx."""
    sim = tmp_path / "sim"
    assert main(["-q", "simulate", "--out", str(sim), "--shape", "48,96,96", "--structure", "beads",
                 "--seed", "2"]) == 0
    assert main(["-q", "preprocess", str(sim / "raw_t0000.tif"), str(tmp_path / "pre.tif")]) == 0
    dz, _, dx = read_voxel(tmp_path / "pre.tif")
    # The same volume declared on a 1.5× finer lateral grid, as `rllsm lateral-sr` writes its output.
    finer = (dz, dx / 1.5, dx / 1.5)
    write_stack(tmp_path / "sr.tif", tifffile.imread(tmp_path / "pre.tif"), "uint16", voxel_um=finer)
    assert main(["-q", "split-views", str(tmp_path / "sr.tif"), str(tmp_path / "v")]) == 0
    report = json.loads((tmp_path / "v" / "report.json").read_text())
    assert report["voxel_um"] == pytest.approx(dx / 1.5)
    assert read_voxel(tmp_path / "v" / "view_A.tif") == pytest.approx((dx / 1.5,) * 3)
    # An explicit flag still wins, with a warning naming the contradiction.
    with caplog.at_level("WARNING"):
        assert main(["-q", "split-views", str(tmp_path / "sr.tif"), str(tmp_path / "w"), "--dx", str(dx)]) == 0
    assert json.loads((tmp_path / "w" / "report.json").read_text())["voxel_um"] == pytest.approx(dx)
    assert "using the flags" in caplog.text
