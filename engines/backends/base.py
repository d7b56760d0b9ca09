"""The backend interface: one public :meth:`Backend.forward` that checks inputs, one ``_forward_impl`` per backend.

Every backend (torch, ONNX Runtime, TensorRT) takes and returns float32 arrays; numpy in gives numpy out, a torch
tensor in gives a torch tensor out (on the same device).  The checks — count, rank, fixed axes, divisibility,
the validated/optimisation-profile shape range, dtype, finiteness — run before any backend code, so every backend
reports a bad input with the same words.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from engines.backends.errors import BackendError, InputDtypeError, InputShapeError, InputValueError
from engines.backends.manifest import Precision, ShapeRange, TensorInfo

Array = Any  # numpy.ndarray or torch.Tensor; kept loose so importing this module never imports torch


@dataclass(frozen=True)
class ModelSpec:
    """What a network accepts and returns, independent of the backend that runs it.

    Attributes
    ----------
    kind
        Model name used on the command line (``vsi-sr``, ``rl-dfn``).
    inputs, outputs
        Named tensors; dynamic axes are named by a letter of the layout.
    divisibility
        Axis letter → every size on that axis must be a multiple of it.
    default_ranges
        Shape ranges used when the user gives none (export) — one :class:`ShapeRange` per input.
    output_shapes
        Input shapes → output shapes (``None``: unknown before running).
    """

    kind: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    divisibility: Mapping[str, int] = field(default_factory=dict)
    default_ranges: Mapping[str, ShapeRange] = field(default_factory=dict)
    #: Input shapes → output shapes; lets GPU backends allocate outputs before the call.
    output_shapes: Callable[[list[tuple[int, ...]]], list[tuple[int, ...]]] | None = None

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


def _fmt(shape: Sequence[int]) -> str:
    return "×".join(str(int(s)) for s in shape)


def check_shape(spec: ModelSpec, info: TensorInfo, shape: Sequence[int], rng: ShapeRange | None,
                where: str = "") -> None:
    """Raise :class:`InputShapeError` unless *shape* fits *info*, the divisibility rules and *rng*.

    The message names the axis, the size given and the valid range, so the user can crop, pad or re-export.
    """
    shape = tuple(int(s) for s in shape)
    label = f"input '{info.name}'{where}"
    if len(shape) != len(info.shape):
        raise InputShapeError(f"{label}: expected {len(info.shape)} axes {info.layout} "
                              f"({_fmt_symbolic(info)}), got shape {_fmt(shape)}")
    for axis, (size, want) in enumerate(zip(shape, info.shape)):
        letter = info.layout[axis]
        if isinstance(want, int) and size != want:
            raise InputShapeError(f"{label}: axis {letter} must be {want}, got {size} (shape {_fmt(shape)}; "
                                  f"expected {_fmt_symbolic(info)})")
        multiple = spec.divisibility.get(letter, 1)
        if size % multiple:
            raise InputShapeError(f"{label}: axis {letter} = {size} is not a multiple of {multiple}; "
                                  f"crop or pad to {size - size % multiple} or {size + multiple - size % multiple}")
    if rng is not None:
        bad = [i for i, s in enumerate(shape) if not rng.min[i] <= s <= rng.max[i]]
        if bad:
            i = bad[0]
            valid = ", ".join(f"{info.layout[j]} {rng.min[j]}–{rng.max[j]}" for j in range(len(shape))
                              if rng.min[j] != rng.max[j])
            raise InputShapeError(
                f"{label}: axis {info.layout[i]} = {shape[i]} is outside the model's shape range "
                f"{rng.min[i]}–{rng.max[i]} (shape {_fmt(shape)}; valid: {valid or _fmt(rng.min)}). "
                "Tile the data, or re-export with a wider --min-shape/--max-shape.")


def _fmt_symbolic(info: TensorInfo) -> str:
    return "×".join(str(s) for s in info.shape)


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "dtype") and hasattr(x, "device")


class Backend(ABC):
    """Base class of the runtime backends.

    Parameters
    ----------
    spec
        I/O description of the network.
    shape_ranges
        Input name → accepted range (the validated range of an exported model, or an engine's profile);
        ``None`` accepts any size that satisfies the divisibility rules.
    check_finite
        Reject NaN/inf inputs (one extra read of the input; cheap next to the network).
    """

    #: Name used on the command line and in error messages.
    name: ClassVar[str] = "backend"
    #: Array type ``_forward_impl`` receives: ``"numpy"`` or ``"torch"``.
    native: ClassVar[str] = "numpy"

    def __init__(self, spec: ModelSpec, shape_ranges: Mapping[str, ShapeRange] | None = None,
                 precision: Precision = Precision.FP32, check_finite: bool = True) -> None:
        self.spec = spec
        self.shape_ranges = dict(shape_ranges) if shape_ranges else None
        self.precision = Precision(precision)
        self.check_finite = check_finite

    # -- public ---------------------------------------------------------------------------------------------
    def forward(self, *inputs: Array) -> list[Array]:
        """Run the network on float32 inputs (positional, in :attr:`ModelSpec.input_names` order).

        Returns
        -------
        list
            Outputs in :attr:`ModelSpec.output_names` order, float32, numpy or torch like the first input.

        Raises
        ------
        InputShapeError, InputDtypeError, InputValueError
            The inputs do not fit the model; nothing has run.
        """
        self.check_inputs(inputs)
        as_torch = _is_torch(inputs[0])
        device = inputs[0].device if as_torch else None
        native = [self._to_native(x) for x in inputs]
        outputs = self._forward_impl(native)
        if self.spec.output_shapes is not None:
            want = self.spec.output_shapes([tuple(x.shape) for x in inputs])
            got = [tuple(y.shape) for y in outputs]
            if got != [tuple(w) for w in want]:
                raise BackendError(f"{self.describe()} returned shapes {got} for inputs "
                                   f"{[tuple(x.shape) for x in inputs]}; {self.spec.kind} must return {want}")
        return [self._from_native(y, as_torch, device) for y in outputs]

    def __call__(self, *inputs: Array) -> Array:
        """Single-output convenience: ``predict(x) -> y`` (a list when the model has several outputs)."""
        out = self.forward(*inputs)
        return out[0] if len(out) == 1 else out

    def check_inputs(self, inputs: Sequence[Array]) -> None:
        """Validate count, dtype, shape and (optionally) finiteness of *inputs*; raise a typed error."""
        names = self.spec.input_names
        if len(inputs) != len(names):
            raise InputShapeError(f"{self.spec.kind} takes {len(names)} input(s) ({', '.join(names)}), "
                                  f"got {len(inputs)}")
        first = None
        for x, info in zip(inputs, self.spec.inputs):
            if _is_torch(x):
                dtype = str(x.dtype).removeprefix("torch.")
            elif isinstance(x, np.ndarray):
                dtype = str(x.dtype)
            else:
                raise InputDtypeError(f"input '{info.name}': expected a numpy array or torch tensor, "
                                      f"got {type(x).__name__}")
            if dtype != "float32":
                raise InputDtypeError(f"input '{info.name}': expected float32, got {dtype} "
                                      "(convert camera counts with .astype(np.float32) after normalising)")
            rng = self.shape_ranges.get(info.name) if self.shape_ranges else None
            check_shape(self.spec, info, tuple(x.shape), rng)
            if first is None:
                first = tuple(x.shape)
            elif len(self.spec.inputs) > 1 and tuple(x.shape) != first:
                raise InputShapeError(f"inputs must have the same shape; '{names[0]}' is {_fmt(first)}, "
                                      f"'{info.name}' is {_fmt(x.shape)}")
            if self.check_finite and not _all_finite(x):
                raise InputValueError(f"input '{info.name}' contains NaN or infinite values")

    def describe(self) -> str:
        """One line saying what runs the model (for logs and benchmark tables)."""
        return f"{self.name} ({self.precision.value})"

    # -- for subclasses -------------------------------------------------------------------------------------
    @abstractmethod
    def _forward_impl(self, inputs: list[Array]) -> list[Array]:
        """Run the network on checked inputs already converted to :attr:`native` arrays."""

    @abstractmethod
    def unload(self) -> None:
        """Release the model and any device memory; the backend is unusable afterwards."""

    def _to_native(self, x: Array) -> Array:
        if self.native == "numpy":
            return x.detach().cpu().numpy() if _is_torch(x) else np.ascontiguousarray(x)
        import torch

        return x if _is_torch(x) else torch.from_numpy(np.ascontiguousarray(x))

    def _from_native(self, y: Array, as_torch: bool, device: Any) -> Array:
        if as_torch:
            import torch

            t = y if _is_torch(y) else torch.from_numpy(np.asarray(y))
            return t.to(device)
        return y.detach().cpu().numpy() if _is_torch(y) else np.asarray(y)

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.unload()


def _all_finite(x: Array) -> bool:
    if _is_torch(x):
        import torch

        return bool(torch.isfinite(x).all())
    return bool(np.isfinite(x).all())

