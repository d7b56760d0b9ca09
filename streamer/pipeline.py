"""The pipeline runner: named stages (array in → array out) run by a worker that overlaps copies and compute.

A stage is a plain callable with a name. ``kind="numpy"`` stages take and return numpy arrays (the engines' public
functions); ``kind="torch"`` stages take and return tensors on the worker's device, which lets the worker keep a
stack on the GPU between stages and overlap, across consecutive stacks, the host→device copy of stack *n+1*, the
compute of stack *n* and the device→host copy of stack *n−1* on three CUDA streams. Without a GPU the same code runs
each step in turn on the CPU, so the numbers are the same.

:func:`build_stages` is the one place where the reconstruction steps are wired in (preprocess → lateral-sr →
split-views → fuse, or the classical joint-RL fusion); :class:`StackProcessor` is the consumer shared by the live
service and offline replay, so both produce bit-identical outputs from the same messages.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

import numpy as np

from engines.errors import RllsmRuntimeError

log = logging.getLogger(__name__)


class PipelineError(RllsmRuntimeError):
    """A stage failed or the stage chain cannot be built; the text names the stage and the stack."""


class StagesUnavailable(PipelineError):
    """The requested reconstruction mode needs engine pieces (or weights) that are not installed here."""


class PipelineMode(StrEnum):
    """Which stage chain the service runs."""

    full = "full"  # preprocess → lateral-sr → split-views → fuse (RL-DFN)
    sr_rl = "sr-rl"  # preprocess → lateral-sr → split-views → classical joint-RL fusion (VSI-SR weights only)
    classical = "classical"  # preprocess → split-views → classical joint-RL fusion (no network weights needed)
    deskew = "deskew"  # deskew only: what exists before the reconstruction is wired in
    none = "none"  # record and assemble only


@dataclass(frozen=True)
class Stage:
    """One named step. ``fn(array) -> array``; ``kind`` says whether it takes numpy arrays or device tensors."""

    name: str
    fn: Callable[[Any], Any]
    kind: Literal["numpy", "torch"] = "numpy"


def build_stages(
    mode: PipelineMode | str, optics: Any, *, device: str | None = None, weights: str | None = None,
    backend: Any = None, sources: Any = None, fused_depth: int | None = None, memory_budget_mib: float | None = None,
) -> list[Stage]:
    """Wire the reconstruction steps for ``mode``; the single function to complete when engines land.

    ``engines.reconstruct.stage_chain(mode, optics, device=..., weights=...)`` (a list of ``(name, callable)``
    or :class:`Stage`) is used when it exists; otherwise only the ``deskew`` and ``none`` modes are available.
    ``backend`` (:class:`engines.backends.BackendConfig`) says what runs the networks in ``full`` mode; ``sources``
    (:class:`engines.sources.ReconSources`) names the model files as for ``rllsm reconstruct``. The returned list
    keeps what the chain declares about its output (``grid``, ``fitter``, ``provenance``) when it has them.
    ``memory_budget_mib`` (MiB, :data:`engines.support.MemoryBudgetMiB`) bounds RL-DFN's tiles; ``None``: from the
    device's free memory (:func:`memory_budget_mib`).

    Raises
    ------
    StagesUnavailable
        ``full``/``classical`` requested while ``engines.reconstruct`` is not installed.
    """
    mode = PipelineMode(mode)
    if mode is PipelineMode.none:
        return []
    if mode is PipelineMode.deskew:
        from engines.deskew import deskew_tensor
        from engines.device import pick_device, to_device

        dev = pick_device(device)

        def _deskew(stack: Any) -> Any:
            # a device tensor from the worker; a host array (a direct call) is moved there first
            return deskew_tensor(to_device(stack, dev), optics.pixel_size_um, optics.stage_step_um, optics.skew_angle_deg,
                                 skew_axis=str(getattr(optics.skew_axis, "value", optics.skew_axis)), interp="linear")

        return [Stage("deskew", _deskew, kind="torch")]
    try:
        from engines import reconstruct
    except ImportError as err:
        raise StagesUnavailable(
            f"reconstruction mode '{mode}' needs engines.reconstruct, which is not available here ({err}); "
            "use --mode deskew or --mode none"
        ) from None
    if backend is not None:
        install_exporter()
    chain = reconstruct.stage_chain(str(mode), optics, device=device, weights=weights,
                                    memory_budget_mib=memory_budget_mib or default_budget_mib(device), backend=backend, sources=sources,
                                    fused_depth=fused_depth)
    # in place: keeps the chain's grid. engines.reconstruct's stages unpack as (name, fn) and say by .kind that they
    # take device tensors
    chain[:] = [s if isinstance(s, Stage) else Stage(s[0], s[1], getattr(s, "kind", s[2] if len(s) > 2 else "numpy"))
                for s in chain]
    return chain


def install_exporter() -> None:
    """Wire the offline exporter into the runtime: ``--backend onnxruntime`` with a torch checkpoint exports it once.

    The engines never import ``export``; the service and the command line, which use both, connect them here.
    Without the ``export`` package (a runtime-only install) exported models still run, checkpoints are refused
    with the command that exports them.
    """
    try:
        from export.cache import install
    except ImportError:  # pragma: no cover - runtime-only installs
        return
    install()


def default_budget_mib(device: str | None) -> float:
    """Memory one reconstruction may use, in MiB (see :func:`engines.device.default_memory_budget_mib`)."""
    from engines.device import default_memory_budget_mib, pick_device

    return default_memory_budget_mib(pick_device(device))


# --- the worker ---------------------------------------------------------------------------------------------------


@dataclass
class _InFlight:
    token: Any
    out: Any
    events: list[tuple[str, Any, Any]] = field(default_factory=list)  # (stage, start event, end event) on CUDA
    host_times: dict[str, float] = field(default_factory=dict)
    done_event: Any = None
    buffers: list[Any] = field(default_factory=list)  # pinned buffers lent to this stack, returned when collected


class _PinnedPool:
    """Page-locked host buffers by (shape, dtype), lent per stack and given back: pinning is slow, reuse is free."""

    def __init__(self, torch: Any) -> None:
        self._torch = torch
        self._free: dict[tuple[Any, ...], list[Any]] = {}

    def take(self, shape: tuple[int, ...], dtype: Any) -> Any:
        free = self._free.get((tuple(shape), dtype))
        if free:
            return free.pop()
        return self._torch.empty(tuple(shape), dtype=dtype, pin_memory=True)

    def give(self, buf: Any) -> None:
        self._free.setdefault((tuple(buf.shape), buf.dtype), []).append(buf)


class StageWorker:
    """Runs a stage chain on one stack at a time, overlapping transfers and compute on CUDA.

    With ``kind="torch"`` stages a stack is copied to the device once, stays there through every stage, and the
    result is copied back once (counted in :data:`engines.device.transfers`). On CUDA the copy in of stack *n+1*,
    the compute of stack *n* and the copy out of stack *n−1* run on three streams, through pinned host buffers
    that are reused from stack to stack. On the CPU the same calls run one after the other.

    Parameters
    ----------
    stages
        The chain; an empty chain passes stacks through unchanged.
    device
        ``"cpu"``, ``"cuda"`` or None (:func:`engines.device.pick_device`).
    depth
        Stacks in flight on the GPU (2 overlaps one stack's copies with the next one's compute).
    observe
        ``observe(stage_name, seconds)``: where per-stage timings go (e.g. ``Metrics.observe``).
    """

    def __init__(
        self, stages: Sequence[Stage], *, device: str | None = None, depth: int = 2,
        observe: Callable[[str, float], None] | None = None,
    ) -> None:
        self.stages = list(stages)
        self.observe = observe or (lambda name, s: None)
        self._torch: Any = None
        self.cuda = False
        if any(s.kind == "torch" for s in self.stages) or device not in (None, "cpu"):
            import torch

            from engines.device import pick_device

            self._torch = torch
            self.device = pick_device(device)
            self.cuda = self.device.type == "cuda"
        else:
            self.device = None
        self.depth = max(1, int(depth)) if self.cuda else 1
        self._pending: deque[_InFlight] = deque()
        if self.cuda:
            t = self._torch
            self._s_in, self._s_comp, self._s_out = t.cuda.Stream(), t.cuda.Stream(), t.cuda.Stream()
            self._pool = _PinnedPool(t)

    # Conversions between the stage kinds at stage boundaries (a value may be a tuple, e.g. split-views' views).
    def _to_torch(self, x: Any) -> Any:
        from engines.device import to_device

        if isinstance(x, (tuple, list)):
            return type(x)(self._to_torch(v) for v in x)
        return to_device(x, self.device)

    def _to_numpy(self, x: Any) -> Any:
        if self._torch is not None and isinstance(x, self._torch.Tensor):
            from engines.device import to_host

            return to_host(x)
        if isinstance(x, (tuple, list)):
            return type(x)(self._to_numpy(v) for v in x)
        return x

    def _run_chain(self, x: Any, item: _InFlight, token: Any) -> Any:
        for st in self.stages:
            t0 = time.perf_counter()
            ev0 = ev1 = None
            if self.cuda:
                ev0 = self._torch.cuda.Event(enable_timing=True)
                ev0.record()
            try:
                x = st.fn(self._to_torch(x) if st.kind == "torch" else self._to_numpy(x))
            except Exception as err:
                raise PipelineError(f"stage '{st.name}' failed on {token}: {type(err).__name__}: {err}") from err
            if self.cuda:
                ev1 = self._torch.cuda.Event(enable_timing=True)
                ev1.record()
                item.events.append((st.name, ev0, ev1))
            else:
                item.host_times[st.name] = time.perf_counter() - t0
        return x

    def _upload(self, array: np.ndarray, item: _InFlight) -> Any:
        """Copy a stack into a reused pinned buffer and on to the device, on the copy-in stream."""
        from engines.device import transfers

        t = self._torch
        arr = np.ascontiguousarray(array)
        widen = arr.dtype == np.uint16  # few uint16 kernels on CUDA: move 2 bytes as int16, widen on the device
        src = t.from_numpy(arr.view(np.int16) if widen else arr)
        host = self._pool.take(src.shape, src.dtype)
        item.buffers.append(host)
        host.copy_(src)
        transfers.add("h2d", host.element_size() * host.numel())
        dev = host.to(self.device, non_blocking=True)
        return dev.to(t.int32).bitwise_and_(0xFFFF) if widen else dev

    def submit(self, array: np.ndarray, token: Any) -> list[tuple[Any, np.ndarray]]:
        """Start processing ``array``; returns the ``(token, result)`` pairs that finished meanwhile, in order."""
        item = _InFlight(token, None)
        if not self.cuda:
            item.out = np.asarray(self._to_numpy(self._run_chain(array, item, token)))
            self._pending.append(item)
            return self._collect(block=True)
        t = self._torch
        first_torch = bool(self.stages) and self.stages[0].kind == "torch"
        with t.cuda.stream(self._s_in):
            dev = self._upload(array, item) if first_torch else array
            ready = t.cuda.Event()
            ready.record()
        with t.cuda.stream(self._s_comp):
            self._s_comp.wait_event(ready)
            if isinstance(dev, t.Tensor):
                dev.record_stream(self._s_comp)
            out = self._run_chain(dev, item, token)
            computed = t.cuda.Event()
            computed.record()
        with t.cuda.stream(self._s_out):
            self._s_out.wait_event(computed)
            if isinstance(out, t.Tensor):
                from engines.device import transfers

                out.record_stream(self._s_out)
                pinned = self._pool.take(out.shape, out.dtype)
                item.buffers.append(pinned)
                pinned.copy_(out, non_blocking=True)
                transfers.add("d2h", pinned.element_size() * pinned.numel())
                item.out = pinned
            else:
                item.out = out
            item.done_event = t.cuda.Event()
            item.done_event.record()
        self._pending.append(item)
        return self._collect(block=len(self._pending) >= self.depth)

    def _collect(self, block: bool) -> list[tuple[Any, np.ndarray]]:
        done = []
        while self._pending:
            item = self._pending[0]
            if self.cuda and item.done_event is not None:
                if not block and not item.done_event.query():
                    break
                item.done_event.synchronize()
                for name, e0, e1 in item.events:
                    self.observe(name, e0.elapsed_time(e1) / 1e3)
                out = item.out
                if isinstance(out, self._torch.Tensor) and out.is_pinned():
                    result = out.numpy().copy()  # the pinned buffer goes back to the pool for the next stack
                else:
                    result = np.asarray(self._to_numpy(out))
                for buf in item.buffers:
                    self._pool.give(buf)
                item.buffers.clear()
            else:
                for name, s in item.host_times.items():
                    self.observe(name, s)
                result = item.out
            self._pending.popleft()
            done.append((item.token, result))
            block = False  # only wait for the oldest one
        return done

    def poll(self) -> list[tuple[Any, np.ndarray]]:
        """Results that are ready now, without waiting (called when no new stack comes, so none waits long)."""
        return self._collect(block=False) if self.cuda else []

    def drain(self) -> list[tuple[Any, np.ndarray]]:
        """Wait for every stack in flight."""
        out = []
        while self._pending:
            out.extend(self._collect(block=True))
        return out

    @property
    def in_flight(self) -> int:
        return len(self._pending)
