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
from pydantic import BaseModel, ConfigDict, Field, ValidationError

CONFIG_VERSION = 1


class SkewAxis(StrEnum):
    """Camera axis along which the sample-scan stack is sheared."""

    x = "x"
    y = "y"


class ConfigError(ValueError):
    """A configuration value is missing, unknown or outside its allowed range."""


class OpticsConfig(BaseModel):
    """Optical system and acquisition geometry of one reflective lattice light-sheet stack.

    Defaults follow the reference system (rotation/objective angle 30.8°, camera offset 100 counts,
    488 nm excitation).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)

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
    text = path.read_text()
    suffix = path.suffix.lower()
    if suffix == ".toml":
        data = tomllib.loads(text)
    elif suffix == ".json":
        data = json.loads(text)
    elif suffix in (".yaml", ".yml"):
        data = yaml.safe_load(text) or {}
    else:
        raise ConfigError(f"{path}: unknown config format '{suffix}' (use .yaml, .yml, .toml or .json)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of field names to values")
    # A file may hold several sections; the optics live under [optics] when present (under config.optics in the
    # simulator's metadata.json, so a simulated acquisition's metadata is a valid config file).
    if isinstance(data.get("config"), dict) and "optics" in data["config"]:
        data = data["config"]
    return dict(data.get("optics", data))


def load_optics(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> OpticsConfig:
    """Load an :class:`OpticsConfig` from YAML/TOML/JSON, then apply overrides (e.g. CLI flags).

    Raises
    ------
    ConfigError
        Naming each offending field, its value and the allowed range.
    """
    data: dict[str, Any] = {}
    source = "config"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        data = _read_mapping(p)
        source = str(p)
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return OpticsConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err, source)) from None
