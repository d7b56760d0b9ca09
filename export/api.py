"""``rllsm export`` as a plain function: checkpoint → validated ONNX (+ TensorRT engine) + manifest.

Nothing is written under its final name until it has passed validation: the work happens in a hidden staging
folder inside the output directory and is moved into place at the end, so a directory holding a
``manifest.json`` always holds a model that met the criteria recorded in it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import io
import logging
import platform
import shlex
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from engines.backends.base import check_shape
from engines.backends.errors import InputShapeError
from engines.backends.manifest import (
    MANIFEST_NAME,
    Manifest,
    Precision,
    ShapeRange,
    ValidationReport,
    Versions,
)
from engines.backends.models import get_model, sha256_of
from export.onnx_export import ExportError, export_onnx
from export.validate import (
    FP32_MAX_REL,
    REDUCED_MIN_PSNR_DB,
    ExportValidationError,
    check_constant_resize,
    check_structure,
    golden_shapes,
    run_golden,
    save_golden,
    validate_against_golden,
)

log = logging.getLogger(__name__)

#: Models whose graph must carry a constant-scale Resize, and the scale (None: no Resize allowed).
RESIZE_SCALE: dict[str, float | None] = {"vsi-sr": 1.5, "rl-dfn": None}
GOLDEN_NAME = "golden.npz"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def software_versions() -> Versions:
    """Versions of everything that touched the model (TensorRT without importing it)."""
    trt = _version("tensorrt") or _version("tensorrt-cu12") or _version("tensorrt-cu13")
    return Versions(python=platform.python_version(), torch=torch.__version__, onnx=_version("onnx"),
                    onnxruntime=_version("onnxruntime") or _version("onnxruntime-gpu"),
                    onnxscript=_version("onnxscript"), tensorrt=trt, rllsm_vsim=_version("rllsm-vsim") or "0+local")


def parse_shape(text: str) -> list[int]:
    """``"1x7x64x64"`` (or with ``,``/``×``) → ``[1, 7, 64, 64]``."""
    parts = text.replace("×", "x").replace(",", "x").lower().split("x")
    try:
        shape = [int(p) for p in parts if p.strip()]
    except ValueError:
        raise InputShapeError(f"shape '{text}' is not sizes joined by 'x', e.g. 1x7x256x256") from None
    if not shape or any(s < 1 for s in shape):
        raise InputShapeError(f"shape '{text}' must be positive sizes, e.g. 1x7x256x256")
    return shape


def resolve_ranges(kind: str, min_shape: list[int] | None = None, opt_shape: list[int] | None = None,
                   max_shape: list[int] | None = None) -> dict[str, ShapeRange]:
    """Shape ranges for every input of *kind*: the defaults, with any of min/opt/max replaced.

    All inputs of a model share one shape (RL-DFN's two views), so one triple covers them.  Each shape is checked
    against the model's fixed axes and divisibility rules so a bad range fails here, not after a minute of export.
    """
    mk = get_model(kind)
    out: dict[str, ShapeRange] = {}
    for info in mk.spec.inputs:
        d = mk.spec.default_ranges[info.name]
        lo, mid, hi = min_shape or d.min, opt_shape or d.opt, max_shape or d.max
        if opt_shape is None and (min_shape or max_shape):
            # keep opt inside a user-narrowed range: clamp the default into it
            mid = [min(max(o, a), b) for o, a, b in zip(d.opt, lo, hi)]
        for label, shape in (("min", lo), ("opt", mid), ("max", hi)):
            check_shape(mk.spec, info, shape, None, where=f" ({label} shape)")
        try:
            out[info.name] = ShapeRange(min=list(lo), opt=list(mid), max=list(hi))
        except ValueError as err:
            raise InputShapeError(f"invalid shape range for '{info.name}': {err}") from None
    return out


def rebuild_command(kind: str, checkpoint: Path, out_dir: Path, fmt: str, precision: Precision,
                    ranges: Mapping[str, ShapeRange], seed: int, opset: int | None, n_profiles: int = 1,
                    workspace_gib: float = 4.0) -> str:
    """The ``rllsm export`` command line that reproduces this export (engine options included)."""
    r = next(iter(ranges.values()))
    args = ["rllsm", "export", "--model", kind, "--checkpoint", str(checkpoint), "--format", fmt,
            "--out", str(out_dir), "--precision", Precision(precision).value,
            "--min-shape", "x".join(map(str, r.min)), "--opt-shape", "x".join(map(str, r.opt)),
            "--max-shape", "x".join(map(str, r.max)), "--seed", str(seed)]
    if opset:
        args += ["--opset", str(opset)]
    if fmt == "engine":  # an engine's profiles (one per CUDA stream) and build workspace are part of what it is
        args += ["--streams", str(n_profiles), "--workspace-gib", f"{workspace_gib:g}"]
    return shlex.join(args)


def _torch_reference(module: torch.nn.Module):
    def run(xs: list[np.ndarray]) -> list[np.ndarray]:
        with torch.inference_mode():
            out = module(*(torch.from_numpy(x) for x in xs))
        outs = out if isinstance(out, (tuple, list)) else [out]
        return [o.float().numpy() for o in outs]

    return run


def _ort_runner(path: Path, output_names: list[str], input_names: list[str]):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])

    def run(xs: list[np.ndarray]) -> list[np.ndarray]:
        return sess.run(output_names, dict(zip(input_names, xs)))

    return run, f"onnxruntime-cpu {ort.__version__}"


def export_model(kind: str, checkpoint: str | Path, out_dir: str | Path,
                 fmt: Literal["onnx", "engine"] = "onnx", precision: Precision | str = Precision.FP32,
                 ranges: Mapping[str, ShapeRange] | None = None, opset: int | None = None, seed: int = 0,
                 n_profiles: int = 1, workspace_gib: float = 4.0, overwrite: bool = True,
                 progress: bool = False) -> Manifest:
    """Export, validate and describe one network.

    Parameters
    ----------
    kind
        ``"vsi-sr"`` or ``"rl-dfn"``.
    checkpoint
        Weights in any layout the network's loader reads.
    out_dir
        Destination; receives ``<kind>.onnx``, ``golden.npz``, ``manifest.json`` (and the engine).
    fmt
        ``"onnx"``, or ``"engine"`` (ONNX first, then a TensorRT engine validated on the same golden data).
    precision
        FP32, FP16 or BF16 inside the network; I/O stays float32.
    ranges
        Input name → shape range (default: the model's); the golden cases are its min/opt/max and an odd shape.
    opset, seed, n_profiles, workspace_gib
        ONNX opset (≥ 18); seed of the golden inputs; TensorRT profiles (one per concurrent CUDA stream) and
        build workspace.
    overwrite
        Replace an export already in *out_dir* (else :class:`ExportError` before any work).
    progress
        A progress bar on stderr naming the step (export, checks, golden outputs, validation, engine).

    Returns
    -------
    Manifest
        As written to ``out_dir/manifest.json``.

    Raises
    ------
    ExportValidationError
        A check failed; nothing was written under the final names, the message holds the figures.
    """
    precision = Precision(precision)
    mk = get_model(kind)
    spec = mk.spec
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    ranges = dict(ranges) if ranges else resolve_ranges(kind)
    if fmt == "engine":
        # Fail before minutes of export and validation, with the install hint, when no engine can be built here.
        from engines.backends.trt_build import cuda_compute_capability, import_tensorrt

        import_tensorrt()
        cuda_compute_capability()
    # Refuse a clash before minutes of work, not after (the final move checks again).
    planned = [out_dir / n for n in (f"{kind}.onnx", GOLDEN_NAME, MANIFEST_NAME)]
    if not overwrite and any(p.exists() for p in planned):
        raise ExportError(f"{out_dir} already holds an export ({', '.join(p.name for p in planned if p.exists())} "
                          "exist); "
                          "pass --overwrite to replace it, or choose another folder")
    module = mk.load(checkpoint)
    module = module.eval().float().cpu()
    made = [d for d in (out_dir, *out_dir.parents) if not d.exists()]  # folders this call creates
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ExportError(f"cannot create the export folder {out_dir}: {err.strerror or err}") from None
    stage = out_dir / ".staging"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    done = False
    from tqdm import tqdm

    bar = tqdm(total=5 if fmt == "engine" else 4, desc=f"export {kind}", unit="step", disable=not progress,
               leave=False)

    started: list[str] = []

    def step(name: str) -> None:  # the previous step is done when the next one starts
        if started:
            bar.update(1)
        started.append(name)
        bar.set_postfix_str(name)

    try:
        onnx_name = f"{kind}.onnx"
        step("torch → ONNX")
        with contextlib.redirect_stdout(io.StringIO()) as chatter:  # the exporter prints progress lines
            _, used_opset = export_onnx(module, spec, ranges, stage / onnx_name, precision, opset)
        log.debug("exporter output:\n%s", chatter.getvalue())
        step("checker, golden outputs (torch FP32)")
        inferred = check_structure(stage / onnx_name)
        resize = check_constant_resize(inferred, RESIZE_SCALE.get(kind))
        cases_shapes = golden_shapes(spec, ranges)
        golden = run_golden(spec, cases_shapes, seed, _torch_reference(module))
        save_golden(stage / GOLDEN_NAME, golden)
        step(f"validating {len(golden)} golden cases")
        cases = _validate_onnx(stage / onnx_name, spec, golden, precision, fmt)
        report = ValidationReport(
            reference=f"torch {torch.__version__} eager, float32, CPU",
            max_rel_error_limit=FP32_MAX_REL if precision is Precision.FP32 else None,
            min_psnr_db=REDUCED_MIN_PSNR_DB if precision is not Precision.FP32 else None,
            cases=cases, resize_check=resize, passed=bool(cases) and all(c.passed for c in cases),
        )
        # No cases only for BF16 on its way to an engine (ONNX Runtime CPU cannot run it): the engine's validation
        # below stands in, and nothing leaves the staging folder unless it passes.
        if cases and not report.passed:
            bad = [c for c in cases if not c.passed]
            raise ExportValidationError(
                f"{kind} ({precision.value}) failed validation against torch FP32: " + "; ".join(
                    f"{c.label} {c.shapes}: max abs error {c.max_abs_error:.3g} ({c.max_rel_error or 0:.3g} of the "
                    f"output's range), PSNR {c.psnr_db} dB" for c in bad)
                + f" (criteria: max abs ≤ {FP32_MAX_REL:g} × the output's range for fp32, PSNR ≥ "
                  f"{REDUCED_MIN_PSNR_DB:g} dB otherwise)")
        manifest = Manifest(
            model_kind=kind, format="onnx", model_file=onnx_name, golden_file=GOLDEN_NAME,
            onnx_sha256=sha256_of(stage / onnx_name), checkpoint_sha256=sha256_of(checkpoint),
            checkpoint_name=checkpoint.name, opset=used_opset, precision=precision, inputs=list(spec.inputs),
            outputs=list(spec.outputs), shape_ranges=ranges, divisibility=dict(spec.divisibility),
            normalisation=mk.normalisation, validation=report, versions=software_versions(),
            rebuild_command=rebuild_command(kind, checkpoint, out_dir, fmt, precision, ranges, seed, opset,
                                            n_profiles, workspace_gib),
            created_utc=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        )
        manifest.write(stage)
        if fmt == "engine":
            from export.engine import build_and_validate_engine

            step("TensorRT engine")

            engine_manifest = build_and_validate_engine(stage, manifest, golden, n_profiles=n_profiles,
                                                        workspace_gib=workspace_gib)
            if not cases:  # record that this ONNX graph was validated through TensorRT, and by which figures
                manifest = manifest.model_copy(update={"validation": engine_manifest.validation})
                manifest.write(stage)
        if not manifest.validation.passed:  # pragma: no cover - every failing path above raises first
            raise ExportValidationError(f"{kind} export did not pass validation")
        # All-or-nothing as far as a reader can tell: refuse before moving anything, retire the old manifest
        # first and move the new one last, so manifest.json never describes a half-replaced model.
        items = sorted(stage.iterdir(), key=lambda p: p.name == MANIFEST_NAME)
        clash = [out_dir / i.name for i in items if (out_dir / i.name).exists()]
        if clash and not overwrite:
            raise ExportError(f"{', '.join(map(str, clash))} exist(s) (pass overwrite=True / remove them)")
        (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
        for item in items:
            item.replace(out_dir / item.name)
        done = True
        bar.update(bar.total - bar.n)
        return manifest
    finally:  # also on Ctrl-C: a failed export leaves nothing behind, not even the folders it created
        bar.close()
        shutil.rmtree(stage, ignore_errors=True)
        if not done:
            for d in made:  # deepest first; only if still empty (never a folder that held anything)
                with contextlib.suppress(OSError):
                    d.rmdir()


def _validate_onnx(path: Path, spec, golden, precision: Precision, fmt: str):
    """ONNX Runtime CPU against torch FP32 on every golden case.

    BF16 graphs cannot run on ONNX Runtime's CPU provider (it has no bfloat16 Conv kernel), so a BF16 export is
    only accepted on its way to a TensorRT engine, which is then validated on the GPU against the same data.
    """
    try:
        run, runtime = _ort_runner(path, spec.output_names, spec.input_names)
    except Exception as err:
        if precision is Precision.BF16 and fmt == "engine":
            log.warning("BF16 ONNX not runnable on ONNX Runtime CPU (%s); validating the engine instead", err)
            return []
        raise ExportValidationError(
            f"ONNX Runtime (CPU) cannot run the exported {spec.kind} at {precision.value}: {err}"
            + (" — ONNX Runtime has no bfloat16 Conv on the CPU; export BF16 with --format engine on a GPU "
               "machine, where the engine is validated instead" if precision is Precision.BF16 else "")) from None
    return validate_against_golden(spec, golden, run, runtime, precision)
