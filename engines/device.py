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


def default_memory_budget_gb(device: torch.device | str | None = None) -> float:
    """Memory one reconstruction may use: 80 % of the GPU's free memory, or half the free RAM (at most 16 GB).

    Tiled steps size their tiles from this, so a volume of any size fits whatever else the machine is doing.
    """
    dev = torch.device(device) if device is not None else pick_device()
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return max(0.5, 0.8 * free / 2**30)
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4.0
    return float(min(16.0, max(0.5, 0.5 * free / 2**30)))
