"""The manifest that travels beside every exported model: what it is, what it accepts, how it was checked.

It is a small versioned document (``manifest.json``) — the arrays (golden inputs and outputs) live beside it in
``golden.npz``, never inside.  The runtime reads it to learn I/O names, shape ranges and divisibility rules, so a
backend can reject a bad input with the valid range in the message instead of failing deep inside a kernel.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from engines.backends.errors import ModelSourceError
from engines.support import Precision, StrictModel

MANIFEST_NAME = "manifest.json"


_Strict = StrictModel  # Precision and the base model live in engines.support, the project's one vocabulary


class TensorInfo(_Strict):
    """One named input or output of the network."""

    name: str = Field(min_length=1)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    layout: str = Field(description="Axis letters, e.g. 'NCHW' or 'NCDHW'.")
    shape: list[int | str] = Field(description="Fixed sizes as ints, dynamic axes by name, e.g. ['N', 7, 'H', 'W'].")

    @model_validator(mode="after")
    def _rank_matches_layout(self) -> "TensorInfo":
        if len(self.shape) != len(self.layout):
            raise ValueError(f"tensor '{self.name}': shape {self.shape} has {len(self.shape)} axes, "
                             f"layout '{self.layout}' has {len(self.layout)}")
        return self


class ShapeRange(_Strict):
    """Smallest, optimal (tuned for) and largest full shape of one input."""

    min: list[int]
    opt: list[int]
    max: list[int]

    @model_validator(mode="after")
    def _ordered(self) -> "ShapeRange":
        if not len(self.min) == len(self.opt) == len(self.max):
            raise ValueError(f"min/opt/max shapes have different ranks: {self.min}, {self.opt}, {self.max}")
        for lo, mid, hi in zip(self.min, self.opt, self.max):
            if not 1 <= lo <= mid <= hi:
                raise ValueError(f"need 1 ≤ min ≤ opt ≤ max on every axis, got min {self.min}, opt {self.opt}, "
                                 f"max {self.max}")
        return self


class Normalisation(_Strict):
    """What the caller must do to the data before and after the network (the graph itself does nothing)."""

    in_graph: Literal[False] = False
    input: str = Field(description="Scaling the caller applies to the input.")
    output: str = Field(description="How to read the output.")
    golden_input_range: tuple[float, float] = Field((0.0, 1.0), description="Value range of the golden inputs.")


class ValidationCase(_Strict):
    """One comparison of the exported model against torch FP32 on a golden input."""

    label: str = Field(description="'min', 'opt', 'max' or 'odd'.")
    shapes: dict[str, list[int]]
    runtime: str = Field(description="What ran the exported model, e.g. 'onnxruntime-cpu 1.22'.")
    max_abs_error: float = Field(ge=0)
    max_rel_error: float | None = Field(
        None, ge=0, description="Max abs error / the reference output's dynamic range (the FP32 criterion).")
    psnr_db: float | None = Field(None, description="PSNR of the output against torch FP32 (None where exact).")
    passed: bool


class ValidationReport(_Strict):
    """All comparisons made before the model was declared usable."""

    reference: str = Field(description="What produced the reference outputs.")
    max_abs_error_limit: float | None = Field(None, ge=0, description="Former FP32 criterion (absolute).")
    max_rel_error_limit: float | None = Field(
        None, ge=0, description="FP32 criterion: max abs error relative to the output's dynamic range.")
    min_psnr_db: float | None = Field(None, ge=0, description="Reduced-precision criterion.")
    cases: list[ValidationCase]
    checker: Literal["onnx.checker (full_check) + strict shape inference"] = (
        "onnx.checker (full_check) + strict shape inference")
    resize_check: str | None = Field(None, description="Result of the constant-scale Resize check, if relevant.")
    passed: bool


class Versions(_Strict):
    """Software that produced (and validated) the files."""

    python: str
    torch: str
    onnx: str | None = None
    onnxruntime: str | None = None
    onnxscript: str | None = None
    tensorrt: str | None = None
    rllsm_vsim: str


class EngineInfo(_Strict):
    """What a TensorRT engine was built for; its fields are the engine cache key."""

    cache_key: str = Field(pattern=r"^[0-9a-f]{64}$")
    onnx_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    tensorrt_version: str
    compute_capability: str = Field(pattern=r"^\d+\.\d+$")
    precision: Precision
    profile: dict[str, ShapeRange]
    strongly_typed: bool
    timing_cache: str | None = None


class Manifest(_Strict):
    """``manifest.json`` of an exported model (ONNX file or TensorRT engine)."""

    version: Literal[1] = 1
    model_kind: str = Field(description="'vsi-sr' or 'rl-dfn'.")
    format: Literal["onnx", "engine"]
    model_file: str = Field(description="File name of the model, relative to the manifest.")
    onnx_file: str | None = Field(None, description="ONNX file an engine was built from (relative).")
    onnx_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    golden_file: str | None = Field(None, description="Golden inputs and outputs (.npz), relative.")
    checkpoint_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    checkpoint_name: str
    opset: int = Field(ge=18)
    precision: Precision
    inputs: list[TensorInfo] = Field(min_length=1)
    outputs: list[TensorInfo] = Field(min_length=1)
    shape_ranges: dict[str, ShapeRange]
    divisibility: dict[str, int] = Field(description="Axis letter → the size must be a multiple of this.")
    normalisation: Normalisation
    validation: ValidationReport
    versions: Versions
    engine: EngineInfo | None = None
    rebuild_command: str
    created_utc: str

    @model_validator(mode="after")
    def _ranges_cover_inputs(self) -> "Manifest":
        names = {t.name for t in self.inputs}
        if set(self.shape_ranges) != names:
            raise ValueError(f"shape_ranges names {sorted(self.shape_ranges)} ≠ inputs {sorted(names)}")
        return self

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"

    def write(self, directory: Path) -> Path:
        """Write ``manifest.json`` into *directory* and return its path."""
        path = Path(directory) / MANIFEST_NAME
        path.write_text(self.to_json(), encoding="utf-8")
        return path


def read_manifest(path: Path) -> Manifest:
    """Load and validate a manifest (a ``manifest.json`` file or the directory holding one).

    Raises
    ------
    ModelSourceError
        The file is missing, not JSON, or does not follow the manifest schema.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise ModelSourceError(f"no model manifest at {path}; create one with `rllsm export`")
    try:
        return Manifest.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, ValidationError) as err:
        raise ModelSourceError(f"{path} is not a valid rllsm model manifest: {err}") from None
