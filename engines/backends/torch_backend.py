"""Torch backend: eager PyTorch (optionally ``torch.compile`` and CUDA graphs), FP32/FP16/BF16."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from engines.backends.base import Array, Backend, ModelSpec
from engines.backends.errors import BackendUnavailableError
from engines.backends.manifest import Precision, ShapeRange


def torch_dtype(precision: Precision) -> Any:
    import torch

    return {Precision.FP32: torch.float32, Precision.FP16: torch.float16, Precision.BF16: torch.bfloat16}[
        Precision(precision)]


class TorchBackend(Backend):
    """Run a ``torch.nn.Module`` directly.

    Parameters
    ----------
    module
        The network (any device; it is moved to *device*).
    spec, shape_ranges, precision, check_finite
        See :class:`~engines.backends.base.Backend`.  Reduced precision casts the weights and the activations
        inside the call; inputs and outputs stay float32 (camera-scale values overflow FP16).
    device
        ``"cpu"``, ``"cuda"``, ``"cuda:1"`` …; ``None`` picks CUDA when present (:func:`engines.device.pick_device`).
    compile
        Wrap the module in ``torch.compile`` (first call per shape is slow; later ones faster).
    cuda_graphs
        Capture one CUDA graph per input shape and replay it (CUDA only; removes launch overhead for the
        many small kernels of the RCAB trunk).
    """

    name: ClassVar[str] = "torch"
    native: ClassVar[str] = "torch"

    def __init__(self, module: Any, spec: ModelSpec, shape_ranges: Mapping[str, ShapeRange] | None = None,
                 precision: Precision = Precision.FP32, check_finite: bool = True, device: str | None = None,
                 compile: bool = False, cuda_graphs: bool = False) -> None:
        super().__init__(spec, shape_ranges, precision, check_finite)
        import torch

        from engines.device import pick_device

        try:
            self.device = pick_device(device)
        except RuntimeError as err:
            raise BackendUnavailableError({self.name: str(err)}) from None
        if cuda_graphs and self.device.type != "cuda":
            raise BackendUnavailableError({self.name: "CUDA graphs need a CUDA device; "
                                                      f"this backend runs on {self.device}"})
        self.dtype = torch_dtype(self.precision)
        self.module = module.eval().to(device=self.device, dtype=self.dtype)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self._run = torch.compile(self.module, dynamic=True) if compile else self.module
        self.compiled = compile
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[tuple, tuple[Any, list[Any], list[Any]]] = {}

    def describe(self) -> str:
        extra = (" compiled" if self.compiled else "") + (" cuda-graphs" if self.cuda_graphs else "")
        return f"torch {self.device} ({self.precision.value}{extra})"

    def _forward_impl(self, inputs: list[Array]) -> list[Array]:
        import torch

        xs = [x.to(device=self.device, dtype=self.dtype, non_blocking=True) for x in inputs]
        with torch.inference_mode(), self._no_tf32():
            if self.cuda_graphs:
                ys = self._replay(xs)
            else:
                out = self._run(*xs)
                ys = list(out) if isinstance(out, (tuple, list)) else [out]
        return [y.float() for y in ys]

    def _no_tf32(self) -> Any:
        """cuDNN convolutions default to TF32 (10-bit mantissa) on Ampere and later; "fp32" means FP32 here, so
        that the torch backend meets the same 1e-4 agreement as the exported models."""
        import contextlib

        import torch

        if self.device.type != "cuda" or self.precision is not Precision.FP32:
            return contextlib.nullcontext()
        return torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled,
                                          benchmark=torch.backends.cudnn.benchmark,
                                          deterministic=torch.backends.cudnn.deterministic, allow_tf32=False)

    def _replay(self, xs: list[Any]) -> list[Any]:
        import torch

        key = tuple(tuple(x.shape) for x in xs)
        if key not in self._graphs:
            static_in = [x.clone() for x in xs]
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):  # warm-up outside the graph, as capture requires
                for _ in range(2):
                    self._run(*static_in)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self._run(*static_in)
            static_out = list(out) if isinstance(out, (tuple, list)) else [out]
            self._graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self._graphs[key]
        for dst, src in zip(static_in, xs):
            dst.copy_(src)
        graph.replay()
        # The graph overwrites its output buffers on the next replay; hand out copies.
        return [y.clone() for y in static_out]

    def unload(self) -> None:
        self._graphs.clear()
        self.module = None
        self._run = None
        if self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()
