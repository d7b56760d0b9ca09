"""Choice of compute device: CUDA when present, the CPU otherwise, same numbers either way."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import astuple, dataclass
from typing import Any, Literal

import numpy as np
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


def default_memory_budget_mib(device: torch.device | str | None = None) -> float:
    """Memory one reconstruction may use, in MiB (:data:`engines.support.MemoryBudgetMiB`): 80 % of the GPU's free
    memory, or half the free RAM (at most 16 GiB), never under 512 MiB.

    Tiled steps size their tiles from this, so a volume of any size fits whatever else the machine is doing.
    """
    dev = torch.device(device) if device is not None else pick_device()
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return max(512.0, 0.8 * free / 2**20)
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4096.0
    return float(min(16384.0, max(512.0, 0.5 * free / 2**20)))


def default_memory_budget_gb(device: torch.device | str | None = None) -> float:
    """:func:`default_memory_budget_mib` in GiB, for callers not yet moved to the one unit (MiB)."""
    return default_memory_budget_mib(device) / 1024


# --- edges of the device-resident chain -----------------------------------------------------------------------
#
# The reconstruction keeps a stack on the compute device from background removal to fusion. The only places where
# a volume crosses between host memory and the device are :func:`to_device` and :func:`to_host`; they count what
# they move, so a test (and the GPU report) can check that a stack goes in once and comes back once. Small
# read-backs for host-side fits (2-D projections for the band and mirror searches, scalars) go through
# :func:`probe_to_host` and are counted apart.


@dataclass
class TransferCounts:
    """Host↔device edge crossings since the counter was created or reset (calls and bytes)."""

    h2d: int = 0
    h2d_bytes: int = 0
    d2h: int = 0
    d2h_bytes: int = 0
    probes: int = 0
    probe_bytes: int = 0

    def __sub__(self, other: TransferCounts) -> TransferCounts:
        return TransferCounts(*(a - b for a, b in zip(astuple(self), astuple(other))))


class TransferCounter:
    """Thread-safe tally of the edge transfers (one process-wide instance: :data:`transfers`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._c = TransferCounts()

    def add(self, kind: Literal["h2d", "d2h", "probe"], nbytes: int) -> None:
        with self._lock:
            name = "probes" if kind == "probe" else kind
            setattr(self._c, name, getattr(self._c, name) + 1)
            setattr(self._c, f"{kind}_bytes", getattr(self._c, f"{kind}_bytes") + int(nbytes))

    def snapshot(self) -> TransferCounts:
        with self._lock:
            return TransferCounts(*astuple(self._c))

    @contextlib.contextmanager
    def measure(self) -> Iterator[Callable[[], TransferCounts]]:
        """``with transfers.measure() as got: ...; got()`` → the transfers made inside the block (all threads)."""
        start = self.snapshot()
        end: list[TransferCounts] = []
        try:
            yield lambda: (end[0] if end else self.snapshot()) - start
        finally:
            end.append(self.snapshot())


transfers = TransferCounter()


def to_device(x: Any, device: torch.device | str, *, dtype: torch.dtype | None = None,
              non_blocking: bool = False) -> torch.Tensor:
    """Move a host array (numpy or CPU tensor) to ``device`` as a tensor; a tensor already there is returned as is.

    On CUDA the copy is made from pinned memory (``non_blocking`` then lets it overlap with other streams); on the
    CPU a numpy array becomes a tensor without a copy. Every call that moves a host array counts as one
    host→device transfer in :data:`transfers`.
    """
    dev = torch.device(device)
    if isinstance(x, torch.Tensor) and _same_device(x.device, dev):
        return x if dtype is None else x.to(dtype)
    if isinstance(x, torch.Tensor):
        t = x
    else:
        arr = np.ascontiguousarray(x)
        if arr.dtype == np.uint16 and dev.type != "cpu":
            # torch has few uint16 kernels on CUDA: move the camera's 2 bytes as int16, widen on the device
            t = _upload(torch.from_numpy(arr.view(np.int16)), dev, non_blocking)
            t = t.to(torch.int32).bitwise_and_(0xFFFF)
            return t if dtype is None else t.to(dtype)
        t = torch.from_numpy(arr)
    return _upload(t, dev, non_blocking) if dtype is None else _upload(t, dev, non_blocking).to(dtype)


def _upload(t: torch.Tensor, dev: torch.device, non_blocking: bool) -> torch.Tensor:
    transfers.add("h2d", t.element_size() * t.numel())
    if dev.type == "cuda":
        if t.device.type == "cpu" and not t.is_pinned():
            t = t.pin_memory()
        return t.to(dev, non_blocking=non_blocking)
    return t.to(dev)


def to_host(t: Any) -> np.ndarray:
    """A device tensor (or a tuple of them) as numpy on the host: one counted device→host transfer per tensor."""
    if isinstance(t, (tuple, list)):
        return type(t)(to_host(v) for v in t)  # type: ignore[return-value]
    if not isinstance(t, torch.Tensor):
        return np.asarray(t)
    transfers.add("d2h", t.element_size() * t.numel())
    return t.detach().cpu().numpy()


def probe_to_host(t: torch.Tensor) -> np.ndarray:
    """A small tensor (a projection, a profile, a scalar) read back for a host-side fit; counted as a probe."""
    transfers.add("probe", t.element_size() * t.numel())
    return t.detach().cpu().numpy()


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    cur = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return (a.index if a.index is not None else cur) == (b.index if b.index is not None else cur)
