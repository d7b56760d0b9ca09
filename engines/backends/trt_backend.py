"""TensorRT backend: a checked engine file, ``execute_async_v3``, one execution context per CUDA stream."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from engines.backends.base import Array, Backend, ModelSpec
from engines.backends.engine_file import read_engine_for
from engines.backends.errors import BackendError, EngineFileError, EngineMismatchError
from engines.backends.trt_build import cuda_compute_capability, import_tensorrt


class TensorRTBackend(Backend):
    """Run a serialised TensorRT engine written by ``rllsm export --format engine``.

    Parameters
    ----------
    engine_path
        Our engine container (see :mod:`engines.backends.engine_file`).
    spec, check_finite
        See :class:`~engines.backends.base.Backend`; shape ranges come from the engine's profile.
    device_id
        CUDA device.
    rebuild
        Called with the reason when the file is damaged or was built for another TensorRT/GPU; must rebuild the
        engine at *engine_path* (e.g. from the ONNX beside it).  Without it such a file raises a typed error
        that says how to rebuild — the plan is never handed to TensorRT unchecked.
    onnx_sha256
        Hash of the ONNX model the engine must have been built from (the manifest's); an engine built from
        another ONNX (left over from an earlier export) is then refused or rebuilt like a damaged one.
    """

    name: ClassVar[str] = "tensorrt"
    native: ClassVar[str] = "torch"

    def __init__(self, engine_path: str | Path, spec: ModelSpec, check_finite: bool = True, device_id: int = 0,
                 rebuild: Callable[[str], None] | None = None, onnx_sha256: str | None = None) -> None:
        trt = import_tensorrt()
        import torch

        self.engine_path = Path(engine_path)
        self.device = torch.device("cuda", device_id)
        here = (trt.__version__, cuda_compute_capability(device_id))  # "needs a CUDA GPU" before any file is read
        try:
            info, self.manifest, plan = read_engine_for(self.engine_path, *here, onnx_sha256)
        except (EngineFileError, EngineMismatchError) as err:
            if rebuild is None:
                raise
            rebuild(str(err))
            info, self.manifest, plan = read_engine_for(self.engine_path, *here, onnx_sha256)
        super().__init__(spec, info.profile, info.precision, check_finite)
        self.info = info
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self.device):
            self.engine = self._runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise EngineFileError(f"TensorRT {trt.__version__} refused {self.engine_path} although its header and "
                                  "hash are intact; rebuild it with `rllsm export --format engine`")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        ins = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if sorted(ins) != sorted(spec.input_names) or sorted(outs) != sorted(spec.output_names):
            raise EngineFileError(f"{self.engine_path} has inputs {ins} and outputs {outs}; a {spec.kind} engine "
                                  f"has {spec.input_names} and {spec.output_names}")
        for n in names:
            if self.engine.get_tensor_dtype(n) != trt.DataType.FLOAT:
                raise EngineFileError(f"{self.engine_path}: tensor '{n}' is {self.engine.get_tensor_dtype(n)}, "
                                      "expected float32 I/O (precision belongs inside the network)")
        self._contexts: dict[int, Any] = {}
        self._lock = threading.Lock()

    def describe(self) -> str:
        return (f"tensorrt {self.info.tensorrt_version} sm_{self.info.compute_capability.replace('.', '')} "
                f"({self.precision.value})")

    def _context_for(self, stream: Any) -> Any:
        """One execution context per CUDA stream: contexts hold per-call shapes and addresses, so sharing one
        across streams would race.  Each context gets its own optimisation profile."""
        handle = int(stream.cuda_stream)
        with self._lock:
            ctx = self._contexts.get(handle)
            if ctx is None:
                index = len(self._contexts)
                if index >= self.engine.num_optimization_profiles:
                    raise BackendError(
                        f"{self.engine_path} has {self.engine.num_optimization_profiles} optimisation profile(s), "
                        f"so it serves at most that many CUDA streams; rebuild with more (--streams)")
                ctx = self.engine.create_execution_context()
                if index:
                    ctx.set_optimization_profile_async(index, handle)
                self._contexts[handle] = ctx
        return ctx

    def _forward_impl(self, inputs: list[Array]) -> list[Array]:
        import torch

        stream = torch.cuda.current_stream(self.device)
        ctx = self._context_for(stream)
        xs = [x.to(self.device, torch.float32).contiguous() for x in inputs]
        for name, x in zip(self.spec.input_names, xs):
            ctx.set_input_shape(name, tuple(x.shape))
            ctx.set_tensor_address(name, x.data_ptr())
        outs = []
        for name in self.spec.output_names:
            out = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=torch.float32, device=self.device)
            ctx.set_tensor_address(name, out.data_ptr())
            outs.append(out)
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise BackendError(f"TensorRT execution failed for input shapes {[tuple(x.shape) for x in xs]}")
        # Inputs must outlive the asynchronous launch; recording them on the stream keeps the allocator honest.
        for x in xs:
            x.record_stream(stream)
        return outs

    def unload(self) -> None:
        self._contexts.clear()
        self.engine = None
        self._runtime = None
