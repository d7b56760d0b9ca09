"""The project's vocabulary in one place: allowed values as StrEnums, one strict base model, one memory unit,
the default-mode rule and the sanity checks every step applies to an input stack.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from engines.errors import RllsmTypeError, RllsmValueError

__all__ = [
    "MEMORY_BUDGET_HELP", "BackendName", "ExportFormat", "MemoryBudgetMiB", "Mode", "OutputDType", "Precision",
    "StrictModel", "bytes_to_mib", "check_stack", "default_mode", "mib_to_bytes", "min_planes", "parse_memory_budget",
    "resolve_mode",
]


class StrictModel(BaseModel):
    """Base of every config and message model: unknown fields are errors and a built model is immutable.

    Set once here; a subclass adds only what differs (e.g. a custom serialiser), never ``extra``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)


class Precision(StrEnum):
    """Arithmetic precision inside the network; inputs and outputs stay float32 at every precision."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


class BackendName(StrEnum):
    """Backends selectable with ``--backend``."""

    AUTO = "auto"
    TORCH = "torch"
    ONNXRUNTIME = "onnxruntime"
    ONNXRUNTIME_CUDA = "onnxruntime-cuda"
    ONNXRUNTIME_TENSORRT = "onnxruntime-tensorrt"
    TENSORRT = "tensorrt"


class Mode(StrEnum):
    """Reconstruction modes; ``auto`` resolves to the best that the available weights support (:func:`default_mode`)."""

    AUTO = "auto"
    FULL = "full"          # VSI-SR lateral SR + RL-DFN fusion
    SR_RL = "sr-rl"        # VSI-SR lateral SR + joint Richardson–Lucy fusion
    CLASSICAL = "classical"  # joint Richardson–Lucy fusion, no network
    SINGLE_VIEW = "single-view"  # LLSM data without a mirror: deskew (+ VSI-SR) + single-view Richardson–Lucy


class ExportFormat(StrEnum):
    ONNX = "onnx"
    ENGINE = "engine"


class OutputDType(StrEnum):
    UINT16 = "uint16"
    FLOAT32 = "float32"


#: Largest budget accepted: 16 TiB, far above any machine; a bigger number is a unit mistake (bytes given as MiB).
MEMORY_BUDGET_MAX_MIB = float(1 << 24)

MemoryBudgetMiB = Annotated[float, Field(gt=0, le=MEMORY_BUDGET_MAX_MIB, allow_inf_nan=False,
                                         description="memory budget in MiB (2**20 bytes)")]
"""The one memory-budget type: MiB (2**20 bytes), a finite number in (0, 16 TiB].

Every user-facing budget — the ``--memory-budget`` flag of every command, :class:`engines.reconstruct.ReconstructParams`,
:class:`streamer.service.ServiceConfig`, :func:`engines.reconstruct.stage_chain` — is a ``MemoryBudgetMiB`` (``None``
meaning *auto*: sized from the device's free memory). Compute functions that check allocations
(:func:`engines.rldfn.fuse.fuse_rldfn`, :func:`streamer.decoding.make_work_check`) take **bytes**, converted once
with :func:`mib_to_bytes` where a config meets the compute.
"""

_MEMORY_BUDGET = TypeAdapter(MemoryBudgetMiB)

#: The help text of ``--memory-budget``, the same on every command that has the flag.
MEMORY_BUDGET_HELP = (
    "memory one reconstruction may use, in MiB (2**20 bytes), e.g. 8192; RL-DFN tiles (with --tile auto) and "
    "joint Richardson–Lucy blocks are sized to fit it, and a stack needing more is refused before anything is "
    "allocated. 'auto' (default): from this "
    "machine's free device memory"
)


def mib_to_bytes(mib: float) -> int:
    """A :data:`MemoryBudgetMiB` in bytes, for the compute functions that check allocations."""
    return int(mib * 2**20)


def bytes_to_mib(n: float) -> float:
    """Bytes as MiB (the budget unit)."""
    return float(n) / 2**20


def parse_memory_budget(value: str | float | None, *, allow_auto: bool = True) -> float | None:
    """Parse a memory budget as the command line and configs give it: a number of MiB, or ``auto`` (→ ``None``).

    Raises
    ------
    RllsmValueError
        Not a number (``12GB``: units are not accepted, the unit is always MiB), not finite, ≤ 0, above
        16 TiB, or ``auto`` where *allow_auto* is false. The message names the unit.
    """
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.lower() == "auto":
            if allow_auto:
                return None
            raise RllsmValueError("'auto' is not allowed here; give a number of MiB (2**20 bytes), e.g. 8192")
        try:
            number = float(text)
        except ValueError:
            raise RllsmValueError(
                f"{value!r} is not a number of MiB (2**20 bytes){' or auto' if allow_auto else ''}; "
                "give the plain number without a unit, e.g. 8192 for 8 GiB") from None
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise RllsmValueError(f"a memory budget is a number of MiB (2**20 bytes), got {type(value).__name__}")
    else:
        number = float(value)
    try:
        return float(_MEMORY_BUDGET.validate_python(number))
    except ValidationError:
        raise RllsmValueError(
            f"{value!r} is not a usable memory budget: expected a finite number of MiB (2**20 bytes) > 0 and "
            f"≤ {MEMORY_BUDGET_MAX_MIB:.0f}") from None


#: Lateral SR reads 7-plane windows and drops 3 planes at each end.
LATERAL_SR_MIN_PLANES = 7
#: The view split rotates the volume and searches a mirror plane; fewer planes leave nothing to rotate.
SPLIT_MIN_PLANES = 4


def default_mode(*, vsisr: bool, rldfn: bool, demo_installed: bool) -> Mode:
    """The best mode that the available weights support — the one rule every command uses.

    Parameters
    ----------
    vsisr, rldfn
        Whether the user gave VSI-SR and RL-DFN weights.
    demo_installed
        Whether the shipped demo weights are present.

    Both networks given → ``full``; VSI-SR only → ``sr-rl``. Nothing given → ``sr-rl`` with the shipped demo
    VSI-SR when installed (not ``full``: the demo RL-DFN, trained on simulated data only, loses most structures,
    see MODEL_CARD.md), else ``classical``.
    """
    if vsisr:
        return Mode.FULL if rldfn else Mode.SR_RL
    return Mode.SR_RL if demo_installed else Mode.CLASSICAL


def demo_weights_installed() -> bool:
    """Whether the shipped demo VSI-SR weights are present (a file check, nothing is loaded)."""
    from pathlib import Path

    try:
        from engines.weights import demo_weights_path

        return Path(demo_weights_path("vsi-sr")).exists()
    except (OSError, KeyError, ValueError):
        return False


def resolve_mode(requested: str, *, vsisr: bool = False, rldfn: bool = False) -> str:
    """*requested* unless it is ``auto``; then :func:`default_mode` for these weights and this installation."""
    if requested != Mode.AUTO:
        return str(requested)
    return default_mode(vsisr=vsisr, rldfn=rldfn, demo_installed=demo_weights_installed()).value


def min_planes(mode: str, lateral_sr: bool = False) -> int:
    """Fewest raw planes a reconstruction mode can work with (*lateral_sr*: single-view with VSI-SR)."""
    return LATERAL_SR_MIN_PLANES if mode in (Mode.FULL, Mode.SR_RL) or lateral_sr else SPLIT_MIN_PLANES


def planes_reason(mode: str, lateral_sr: bool = False) -> str:
    """Who needs :func:`min_planes` planes, in words for an error message."""
    if mode in (Mode.FULL, Mode.SR_RL) or lateral_sr:
        return f"mode '{mode}' (lateral SR reads 7-plane windows)"
    if mode == Mode.SINGLE_VIEW:
        return f"mode '{mode}' (the deconvolution)"
    return f"mode '{mode}' (the view split)"


def check_stack(data: np.ndarray, what: str = "stack", *, min_planes: int = 1, check_values: bool = True,
                needed_by: str = "this step") -> None:
    """Refuse, before any compute, a stack no step can turn into a meaningful result.

    Raises
    ------
    RllsmTypeError
        Not numeric (bool, complex, object).
    RllsmValueError
        Not 3-D, empty, fewer than *min_planes* planes, NaN/infinite voxels, or one value throughout (a blank
        or failed acquisition would otherwise be stretched into full-range noise).
    """
    if not isinstance(data, np.ndarray):
        raise RllsmTypeError(f"{what} must be a numpy array, got {type(data).__name__}")
    if data.dtype == bool or not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)):
        raise RllsmTypeError(f"{what} holds {data.dtype} values; expected integer or floating-point intensities")
    if data.ndim != 3:
        raise RllsmValueError(f"{what} has shape {data.shape} ({data.ndim}-D); expected one 3-D (z, y, x) stack")
    if data.size == 0:
        raise RllsmValueError(f"{what} is empty (shape {'×'.join(map(str, data.shape))})")
    if data.shape[0] < min_planes:
        raise RllsmValueError(f"{what} has {data.shape[0]} planes; {needed_by} needs at least {min_planes}")
    if not check_values:
        return
    if np.issubdtype(data.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            raise RllsmValueError(
                f"{what} holds {bad} NaN or infinite voxels ({100.0 * bad / data.size:.2g} % of {data.size}); "
                "replace them (e.g. with the camera offset) before reconstruction")
    lo, hi = data.min(), data.max()
    if lo == hi:
        raise RllsmValueError(f"{what} holds the single value {lo.item()!r} in every voxel: a blank or failed "
                              "acquisition, nothing to reconstruct")
