"""Versioned description of the optical system and the acquisition.

One model is shared by the simulator, the reconstruction steps and the stream: what the microscope did is
recorded once and every consumer reads the same numbers.
"""

from __future__ import annotations

import json
import tomllib
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError

from engines.errors import RllsmValueError
from engines.support import StrictModel

CONFIG_VERSION = 1


class SkewAxis(StrEnum):
    """Camera axis along which the sample-scan stack is sheared."""

    x = "x"
    y = "y"


class ConfigError(RllsmValueError):
    """A configuration value is missing, unknown or outside its allowed range."""


class OpticsConfig(StrictModel):
    """Optical system and acquisition geometry of one reflective lattice light-sheet stack.

    Defaults follow the reference system (rotation/objective angle 30.8°, camera offset 100 counts,
    488 nm excitation).
    """

    version: Literal[1] = CONFIG_VERSION
    pixel_size_um: float = Field(0.0926, gt=0.01, le=2.0, description="Camera pixel size in the sample (µm).")
    stage_step_um: float = Field(0.2, gt=0.0, le=10.0, description="Sample-scan stage step between planes (µm).")
    skew_angle_deg: float = Field(
        30.8, ge=-89.0, le=89.0, description="Angle between stage-scan direction and detection plane (degrees)."
    )
    skew_axis: SkewAxis = Field(SkewAxis.x, description="Camera axis along which the stack is sheared.")
    objective_angle_deg: float = Field(
        30.8, ge=0.0, le=89.0, description="Detection-objective tilt used to rotate and split the views (degrees)."
    )
    wavelength_nm: float = Field(488.0, ge=300.0, le=1100.0, description="Excitation wavelength (nm).")
    emission_nm: float = Field(525.0, ge=300.0, le=1200.0, description="Emission wavelength (nm).")
    camera_offset: float = Field(100.0, ge=0.0, le=65535.0, description="Camera offset (counts).")
    na_detection: float = Field(1.1, gt=0.0, le=1.7, description="Detection numerical aperture.")
    refractive_index: float = Field(1.33, ge=1.0, le=1.8, description="Refractive index of the immersion medium.")
    sheet_fwhm_um: float = Field(
        1.0, ge=0.0, le=20.0, description="Thickness (FWHM, µm) of the light sheet along the detection axis: a "
        "computed PSF is the detection PSF times this Gaussian, as a light-sheet system PSF is; 0: the widefield "
        "detection PSF alone. Measured PSFs already hold it.",
    )

    @property
    def deskewed_pixel_z_um(self) -> float:
        """Spacing of deskewed planes along the optical axis (µm)."""
        import math

        return self.stage_step_um * abs(math.sin(math.radians(self.skew_angle_deg)))


def describe_validation_error(err: ValidationError, source: str = "config") -> str:
    """Turn pydantic's report into sentences naming field, value and allowed range."""
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        value = e.get("input")
        ctx = e.get("ctx") or {}
        bounds = []
        for key, word in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤")):
            if key in ctx:
                bounds.append(f"{word} {ctx[key]}")
        allowed = f" (allowed: {' and '.join(bounds)})" if bounds else ""
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown field '{field}'")
        elif "expected" in ctx:
            lines.append(f"{source}: field '{field}' = {value!r} is not one of {ctx['expected']}")
        else:
            lines.append(f"{source}: field '{field}' = {value!r}: {e['msg']}{allowed}")
    return "; ".join(lines)


def _read_mapping(path: Path) -> dict[str, Any]:
    suffix = path.suffix.lower()
    if path.is_dir():
        raise ConfigError(f"config {path} is a folder; give a .yaml, .toml or .json file")
    if suffix not in (".toml", ".json", ".yaml", ".yml"):
        raise ConfigError(f"{path}: unknown config format '{suffix}' (use .yaml, .yml, .toml or .json)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (binary content); give a .yaml, .toml or .json config") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config ({err.strerror or err})") from None
    if "\x00" in text:
        raise ConfigError(f"{path}: not a text file (binary content); give a .yaml, .toml or .json config")
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text) or {}
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, yaml.YAMLError) as err:
        where = ""
        mark = getattr(err, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        elif getattr(err, "lineno", None):
            where = f" at line {err.lineno}, column {err.colno}"
        reason = getattr(err, "problem", None) or getattr(err, "msg", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: not valid {suffix.lstrip('.').upper()}{where}: {reason}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of field names to values")
    # A file may hold several sections; the optics live under [optics] when present (under config.optics in the
    # simulator's metadata.json, so a simulated acquisition's metadata is a valid config file).
    if isinstance(data.get("config"), dict) and "optics" in data["config"]:
        data = data["config"]
    optics = data.get("optics", data)
    if not isinstance(optics, dict):
        raise ConfigError(f"{path}: the 'optics' section must be a mapping of field names to values")
    return dict(optics)


def read_optics_mapping(path: Path) -> dict[str, Any]:
    """The optics fields a config file states (unvalidated); :class:`ConfigError` when it cannot be read."""
    if not path.is_file() and not path.is_dir():
        raise ConfigError(f"config file not found: {path}")
    return _read_mapping(path)


def load_optics(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> OpticsConfig:
    """Load an :class:`OpticsConfig` from YAML/TOML/JSON, then apply overrides (e.g. CLI flags).

    Raises
    ------
    ConfigError
        Naming each offending field, its value and the allowed range.
    """
    data: dict[str, Any] = {}
    source = "optics"
    if path is not None:
        p = Path(path)
        data = read_optics_mapping(p)
        source = str(p)
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return OpticsConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err, source)) from None
