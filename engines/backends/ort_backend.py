"""ONNX Runtime backend: CPU, CUDA and TensorRT execution providers over one exported ``.onnx`` file."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from engines.backends.base import Array, Backend, ModelSpec, _is_torch
from engines.backends.errors import TENSORRT_INSTALL_HINT, BackendUnavailableError, ModelSourceError
from engines.backends.manifest import Precision, ShapeRange

#: Backend name → ONNX Runtime execution providers, best first (CPU always last, as ORT itself requires).
PROVIDERS: dict[str, list[str]] = {
    "onnxruntime": ["CPUExecutionProvider"],
    "onnxruntime-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "onnxruntime-tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def ort_unavailable_reason(backend: str) -> str | None:
    """Why *backend* cannot run here (``None`` when it can), without creating a session."""
    try:
        import onnxruntime as ort
    except ImportError as err:
        return f"onnxruntime is not installed ({err}); pip install onnxruntime (or onnxruntime-gpu)"
    wanted = PROVIDERS[backend][0]
    have = ort.get_available_providers()
    if wanted not in have:
        hint = {"CUDAExecutionProvider": "install onnxruntime-gpu matching your CUDA",
                "TensorrtExecutionProvider": f"install onnxruntime-gpu and TensorRT ({TENSORRT_INSTALL_HINT})"}
        return (f"this onnxruntime {ort.__version__} has no {wanted} (available: {', '.join(have)}); "
                f"{hint.get(wanted, '')}").rstrip("; ")
    return None


def _shape_option(ranges: Mapping[str, ShapeRange], which: str) -> str:
    return ",".join(f"{name}:{'x'.join(map(str, getattr(r, which)))}" for name, r in ranges.items())


class OnnxRuntimeBackend(Backend):
    """Run an exported ONNX model with ONNX Runtime.

    Parameters
    ----------
    onnx_path
        The ``.onnx`` file (weights inside it).
    spec, shape_ranges, precision, check_finite
        See :class:`~engines.backends.base.Backend`; *precision* only labels the model (it is in the graph).
    backend
        ``"onnxruntime"`` (CPU), ``"onnxruntime-cuda"`` or ``"onnxruntime-tensorrt"``.
    threads
        Intra-op threads (0 = ONNX Runtime's default, all cores).
    device_id
        CUDA device for the GPU providers.
    cache_dir
        Where the TensorRT provider keeps its engine and timing caches (default: beside the model).
    """

    name: ClassVar[str] = "onnxruntime"
    native: ClassVar[str] = "numpy"

    def __init__(self, onnx_path: str | Path, spec: ModelSpec, shape_ranges: Mapping[str, ShapeRange] | None = None,
                 precision: Precision = Precision.FP32, check_finite: bool = True, backend: str = "onnxruntime",
                 threads: int = 0, device_id: int = 0, cache_dir: str | Path | None = None) -> None:
        super().__init__(spec, shape_ranges, precision, check_finite)
        if backend not in PROVIDERS:
            raise ValueError(f"unknown ONNX Runtime backend '{backend}'; choose from {', '.join(PROVIDERS)}")
        self.name = backend  # type: ignore[misc]  # instance-level: which provider flavour this is
        why = ort_unavailable_reason(backend)
        if why:
            raise BackendUnavailableError({backend: why})
        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise ModelSourceError(f"ONNX model not found: {onnx_path}")
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3  # warnings about provider fallbacks are turned into our own check below
        providers: list[Any] = []
        for p in PROVIDERS[backend]:
            if p == "CUDAExecutionProvider":
                # TF32 would cost the FP32 model its 1e-4 agreement with torch; reduced precision is in the graph.
                cuda_opts = {"device_id": device_id, "use_tf32": 0 if self.precision is Precision.FP32 else 1}
                providers.append((p, cuda_opts))
            elif p == "TensorrtExecutionProvider":
                cache = Path(cache_dir) if cache_dir else onnx_path.parent / "ort-trt-cache"
                cache.mkdir(parents=True, exist_ok=True)
                trt_opts: dict[str, Any] = {
                    "device_id": device_id,
                    "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": str(cache),
                    "trt_timing_cache_enable": True,
                    "trt_timing_cache_path": str(cache),
                }
                if self.shape_ranges:
                    # Explicit profiles stop the provider from rebuilding its engine for every new shape.
                    for which in ("min", "opt", "max"):
                        trt_opts[f"trt_profile_{which}_shapes"] = _shape_option(self.shape_ranges, which)
                providers.append((p, trt_opts))
            else:
                providers.append(p)
        try:
            self.session = ort.InferenceSession(os.fspath(onnx_path), sess_options=opts, providers=providers)
        except Exception as err:  # ORT raises its own exception types; report them as unavailability
            raise BackendUnavailableError({backend: f"ONNX Runtime could not load {onnx_path.name}: {err}"}) from None
        used = self.session.get_providers()
        if PROVIDERS[backend][0] not in used:
            # ORT silently falls back to the CPU when a provider fails to initialise; we refuse to.
            raise BackendUnavailableError({backend: f"{PROVIDERS[backend][0]} failed to initialise "
                                                    f"(session uses {', '.join(used)})"})
        got_in = [i.name for i in self.session.get_inputs()]
        got_out = [o.name for o in self.session.get_outputs()]
        if got_in != spec.input_names or got_out != spec.output_names:
            raise ModelSourceError(f"{onnx_path.name} has inputs {got_in} and outputs {got_out}; a {spec.kind} "
                                   f"model has inputs {spec.input_names} and outputs {spec.output_names}")
        self.onnx_path = onnx_path
        self.device_id = device_id
        self._on_gpu = backend != "onnxruntime"

    def describe(self) -> str:
        import onnxruntime as ort

        return f"{self.name} {ort.__version__} ({self.precision.value})"

    def _to_native(self, x: Array) -> Array:
        # CUDA tensors stay where they are: they are bound to the session without a host round trip.
        if self._on_gpu and _is_torch(x) and x.device.type == "cuda":
            return x.contiguous()
        return super()._to_native(x)

    def _forward_impl(self, inputs: list[Array]) -> list[Array]:
        if any(_is_torch(x) for x in inputs):
            return self._forward_bound(inputs)
        feeds = {name: np.ascontiguousarray(x, dtype=np.float32) for name, x in zip(self.spec.input_names, inputs)}
        return self.session.run(self.spec.output_names, feeds)

    def _forward_bound(self, inputs: list[Array]) -> list[Array]:
        """GPU path: bind device pointers of torch CUDA tensors; outputs come back as torch CUDA tensors."""
        import torch

        binding = self.session.io_binding()
        for name, x in zip(self.spec.input_names, inputs):
            binding.bind_input(name=name, device_type="cuda", device_id=x.device.index or 0,
                               element_type=np.float32, shape=tuple(x.shape), buffer_ptr=x.data_ptr())
        outs: list[Any] = []
        if self.spec.output_shapes is not None:
            # Outputs are torch tensors ORT writes into: no copy, no DLPack support needed in the ORT build.
            for name, shape in zip(self.spec.output_names, self.spec.output_shapes([tuple(x.shape) for x in inputs])):
                out = torch.empty(shape, dtype=torch.float32, device=inputs[0].device)
                binding.bind_output(name=name, device_type="cuda", device_id=out.device.index or 0,
                                    element_type=np.float32, shape=tuple(out.shape), buffer_ptr=out.data_ptr())
                outs.append(out)
        else:
            for name in self.spec.output_names:
                binding.bind_output(name, "cuda", self.device_id)
        torch.cuda.current_stream().synchronize()  # ORT runs on its own stream; inputs must be ready
        self.session.run_with_iobinding(binding)
        if outs:
            return outs
        return [torch.from_numpy(a) for a in binding.copy_outputs_to_cpu()]

    def unload(self) -> None:
        self.session = None
