"""Building a TensorRT engine from an exported ONNX file (TensorRT 10 and 11).

Precision lives in the ONNX graph: a reduced-precision export already holds FP16/BF16 weights and the casts at
its float32 inputs and outputs, and the network is created *strongly typed*, so TensorRT uses exactly those
types.  That is the only way TensorRT 11 offers (it removed ``BuilderFlag.FP16``/``BF16``/``INT8``), and in
TensorRT 10 the same code path works with the ``STRONGLY_TYPED`` creation flag — no version branches in the
precision logic.  TensorRT 10 also removed implicit batch, so every network here is explicit-batch with dynamic
axes resolved by optimisation profiles.

This module is imported only when an engine is built; importing it does not import TensorRT.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engines.backends.errors import TENSORRT_INSTALL_HINT, BackendError, BackendUnavailableError
from engines.backends.manifest import EngineInfo, Precision, ShapeRange

#: Oldest TensorRT whose Python API this code is written against (name-based I/O, execute_async_v3).
MIN_TENSORRT_MAJOR = 10


class EngineBuildError(BackendError):
    """TensorRT could not parse the ONNX model or build an engine from it."""


def import_tensorrt() -> Any:
    """Import :mod:`tensorrt` or raise :class:`BackendUnavailableError` saying how to install it."""
    try:
        import tensorrt as trt
    except ImportError as err:
        raise BackendUnavailableError(
            {"tensorrt": f"TensorRT is not installed ({err}); install it with: {TENSORRT_INSTALL_HINT}"}) from None
    major = int(str(trt.__version__).split(".")[0])
    if major < MIN_TENSORRT_MAJOR:
        raise BackendUnavailableError({"tensorrt": f"TensorRT {trt.__version__} is too old; need ≥ "
                                                   f"{MIN_TENSORRT_MAJOR} ({TENSORRT_INSTALL_HINT})"})
    return trt


def cuda_compute_capability(device_id: int = 0) -> str:
    """``"major.minor"`` of CUDA device *device_id*; :class:`BackendUnavailableError` without a GPU."""
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailableError({"tensorrt": f"TensorRT needs a CUDA GPU; torch {torch.__version__} sees none"})
    major, minor = torch.cuda.get_device_capability(device_id)
    return f"{major}.{minor}"


def strongly_typed_flags(trt: Any) -> tuple[int, bool]:
    """Network-creation flags: ``STRONGLY_TYPED`` where the enum still has it (10.x; accepted/ignored in 11.x)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None:  # a TensorRT where strong typing is simply the only mode
        return 0, True
    return 1 << int(flag), True


def _parser_error(err: Any) -> str:
    """Readable text of an ``IParserError`` (its ``desc()`` plus the failing node where available)."""
    desc = err.desc() if hasattr(err, "desc") else str(err)
    node = err.node_name() if hasattr(err, "node_name") else None
    return f"{desc} (node {node})" if node else desc


def build_engine_plan(onnx_path: Path, profile: Mapping[str, ShapeRange], precision: Precision, onnx_sha256: str,
                      timing_cache: Path | None = None, workspace_gib: float = 4.0, n_profiles: int = 1,
                      device_id: int = 0) -> tuple[bytes, EngineInfo]:
    """Parse *onnx_path* and build a serialised engine.

    Parameters
    ----------
    onnx_path
        Exported model; its own types decide the precision (strongly typed network).
    profile
        Input name → min/opt/max shapes.
    precision
        Precision the ONNX file was exported at (recorded in the cache key; not a builder switch).
    onnx_sha256
        Hash of *onnx_path* (for the cache key).
    timing_cache
        File holding TensorRT's kernel-timing cache: read if present, updated after the build, so a rebuild
        of the same network on the same GPU skips most of the auto-tuning.
    workspace_gib
        Scratch memory TensorRT may use while choosing kernels.
    n_profiles
        Identical optimisation profiles to create — one per concurrent execution context (CUDA stream).
    device_id
        GPU to build for.

    Returns
    -------
    (bytes, EngineInfo)
        The plan and the fields of its cache key.
    """
    from engines.backends.engine_file import engine_cache_key

    trt = import_tensorrt()
    cc = cuda_compute_capability(device_id)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags, strongly_typed = strongly_typed_flags(trt)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file (not parse(bytes)) so that weights stored beside the file would be found too.
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(_parser_error(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT {trt.__version__} cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if Precision(precision) is Precision.FP32 and tf32 is not None:
        # TF32 keeps only 10 mantissa bits; an "fp32" engine must meet the same 1e-4 bound as the ONNX model.
        config.clear_flag(tf32)
    for _ in range(max(1, n_profiles)):
        prof = builder.create_optimization_profile()
        for name, rng in profile.items():
            prof.set_shape(name, tuple(rng.min), tuple(rng.opt), tuple(rng.max))
        config.add_optimization_profile(prof)
    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    # ignore_mismatch=True: a cache from another GPU/TensorRT is discarded rather than failing the build.
    config.set_timing_cache(cache, True)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(f"TensorRT {trt.__version__} failed to build an engine from {onnx_path} "
                               "(see the TensorRT log above; often too little --workspace)")
    if timing_cache is not None:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    info = EngineInfo(
        cache_key=engine_cache_key(onnx_sha256, trt.__version__, cc, precision, profile),
        onnx_sha256=onnx_sha256, tensorrt_version=trt.__version__, compute_capability=cc,
        precision=Precision(precision), profile=dict(profile), strongly_typed=strongly_typed,
        timing_cache=timing_cache.name if timing_cache is not None else None,
    )
    return bytes(plan), info


def build_engine_file(onnx_path: Path, engine_path: Path, profile: Mapping[str, ShapeRange], precision: Precision,
                      onnx_sha256: str, manifest: Mapping[str, Any] | None = None, timing_cache: Path | None = None,
                      workspace_gib: float = 4.0, n_profiles: int = 1, device_id: int = 0) -> EngineInfo:
    """Build an engine and write it in our checked container (header + plan); return its :class:`EngineInfo`."""
    import torch

    from engines.backends.engine_file import write_engine_file

    # TensorRT builds for the current CUDA device; without this a device_id > 0 engine would be tuned on GPU 0
    # while its header names device_id's compute capability.
    with torch.cuda.device(device_id):
        plan, info = build_engine_plan(onnx_path, profile, precision, onnx_sha256, timing_cache=timing_cache,
                                       workspace_gib=workspace_gib, n_profiles=n_profiles, device_id=device_id)
    doc = dict(manifest) if manifest is not None else None
    if doc is not None:
        doc["engine"] = info.model_dump(mode="json")
    write_engine_file(engine_path, plan, info, doc)
    return info
