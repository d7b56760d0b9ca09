"""Step 2 of Meta-rLLS-VSIM: laterally isotropic super-resolution of a deskewed stack, in memory.

For every plane z (except three at each end) the network sees planes z−3 … z+3 and predicts the 0°
virtual-SIM component of planes z−1, z, z+1; each output plane is the average of the (up to three)
predictions it receives.  The same is done on the stack rotated in-plane by 60° and by 120°; those
predictions are rotated back and cropped.  The three orientations and the wide-field plane are then
recombined with Wiener weights (:mod:`engines.vsisr.recombine`), optionally given the raw stack's
z intensity trend, and the volume is scaled to [0, 1].

Differences from the published script, none of which changes the arithmetic beyond float rounding:
the stack is rotated once instead of once per 7-plane window; windows go through the network in
batches; nothing is written to disk between steps (so no 16-bit rounding of intermediates); the Wiener
filters are built once per volume instead of once per plane; and the unused band-0 Wiener image is not
computed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from engines.errors import RllsmValueError
from engines.support import StrictModel
from engines.vsisr.network import SCALE
from engines.vsisr.otf import OTFSet, load_otfs
from engines.vsisr.recombine import (
    ANGLE_STEP_DEG,
    N_ANGLES,
    Recombiner,
    adjust_intensity,
    intensity_profile_tensor,
    minmax_norm,
)
from engines.vsisr.rotate import rotate_back_and_crop, rotate_planes

#: Planes the network sees at once, and how many it predicts (centre ± 1).
WINDOW = 7
HALF = WINDOW // 2
#: Moving-average window of the z intensity profile (planes).
SMOOTH_WINDOW = 11

Predictor = Callable[[np.ndarray], Any]


class LateralSRError(RllsmValueError):
    """The stack or the model cannot be used for lateral SR (wrong dimensions, too few planes, …)."""


class LateralSRParams(StrictModel):
    """Parameters of Step 2 (defaults = the published script)."""

    version: Literal[1] = 1
    otf_weight: float = Field(8.0, ge=0.0, le=1000.0, description="Weight of the side-band OTF per orientation.")
    wiener: float = Field(0.1, gt=0.0, le=10.0, description="Wiener constant σ (σ² is added to the denominator).")
    apo_factor: float = Field(2.0, ge=0.0, le=10.0, description="Power applied to the apodisation mask.")
    adjust_intensity: bool = Field(True, description="Give the output the z intensity trend of the raw stack.")
    adjust_threshold: float = Field(99.0, gt=0.0, lt=100.0, description="Percentile above which brightness is measured.")
    stride: Literal[1, 3] = Field(
        1, description="1: every window (each plane predicted 3× and averaged, as published); 3: each plane once."
    )
    batch_size: Annotated[int, Field(ge=1, le=4096)] | Literal["auto"] = Field(
        4, description="7-plane windows per network call; auto: as many as half the device's free memory holds "
        "(GPU; 4 on the CPU, where larger batches are not faster).")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Network arithmetic for torch models: fp32 (published numbers), bf16 (CPU/GPU), fp16 (GPU)."
    )
    wavelength_nm: float = Field(488.0, ge=300.0, le=1100.0, description="Excitation line; picks the OTF folder.")


Precision = Literal["fp32", "bf16", "fp16"]


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    """Full float32 convolutions on CUDA for the duration of one call (PyTorch's default allows TF32)."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = old


class TorchPredictor:
    """Runs a torch module on batches of windows: inference mode, chosen device, channels-last on CPU.

    ``precision="fp32"`` (default) keeps full float32 arithmetic, also on CUDA where PyTorch would
    otherwise use TF32 for convolutions; ``"bf16"``/``"fp16"`` run the convolutions under autocast
    (faster, at a measured cost: docs/benchmarks/lateral-sr.md).
    """

    def __init__(
        self, model: nn.Module, device: torch.device | str | None = None, channels_last: bool | None = None,
        precision: Precision = "fp32",
    ) -> None:
        from engines.device import pick_device

        self.device = pick_device(str(device) if device is not None else None)
        self.precision = precision
        if precision == "fp16" and self.device.type != "cuda":
            raise LateralSRError("fp16 inference needs a CUDA device; use bf16 on the CPU")
        self.model = model.to(self.device).eval()
        # channels-last lets oneDNN pick its blocked conv kernels without per-call reorders on CPU
        self.channels_last = self.device.type == "cpu" if channels_last is None else channels_last
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    #: Takes and returns tensors on :attr:`device` (the chain then never leaves the device for the network).
    accepts_tensors = True

    def __call__(self, x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """numpy in → numpy out; a tensor in → a float32 tensor out on :attr:`device`."""
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        amp = torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        # TF32 would silently drop float32 convolutions to a 10-bit mantissa on recent GPUs
        tf32 = _no_tf32() if self.device.type == "cuda" and dtype is None else contextlib.nullcontext()
        as_numpy = not isinstance(x, torch.Tensor)
        with torch.inference_mode(), amp, tf32:
            t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)) if as_numpy else x
            t = t.to(self.device, torch.float32)
            if self.channels_last:
                t = t.contiguous(memory_format=torch.channels_last)
            y = self.model(t).float()
        return y.cpu().numpy() if as_numpy else y


def as_predictor(
    model: nn.Module | Predictor, device: torch.device | str | None = None, precision: Precision = "fp32"
) -> Predictor:
    """Wrap an ``nn.Module`` in :class:`TorchPredictor`; pass any other callable through.

    A callable (ONNX Runtime, TensorRT, …) takes ``(N, 7, H, W)`` float32 and returns ``(N, 3, 1.5H, 1.5W)``
    as a numpy array or torch tensor.
    """
    if isinstance(model, nn.Module):
        return TorchPredictor(model, device, precision=precision)
    if callable(model):
        return model
    raise LateralSRError(f"model must be a torch nn.Module or a callable, got {type(model).__name__}")


def _run(predict: Predictor, x: torch.Tensor) -> torch.Tensor:
    """One network call on a batch of windows already on the device; the result stays there (float32)."""
    from engines.backends.base import Backend
    from engines.device import to_device, to_host

    if getattr(predict, "accepts_tensors", False) or isinstance(predict, Backend):
        y = predict(x)
    elif x.device.type == "cpu":
        y = predict(x.numpy())  # a plain callable takes numpy; on the CPU that is a view, not a copy
    else:
        # A host-only runtime in a GPU chain costs a round trip per batch; counted so a report shows it.
        y = predict(to_host(x))
    if not isinstance(y, torch.Tensor):
        y = np.asarray(y, dtype=np.float32)
        y = torch.from_numpy(y) if x.device.type == "cpu" else to_device(y, x.device)
    y = y.detach().to(x.device, torch.float32)
    want = (x.shape[0], N_ANGLES, int(x.shape[2] * SCALE), int(x.shape[3] * SCALE))
    if tuple(y.shape) != want:
        raise LateralSRError(f"network returned shape {tuple(y.shape)} for input {tuple(x.shape)}; expected {want}")
    return y


def window_centres(nz: int, stride: int) -> list[int]:
    """Centre planes of the 7-plane windows.  Stride 3 covers every output plane exactly once where possible."""
    first, last = HALF, nz - HALF - 1
    if stride == 1:
        return list(range(first, last + 1))
    centres = list(range(first + 1, last + 1, 3))
    if not centres or centres[-1] + 1 < last:
        centres.append(last)
    return sorted(set(centres))


def _check_shape(shape: tuple[int, ...]) -> None:
    if len(shape) != 3:
        raise LateralSRError(
            f"stack must be 3-D (z, y, x), got {len(shape)}-D shape {shape}; "
            "split channels and time points before Step 2"
        )
    nz, ny, nx = shape
    if nz < WINDOW:
        raise LateralSRError(f"stack has {nz} planes; lateral SR needs at least {WINDOW} (it drops 3 at each end)")
    if ny < 8 or nx < 8:
        raise LateralSRError(f"planes of {ny}×{nx} pixels are too small (need at least 8×8)")


def _check_volume(volume: np.ndarray) -> np.ndarray:
    if not isinstance(volume, np.ndarray):
        raise LateralSRError(f"stack must be a numpy array, got {type(volume).__name__}")
    _check_shape(volume.shape)
    vol = volume.astype(np.float32, copy=False)
    if not np.all(np.isfinite(vol)):
        raise LateralSRError("stack contains NaN or infinite values")
    return vol


def _check_tensor(volume: torch.Tensor) -> torch.Tensor:
    _check_shape(tuple(volume.shape))
    vol = volume.to(torch.float32)
    if not bool(torch.isfinite(vol).all()):
        raise LateralSRError("stack contains NaN or infinite values")
    return vol


_warned_no_cupy = False


def rotate_tensor(t: torch.Tensor, angle_deg: float, back_crop: tuple[int, int] | None = None) -> torch.Tensor:
    """The published cubic-spline in-plane rotation of a tensor, on its device where that gives scipy's numbers.

    CPU: scipy on a view of the tensor's memory. CUDA: ``cupyx.scipy.ndimage`` (the same algorithm) on the
    tensor's memory through DLPack, no copy; without CuPy the planes make a counted round trip to scipy on the
    host. ``back_crop=(h, w)`` undoes a rotation and cuts the original field of view
    (:func:`rotate_back_and_crop`).
    """
    global _warned_no_cupy

    def apply(a: Any) -> Any:
        return rotate_planes(a, angle_deg) if back_crop is None else rotate_back_and_crop(a, angle_deg, *back_crop)

    if t.device.type == "cpu":
        return torch.from_numpy(np.ascontiguousarray(apply(t.contiguous().numpy())))
    if t.device.type == "cuda":
        try:
            import cupy
        except ImportError:
            cupy = None
        if cupy is not None:
            with cupy.cuda.Device(t.device.index or 0), cupy.cuda.ExternalStream(torch.cuda.current_stream(t.device).cuda_stream):
                out = apply(cupy.from_dlpack(t.contiguous()))
                return torch.from_dlpack(cupy.ascontiguousarray(out))
        if not _warned_no_cupy:
            import logging

            logging.getLogger(__name__).warning(
                "CuPy is not installed: the 60°/120° rotations of Step 2 run on the CPU (install the `gpu` extra)")
            _warned_no_cupy = True
    from engines.device import to_device, to_host

    return to_device(np.ascontiguousarray(apply(to_host(t))), t.device)


def _group_by_shape(stacks: list[torch.Tensor]) -> list[list[int]]:
    """Orientations whose rotated canvases have the same size (60° and 120°) share network batches."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for a, st in enumerate(stacks):
        groups.setdefault(tuple(st.shape[1:]), []).append(a)
    return list(groups.values())


def auto_batch_size(plane_shape: tuple[int, int], budget_bytes: int, features: int = 64) -> int:
    """Windows per network call that fit ``budget_bytes`` of activations (at least 1, at most 4096).

    In inference mode VSI-SR holds at most about three ``features``-channel planes at the input size (block
    input, output, attention-scaled copy) and, after the 1.5× resize, a ``features``- and a 256-channel plane at
    2.25× the pixels; float32 throughout (autocast keeps some float32 copies), plus 50 % for the allocator.
    """
    h, w = plane_shape
    per_window = int(1.5 * 4 * h * w * (3 * features + 2.25 * (features + 256)))
    return int(max(1, min(4096, budget_bytes // max(1, per_window))))


def resolve_batch_size(batch_size: int | str, plane_shape: tuple[int, int], device: torch.device) -> int:
    """Windows per network call: an int as given; ``"auto"`` from half the free GPU memory (4 on the CPU)."""
    if batch_size != "auto":
        return int(batch_size)
    if device.type != "cuda":
        return 4
    from engines.device import default_memory_budget_mib
    from engines.vsisr.rotate import rotated_shape

    canvas = rotated_shape(*plane_shape, ANGLE_STEP_DEG)  # the rotated planes are the largest network inputs
    return auto_batch_size(canvas, int(0.5 * default_memory_budget_mib(device) * 2**20))


def lateral_sr(
    volume: np.ndarray,
    model: nn.Module | Predictor,
    otfs: OTFSet | str | Path,
    params: LateralSRParams | None = None,
    device: torch.device | str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Laterally isotropic SR of one deskewed stack (Step 2).

    Parameters
    ----------
    volume
        ``(Nz, Ny, Nx)`` deskewed stack, any real dtype; it is min–max scaled to [0, 1] first.
    model
        The VSI-SR network (``nn.Module``) or a callable mapping ``(N, 7, H, W)`` float32 to
        ``(N, 3, 1.5H, 1.5W)`` (e.g. an ONNX Runtime or TensorRT session wrapper).
    otfs
        Decoded OTFs, or a folder to read them from (see :func:`engines.vsisr.otf.load_otfs`).
    params
        :class:`LateralSRParams`; defaults reproduce the published script.
    device
        torch device for the network and the Fourier recombination; default from
        :func:`engines.device.pick_device`.
    progress
        Called as ``progress(planes_done, planes_total)``.

    Returns
    -------
    numpy.ndarray
        ``(Nz − 6, floor(1.5 Ny), floor(1.5 Nx))`` float32 in [0, 1].

    Raises
    ------
    LateralSRError
        Stack not 3-D, fewer than 7 planes, planes smaller than 8×8, non-finite values, or a network
        output of the wrong shape.
    """
    from engines.device import pick_device, to_device, to_host

    vol = _check_volume(volume)
    dev = pick_device(str(device) if device is not None else None)
    return to_host(lateral_sr_tensor(to_device(vol, dev), model, otfs, params, progress=progress))


def lateral_sr_tensor(
    volume: torch.Tensor,
    model: nn.Module | Predictor,
    otfs: OTFSet | str | Path,
    params: LateralSRParams | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """:func:`lateral_sr` on a tensor's device: returns a float32 tensor there, same numbers.

    Only the per-plane brightness profile (one number per plane) is read back to the host.
    """
    p = params or LateralSRParams()
    if not isinstance(volume, torch.Tensor):
        raise LateralSRError(f"lateral_sr_tensor takes a torch tensor, got {type(volume).__name__}")
    dev = volume.device
    vol = minmax_norm(_check_tensor(volume), (0, 1, 2))
    nz, ny, nx = vol.shape
    if not isinstance(otfs, OTFSet):
        otfs = load_otfs(otfs, p.wavelength_nm)
    predict = as_predictor(model, dev, p.precision)
    out_h, out_w = int(ny * SCALE), int(nx * SCALE)
    recombine = Recombiner(otfs, out_h, out_w, p.otf_weight, p.wiener, p.apo_factor, dev)

    angles = [i * ANGLE_STEP_DEG for i in range(N_ANGLES)]
    batch_size = resolve_batch_size(p.batch_size, (ny, nx), dev)
    with torch.no_grad():
        # Rotating the whole stack once replaces the published per-window rotation (7× the work).
        stacks = [vol] + [rotate_tensor(vol, a) for a in angles[1:]]

        planes = list(range(HALF, nz - HALF))  # output planes, in input indices
        centres = window_centres(nz, p.stride)
        contributors = {z: [k for k, c in enumerate(centres) if abs(c - z) <= 1] for z in planes}
        last_needed = {z: max(ks) for z, ks in contributors.items()}
        levels = None
        if p.adjust_intensity:
            levels = intensity_profile_tensor(vol[HALF : nz - HALF], p.adjust_threshold, SMOOTH_WINDOW)

        sums: list[dict[int, torch.Tensor]] = [{} for _ in angles]
        counts: dict[int, int] = {}
        out = torch.empty((len(planes), out_h, out_w), dtype=torch.float32, device=dev)
        done = 0
        pending = sorted(planes)
        groups = _group_by_shape(stacks)
        for start in range(0, len(centres), batch_size):
            batch = centres[start : start + batch_size]
            for group in groups:
                # Orientations of one canvas size go through the network together, batch_size windows per call.
                jobs = [(a, c) for a in group for c in batch]
                for j0 in range(0, len(jobs), batch_size):
                    part = jobs[j0 : j0 + batch_size]
                    x = torch.stack([stacks[a][c - HALF : c + HALF + 1] for a, c in part])
                    # Each window's three outputs share one min–max scale before averaging (as published).
                    y = minmax_norm(_run(predict, x), (1, 2, 3))
                    for (a, c), pred in zip(part, y):
                        for k in range(3):
                            z = c - 1 + k
                            if z not in last_needed:
                                continue
                            acc = sums[a].get(z)
                            sums[a][z] = pred[k].to(torch.float64) if acc is None else acc.add_(pred[k])
                            if a == 0:
                                counts[z] = counts.get(z, 0) + 1
            finished_upto = start + len(batch) - 1
            ready = [z for z in pending if last_needed[z] <= finished_upto]
            if not ready:
                continue
            ready_set = set(ready)
            pending = [z for z in pending if z not in ready_set]
            bands = torch.empty((len(ready), N_ANGLES, out_h, out_w), dtype=torch.float64, device=dev)
            for a, angle in enumerate(angles):
                avg = torch.stack([sums[a].pop(z).div_(counts[z]) for z in ready])
                if angle:
                    avg = rotate_tensor(avg, angle, back_crop=(out_h, out_w))
                bands[:, a] = avg
            for z in ready:
                counts.pop(z)
            idx = torch.tensor(ready, device=dev)
            sr = recombine(vol.index_select(0, idx).to(torch.float64), bands)
            if levels is not None:
                lv = levels[[z - HALF for z in ready]].to(torch.float64)
                sr = adjust_intensity(sr, lv, p.adjust_threshold)
            out[idx - HALF] = sr.to(torch.float32)
            done += len(ready)
            if progress is not None:
                progress(done, len(planes))
        return minmax_norm(out, (0, 1, 2))
