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
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from engines.errors import RllsmValueError
from engines.support import StrictModel
from engines.vsisr.network import SCALE
from engines.vsisr.otf import OTFSet, load_otfs
from engines.vsisr.recombine import N_ANGLES, ANGLE_STEP_DEG, Recombiner, adjust_intensity, intensity_profile, minmax_norm_np
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
    batch_size: int = Field(4, ge=1, le=4096, description="7-plane windows per network call.")
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

    def __call__(self, x: np.ndarray) -> np.ndarray:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        amp = torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        # TF32 would silently drop float32 convolutions to a 10-bit mantissa on recent GPUs
        tf32 = _no_tf32() if self.device.type == "cuda" and dtype is None else contextlib.nullcontext()
        with torch.inference_mode(), amp, tf32:
            t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
            if self.channels_last:
                t = t.contiguous(memory_format=torch.channels_last)
            return self.model(t).float().cpu().numpy()


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


def _run(predict: Predictor, x: np.ndarray) -> np.ndarray:
    y = predict(x)
    if isinstance(y, torch.Tensor):
        y = y.detach().float().cpu().numpy()
    y = np.asarray(y, dtype=np.float32)
    want = (x.shape[0], N_ANGLES, int(x.shape[2] * SCALE), int(x.shape[3] * SCALE))
    if y.shape != want:
        raise LateralSRError(f"network returned shape {y.shape} for input {x.shape}; expected {want}")
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


def _check_volume(volume: np.ndarray) -> np.ndarray:
    if not isinstance(volume, np.ndarray):
        raise LateralSRError(f"stack must be a numpy array, got {type(volume).__name__}")
    if volume.ndim != 3:
        raise LateralSRError(
            f"stack must be 3-D (z, y, x), got {volume.ndim}-D shape {volume.shape}; "
            "split channels and time points before Step 2"
        )
    nz, ny, nx = volume.shape
    if nz < WINDOW:
        raise LateralSRError(f"stack has {nz} planes; lateral SR needs at least {WINDOW} (it drops 3 at each end)")
    if ny < 8 or nx < 8:
        raise LateralSRError(f"planes of {ny}×{nx} pixels are too small (need at least 8×8)")
    vol = volume.astype(np.float32, copy=False)
    if not np.all(np.isfinite(vol)):
        raise LateralSRError("stack contains NaN or infinite values")
    return vol


def _rotator(device: torch.device) -> tuple[Callable[[np.ndarray], Any], Callable[[Any], np.ndarray]]:
    """Move arrays to CuPy for the rotations when on CUDA and CuPy is installed, else stay in numpy."""
    if device.type == "cuda":
        try:
            import cupy  # noqa: PLC0415 - optional GPU dependency

            # CuPy works on its current device (GPU 0 unless the caller selected another); the
            # rotations are independent of where the network runs, so this is only a placement choice.
            return cupy.asarray, cupy.asnumpy
        except ImportError:
            pass
    return np.asarray, np.asarray


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
    from engines.device import pick_device

    p = params or LateralSRParams()
    vol = minmax_norm_np(_check_volume(volume))
    nz, ny, nx = vol.shape
    dev = pick_device(str(device) if device is not None else None)
    if not isinstance(otfs, OTFSet):
        otfs = load_otfs(otfs, p.wavelength_nm)
    predict = as_predictor(model, dev, p.precision)
    out_h, out_w = int(ny * SCALE), int(nx * SCALE)
    recombine = Recombiner(otfs, out_h, out_w, p.otf_weight, p.wiener, p.apo_factor, dev)

    to_backend, to_numpy = _rotator(dev)
    angles = [i * ANGLE_STEP_DEG for i in range(N_ANGLES)]
    # Rotating the whole stack once replaces the published per-window rotation (7× the work).
    stacks = [vol] + [to_numpy(rotate_planes(to_backend(vol), a)) for a in angles[1:]]

    planes = list(range(HALF, nz - HALF))  # output planes, in input indices
    centres = window_centres(nz, p.stride)
    contributors = {z: [k for k, c in enumerate(centres) if abs(c - z) <= 1] for z in planes}
    last_needed = {z: max(ks) for z, ks in contributors.items()}
    levels = None
    if p.adjust_intensity:
        levels = intensity_profile(vol[HALF : nz - HALF], p.adjust_threshold, SMOOTH_WINDOW)

    sums: list[dict[int, np.ndarray]] = [{} for _ in angles]
    counts: dict[int, int] = {}
    out = np.empty((len(planes), out_h, out_w), dtype=np.float32)
    done = 0
    pending = sorted(planes)
    for start in range(0, len(centres), p.batch_size):
        batch = centres[start : start + p.batch_size]
        for a, stack in enumerate(stacks):
            x = np.stack([stack[c - HALF : c + HALF + 1] for c in batch])
            y = _run(predict, x)
            # Each window's three outputs share one min–max scale before averaging (as published).
            y = minmax_norm_np(y, axis=(1, 2, 3))
            for c, pred in zip(batch, y):
                for k in range(3):
                    z = c - 1 + k
                    if z not in last_needed:
                        continue
                    acc = sums[a].get(z)
                    sums[a][z] = pred[k].astype(np.float64) if acc is None else acc + pred[k]
                    if a == 0:
                        counts[z] = counts.get(z, 0) + 1
        finished_upto = start + len(batch) - 1
        ready = [z for z in pending if last_needed[z] <= finished_upto]
        if not ready:
            continue
        pending = [z for z in pending if z not in set(ready)]
        bands = np.empty((len(ready), N_ANGLES, out_h, out_w), dtype=np.float64)
        for a, angle in enumerate(angles):
            avg = np.stack([sums[a].pop(z) / counts[z] for z in ready])
            if angle:
                avg = to_numpy(rotate_back_and_crop(to_backend(avg), angle, out_h, out_w))
            bands[:, a] = avg
        for z in ready:
            counts.pop(z)
        wf = torch.from_numpy(vol[ready].astype(np.float64))
        sr = recombine(wf, torch.from_numpy(bands))
        if levels is not None:
            lv = torch.as_tensor(levels[[z - HALF for z in ready]], dtype=torch.float64, device=sr.device)
            sr = adjust_intensity(sr, lv, p.adjust_threshold)
        out[[z - HALF for z in ready]] = sr.float().cpu().numpy()
        done += len(ready)
        if progress is not None:
            progress(done, len(planes))
    return minmax_norm_np(out)
