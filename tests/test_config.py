from __future__ import annotations

import json
import subprocess
import sys

import pytest

from engines.config import ConfigError, OpticsConfig, SkewAxis, load_optics


def test_defaults_are_reference_system() -> None:
    cfg = OpticsConfig()
    assert cfg.objective_angle_deg == pytest.approx(30.8)
    assert cfg.camera_offset == 100
    assert cfg.skew_axis is SkewAxis.x


@pytest.mark.parametrize("suffix", [".yaml", ".toml", ".json"])
def test_load_file_and_override(tmp_path, suffix: str) -> None:
    path = tmp_path / f"optics{suffix}"
    if suffix == ".yaml":
        path.write_text("pixel_size_um: 0.1\nskew_axis: y\n")
    elif suffix == ".toml":
        path.write_text("[optics]\npixel_size_um = 0.1\nskew_axis = 'y'\n")
    else:
        path.write_text(json.dumps({"pixel_size_um": 0.1, "skew_axis": "y"}))
    cfg = load_optics(path, {"stage_step_um": 0.3, "wavelength_nm": None})
    assert cfg.pixel_size_um == 0.1
    assert cfg.skew_axis is SkewAxis.y
    assert cfg.stage_step_um == 0.3
    assert cfg.wavelength_nm == 488.0


def test_out_of_range_names_field_value_and_range() -> None:
    with pytest.raises(ConfigError) as exc:
        load_optics(None, {"na_detection": 2.5})
    msg = str(exc.value)
    assert "na_detection" in msg and "2.5" in msg and "1.7" in msg


def test_unknown_field_is_rejected(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("pixel_size: 0.1\n")
    with pytest.raises(ConfigError, match="unknown field 'pixel_size'"):
        load_optics(path)


def test_bad_enum_lists_choices() -> None:
    with pytest.raises(ConfigError, match="skew_axis"):
        load_optics(None, {"skew_axis": "z"})


def test_cli_reports_error_without_traceback() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "streamer", "config", "--na-detection", "3"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "na_detection" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_prints_resolved_config() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "streamer", "config", "--format", "json", "--skew-angle-deg", "31.5"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(proc.stdout)["skew_angle_deg"] == 31.5
