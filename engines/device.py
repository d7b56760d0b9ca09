"""Choice of compute device: CUDA when present, the CPU otherwise, same numbers either way."""

from __future__ import annotations

import os

import torch


def pick_device(requested: str | None = None) -> torch.device:
    """Return the device to compute on.

    Order: explicit argument → ``RLLSM_DEVICE`` environment variable → CUDA if available → CPU.
    Asking for CUDA where none exists is an error rather than a silent fall-back, so a user never
    believes a run was on the GPU when it was not.
    """
    name = requested or os.environ.get("RLLSM_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device '{name}' requested but torch sees no CUDA GPU (torch {torch.__version__})")
    return dev
