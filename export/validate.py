"""Checks an exported model must pass before it is called done.

1. Structure: ``onnx.checker`` (full check) and strict shape inference.
2. Graph contract: every ``Resize`` takes a *constant* scale (for VSI-SR exactly 1.5 on y and x) and no
   ``sizes`` input — a size computed from the input shape would pin the graph to one shape or break TensorRT's
   shape analysis.
3. Numbers: golden inputs at the min, opt, max and an odd shape run through the exported model (ONNX Runtime,
   CPU) and through torch FP32; FP32 must agree to ≤ 1e-4 max abs error, FP16/BF16 must reach ≥ 50 dB PSNR.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from engines.backends.base import ModelSpec
from engines.backends.manifest import Precision, ShapeRange, ValidationCase
from engines.errors import RllsmRuntimeError

#: FP32 criterion: max |exported − torch| ≤ FP32_MAX_REL × the reference output's dynamic range (max − min).
#: Relative, because the absolute error of a correct FP32 export grows with the output's scale: both runtimes
#: round each product and sum in another order, ~1e-7 relative per operation, accumulated over thousands of terms
#: per output voxel. The demo VSI-SR (outputs spanning ~9) differs from torch by 2e-4 absolute = 2e-5 of its
#: range at 2×7×768×768; a wrong graph (another resize mode, a missing layer) is off by > 1e-2 of the range.
FP32_MAX_REL = 1e-4
#: Kept for callers comparing outputs of unit scale, where the relative criterion means the same.
FP32_MAX_ABS = 1e-4
REDUCED_MIN_PSNR_DB = 50.0


class ExportValidationError(RllsmRuntimeError):
    """The exported model failed a check; the message holds the figures."""


def check_structure(path: Path) -> onnx.ModelProto:
    """Run ``onnx.checker`` (full check) and strict shape inference; return the inferred model."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path))
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise ExportValidationError(f"{path.name} fails the ONNX checker / shape inference: {err}") from None


def _constant_values(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in model.graph.node:
        if node.op_type == "Constant" and name in node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
                if attr.name == "value_floats":
                    return np.asarray(attr.floats, dtype=np.float32)
    return None


def check_constant_resize(model: onnx.ModelProto, expected_scale: float | None) -> str:
    """Verify every ``Resize`` uses constant scales and no ``sizes`` input; return a one-line summary.

    Parameters
    ----------
    model
        The exported graph.
    expected_scale
        Required scale on the last two axes (1.5 for VSI-SR); ``None`` when the model must have no Resize.
    """
    resizes = [n for n in model.graph.node if n.op_type == "Resize"]
    if expected_scale is None:
        if resizes:
            raise ExportValidationError(f"unexpected Resize node(s) {[n.name for n in resizes]} in the graph")
        return "no Resize in the graph"
    if not resizes:
        raise ExportValidationError(f"expected a {expected_scale}× Resize in the graph, found none")
    for node in resizes:
        sizes = node.input[3] if len(node.input) > 3 else ""
        if sizes:
            raise ExportValidationError(f"Resize '{node.name}' takes an output size computed from the input "
                                  f"('{sizes}') instead of a constant scale")
        scales = _constant_values(model, node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if scales is None:
            raise ExportValidationError(f"Resize '{node.name}': scales '{node.input[2] if len(node.input) > 2 else ''}' "
                                  "are not a constant of the graph")
        want = np.array([1.0, 1.0, expected_scale, expected_scale], dtype=np.float32)
        if scales.shape != want.shape or not np.allclose(scales, want):
            raise ExportValidationError(f"Resize '{node.name}' scales {scales.tolist()}, expected {want.tolist()}")
        mode = {a.name: a.s.decode() for a in node.attribute if a.type == onnx.AttributeProto.STRING}
        if mode.get("mode") != "linear" or mode.get("coordinate_transformation_mode") != "half_pixel":
            raise ExportValidationError(f"Resize '{node.name}' is {mode}, expected linear with half_pixel coordinates")
    return (f"{len(resizes)} Resize node(s), constant scales [1, 1, {expected_scale}, {expected_scale}], "
            "linear, half_pixel, no sizes input")


def _pick(lo: int, hi: int, multiple: int, avoid: set[int], shift: int) -> int:
    """A size in [lo, hi], a multiple of *multiple*, odd (or an odd multiple), not in *avoid* when possible."""
    ks = list(range(math.ceil(lo / multiple), hi // multiple + 1))
    if not ks:
        return lo
    odd = [k for k in ks if k % 2 == 1 and k * multiple not in avoid] or [k for k in ks if k * multiple not in avoid]
    if not odd:
        return ks[0] * multiple
    return odd[(len(odd) // 3 + shift) % len(odd)] * multiple


def golden_shapes(spec: ModelSpec, ranges: Mapping[str, ShapeRange]) -> dict[str, dict[str, list[int]]]:
    """Label → input name → shape, for the ``min``, ``opt``, ``max`` and an ``odd`` (non-square, odd) shape."""
    first = spec.inputs[0]
    rng = ranges[first.name]
    odd: list[int] = []
    for i, letter in enumerate(first.layout):
        lo, hi = rng.min[i], rng.max[i]
        avoid = {rng.min[i], rng.opt[i], rng.max[i]}
        shift = sum(1 for prev in first.layout[:i] if prev in "HWD")  # y ≠ x: a non-square plane
        odd.append(lo if lo == hi else _pick(lo, hi, spec.divisibility.get(letter, 1), avoid, shift))
    out: dict[str, dict[str, list[int]]] = {}
    for label in ("min", "opt", "max"):
        out[label] = {info.name: list(getattr(ranges[info.name], label)) for info in spec.inputs}
    out["odd"] = {info.name: list(odd) for info in spec.inputs}
    return out


def golden_inputs(shapes: Mapping[str, list[int]], seed: int, label_index: int) -> dict[str, np.ndarray]:
    """Reproducible float32 inputs in [0, 1) (the scale the networks see after normalisation)."""
    rng = np.random.default_rng([seed, label_index])
    return {name: rng.random(shape, dtype=np.float32) for name, shape in shapes.items()}


def psnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """PSNR of *test* against *reference*, peak = the reference's value range (inf when identical)."""
    reference = reference.astype(np.float64)
    mse = float(np.mean((reference - test.astype(np.float64)) ** 2))
    peak = float(reference.max() - reference.min()) or 1.0
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def compare(label: str, shapes: Mapping[str, list[int]], runtime: str, reference: list[np.ndarray],
            test: list[np.ndarray], precision: Precision) -> ValidationCase:
    """One :class:`ValidationCase`: max abs error (and PSNR) of *test* against *reference* outputs."""
    # A wrong shape, or NaN/inf out of the exported model (e.g. FP16 overflow), fails the case outright: NaN
    # figures would fail the case's own schema and crash instead of reporting which case went wrong.
    if [r.shape for r in reference] != [t.shape for t in test] or not all(np.isfinite(t).all() for t in test):
        return ValidationCase(label=label, shapes=dict(shapes), runtime=runtime, max_abs_error=math.inf,
                              psnr_db=None, passed=False)
    err = max(float(np.max(np.abs(r.astype(np.float64) - t))) for r, t in zip(reference, test))
    rel = max(float(np.max(np.abs(r.astype(np.float64) - t))) / output_scale(r) for r, t in zip(reference, test))
    psnr = min(psnr_db(r, t) for r, t in zip(reference, test))
    if Precision(precision) is Precision.FP32:
        ok = rel <= FP32_MAX_REL
    else:
        ok = psnr >= REDUCED_MIN_PSNR_DB
    return ValidationCase(label=label, shapes=dict(shapes), runtime=runtime, max_abs_error=err,
                          max_rel_error=rel, psnr_db=None if math.isinf(psnr) else round(psnr, 2), passed=bool(ok))


def output_scale(reference: np.ndarray) -> float:
    """The dynamic range (max − min) the relative error is measured against; 1 for a constant output of 0."""
    ref = reference.astype(np.float64)
    span = float(ref.max() - ref.min())
    return span if span > 0 else max(float(np.abs(ref).max()), 1.0)


def run_golden(spec: ModelSpec, cases: Mapping[str, Mapping[str, list[int]]], seed: int,
               reference: Callable[[list[np.ndarray]], list[np.ndarray]]) -> dict[str, dict[str, np.ndarray]]:
    """Make golden inputs for every case and the reference (torch FP32) outputs; label → name → array."""
    golden: dict[str, dict[str, np.ndarray]] = {}
    for i, (label, shapes) in enumerate(cases.items()):
        xs = golden_inputs(shapes, seed, i)
        ys = reference([xs[n] for n in spec.input_names])
        golden[label] = {**xs, **dict(zip(spec.output_names, ys))}
    return golden


def save_golden(path: Path, golden: Mapping[str, Mapping[str, np.ndarray]]) -> Path:
    """Save golden arrays as ``<label>/<tensor name>`` entries of one ``.npz``."""
    flat = {f"{label}/{name}": arr for label, arrs in golden.items() for name, arr in arrs.items()}
    np.savez(path, **flat)
    return path


def load_golden(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """Inverse of :func:`save_golden`."""
    out: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path) as data:
        for key in data.files:
            label, name = key.split("/", 1)
            out.setdefault(label, {})[name] = data[key]
    return out


def validate_against_golden(spec: ModelSpec, golden: Mapping[str, Mapping[str, np.ndarray]],
                            run: Callable[[list[np.ndarray]], list[Any]], runtime: str,
                            precision: Precision) -> list[ValidationCase]:
    """Run *run* (the exported model) on every golden input and compare with the golden outputs.

    Raises
    ------
    ExportValidationError
        *golden* holds no case: with nothing compared, "all cases passed" would be vacuously true.
    """
    if not golden:
        raise ExportValidationError(f"no golden cases to validate the exported {spec.kind} against")
    cases = []
    for label, arrs in golden.items():
        xs = [arrs[n] for n in spec.input_names]
        ys = [np.asarray(y) for y in run(xs)]
        shapes = {n: list(arrs[n].shape) for n in spec.input_names}
        cases.append(compare(label, shapes, runtime, [arrs[n] for n in spec.output_names], ys, precision))
    return cases
