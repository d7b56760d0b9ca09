"""torch → ONNX with the torch.export-based exporter (``torch.onnx.export(..., dynamo=True)``).

Inputs and outputs stay float32 at every precision: reduced precision is a cast at the graph's entry and exit
around FP16/BF16 weights, because camera-scale values (up to 65535) overflow FP16 and because TensorRT 11 only
honours precision written into the network (strong typing).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from engines.backends.base import ModelSpec
from engines.backends.manifest import Precision, ShapeRange
from engines.backends.torch_backend import torch_dtype
from engines.errors import RllsmRuntimeError

log = logging.getLogger(__name__)

#: Smallest opset we write; BF16 needs 22, the first opset whose Conv accepts bfloat16.
MIN_OPSET = 18
BF16_OPSET = 22
#: Protobuf's hard limit; above it weights would have to go to an external file, which we do not ship.
MAX_ONNX_BYTES = 2 * 1024**3


class ExportError(RllsmRuntimeError):
    """The network could not be exported, or the exported file fails a structural check."""


class TypedIO(nn.Module):
    """Run *net* at *dtype* inside, float32 outside (the casts become part of the exported graph)."""

    def __init__(self, net: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.net = net.to(dtype)
        self.dtype = dtype

    def forward(self, *xs: torch.Tensor) -> Any:
        out = self.net(*(x.to(self.dtype) for x in xs))
        if isinstance(out, (tuple, list)):
            return tuple(o.float() for o in out)
        return out.float()


def opset_for(precision: Precision, requested: int | None = None) -> int:
    """Opset to export at: the request (at least :data:`MIN_OPSET`), raised to 22 for BF16."""
    opset = max(MIN_OPSET, requested or MIN_OPSET)
    if Precision(precision) is Precision.BF16:
        opset = max(opset, BF16_OPSET)
    return opset


def _dynamic_shapes(spec: ModelSpec, ranges: Mapping[str, ShapeRange], arg_names: list[str]) -> dict[str, Any]:
    """torch.export ``Dim`` objects for every axis whose range is not a single value; one Dim per axis letter
    so that inputs sharing a letter (the two RL-DFN views) are tied to the same size."""
    dims: dict[str, Any] = {}
    shapes: dict[str, Any] = {}
    for arg, info in zip(arg_names, spec.inputs):
        rng = ranges[info.name]
        axes: dict[int, Any] = {}
        for i, letter in enumerate(info.layout):
            lo, hi = rng.min[i], rng.max[i]
            if lo == hi:
                continue
            if letter not in dims:
                multiple = spec.divisibility.get(letter, 1)
                if multiple > 1:
                    # size = multiple × k: the exporter then knows the pooling/upsampling sizes are exact.
                    k = torch.export.Dim(f"{letter}_div{multiple}", min=max(1, lo // multiple), max=hi // multiple)
                    dims[letter] = multiple * k
                else:
                    dims[letter] = torch.export.Dim(letter, min=lo, max=hi)
            axes[i] = dims[letter]
        shapes[arg] = axes
    return shapes


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's chatter (progress lines, "torchvision is not installed", renamed-axis notes) so
    that a user sees our summary and real problems only; errors still propagate."""
    names = ["torch.onnx._internal.exporter._registration", "torch.onnx._internal.exporter._core",
             "torch.onnx._internal.exporter._onnx_program", "torch.export"]
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
    for lg, _ in saved:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*axis name.*will not be used")
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


def export_onnx(module: nn.Module, spec: ModelSpec, ranges: Mapping[str, ShapeRange], out_path: Path,
                precision: Precision = Precision.FP32, opset: int | None = None) -> tuple[Path, int]:
    """Export *module* to *out_path* with dynamic axes covering *ranges*.

    Parameters
    ----------
    module
        Network in eval mode (FP32 weights; it is copied, not modified).
    spec
        Names and layouts of inputs/outputs.
    ranges
        Input name → min/opt/max shape; the example input is the ``opt`` shape.
    out_path
        ``.onnx`` file to write (weights inside).
    precision
        FP32, or FP16/BF16 weights with float32 I/O.
    opset
        Requested opset (≥ 18).

    Returns
    -------
    (Path, int)
        The file and the opset actually used.
    """
    out_path = Path(out_path)
    opset = opset_for(precision, opset)
    net = copy.deepcopy(module).eval().float()
    if Precision(precision) is not Precision.FP32:
        net = TypedIO(net, torch_dtype(precision)).eval()
    examples = tuple(torch.rand(*ranges[info.name].opt, generator=torch.Generator().manual_seed(0))
                     for info in spec.inputs)
    # Positional form: one entry per input, which also fits ``forward(*xs)`` of the precision wrapper.
    dyn = _dynamic_shapes(spec, ranges, spec.input_names)
    dynamic_shapes: Any = tuple(dyn[name] for name in spec.input_names)
    if isinstance(net, TypedIO):  # forward(*xs): torch.export sees one tuple argument
        dynamic_shapes = (dynamic_shapes,)
    try:
        with torch.no_grad(), _quiet_exporter():
            program = torch.onnx.export(
                net, examples, dynamo=True, opset_version=opset, input_names=spec.input_names,
                output_names=spec.output_names, dynamic_shapes=dynamic_shapes, external_data=False,
                optimize=True, verbose=False,
            )
    except Exception as err:
        raise ExportError(f"torch.onnx.export failed for {spec.kind}: {type(err).__name__}: {err}") from err
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    model = program.model_proto
    if model.ByteSize() >= MAX_ONNX_BYTES:
        raise ExportError(f"{spec.kind} ONNX model would be {model.ByteSize() / 1e9:.2f} GB, above protobuf's 2 GB "
                          "limit for weights inside the file")
    model.doc_string = f"rllsm-vsim {spec.kind} ({Precision(precision).value}, float32 I/O)"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(out_path))
    if out_path.stat().st_size >= MAX_ONNX_BYTES:  # pragma: no cover - guarded above
        raise ExportError(f"{out_path} is larger than 2 GB")
    return out_path, opset
