"""ONNX → TensorRT engine, validated on the golden data of the ONNX export (needs TensorRT and a GPU)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from engines.backends.engine_file import read_engine_file, write_engine_file
from engines.backends.manifest import Manifest, Precision, ValidationReport
from engines.backends.models import get_model
from engines.backends.trt_build import build_engine_file
from export.validate import FP32_MAX_REL, REDUCED_MIN_PSNR_DB, ExportValidationError, validate_against_golden

log = logging.getLogger(__name__)

ENGINE_MANIFEST_NAME = "engine-manifest.json"


def engine_file_name(manifest: Manifest) -> str:
    return f"{manifest.model_kind}.{manifest.precision.value}.engine"


def build_and_validate_engine(folder: Path, manifest: Manifest, golden: Mapping[str, Mapping[str, np.ndarray]],
                              n_profiles: int = 1, workspace_gib: float = 4.0, device_id: int = 0,
                              timing_cache: Path | None = None) -> Manifest:
    """Build ``<kind>.<precision>.engine`` in *folder* from the ONNX model there and validate it.

    The engine gets one optimisation profile per concurrent CUDA stream (*n_profiles*) from the manifest's shape
    ranges, reuses/updates a timing cache (default ``timing.cache`` beside the output folder, so repeated
    exports skip most auto-tuning), and carries its own manifest inside its header and in
    ``engine-manifest.json``.

    Raises
    ------
    ExportValidationError
        The engine's outputs differ from torch FP32 beyond the precision's criterion.
    """
    from engines.backends.trt_backend import TensorRTBackend

    folder = Path(folder)
    onnx_path = folder / manifest.model_file
    engine_path = folder / engine_file_name(manifest)
    if timing_cache is None:
        timing_cache = folder.parent / "timing.cache" if folder.name.startswith(".") else folder / "timing.cache"
    info = build_engine_file(onnx_path, engine_path, manifest.shape_ranges, manifest.precision,
                             manifest.onnx_sha256 or "", manifest=None, timing_cache=timing_cache,
                             workspace_gib=workspace_gib, n_profiles=n_profiles, device_id=device_id)
    spec = get_model(manifest.model_kind).spec
    backend = TensorRTBackend(engine_path, spec, device_id=device_id)
    try:
        cases = validate_against_golden(spec, golden, lambda xs: backend.forward(*xs), backend.describe(),
                                        manifest.precision)
    finally:
        backend.unload()
    fp32 = manifest.precision is Precision.FP32
    report = ValidationReport(
        reference=manifest.validation.reference, max_rel_error_limit=FP32_MAX_REL if fp32 else None,
        min_psnr_db=None if fp32 else REDUCED_MIN_PSNR_DB, cases=cases, resize_check=manifest.validation.resize_check,
        passed=bool(cases) and all(c.passed for c in cases))
    if not report.passed:
        engine_path.unlink(missing_ok=True)
        bad = "; ".join(f"{c.label}: max abs {c.max_abs_error:.3g}, PSNR {c.psnr_db} dB" for c in cases if not c.passed)
        raise ExportValidationError(f"TensorRT engine for {manifest.model_kind} failed validation: {bad}")
    engine_manifest = manifest.model_copy(update={
        "format": "engine", "model_file": engine_path.name, "onnx_file": manifest.model_file, "engine": info,
        "validation": report, "rebuild_command": manifest.rebuild_command.replace("--format onnx", "--format engine"),
    })
    Manifest.model_validate(engine_manifest.model_dump())  # model_copy skips validation; re-check the result
    _, _, plan = read_engine_file(engine_path)
    write_engine_file(engine_path, plan, info, engine_manifest.model_dump(mode="json"))
    (folder / ENGINE_MANIFEST_NAME).write_text(engine_manifest.to_json(), encoding="utf-8")
    log.info("engine %s validated: %s", engine_path.name, [(c.label, c.max_abs_error) for c in cases])
    return engine_manifest
