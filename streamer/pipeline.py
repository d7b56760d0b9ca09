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
    backend: Any = None, sources: Any = None, fused_depth: int | None = None,
) -> list[Stage]:
    """Wire the reconstruction steps for ``mode``; the single function to complete when engines land.

    ``engines.reconstruct.stage_chain(mode, optics, device=..., weights=...)`` (a list of ``(name, callable)``
    or :class:`Stage`) is used when it exists; otherwise only the ``deskew`` and ``none`` modes are available.
    ``backend`` (:class:`engines.backends.BackendConfig`) says what runs the networks in ``full`` mode; ``sources``
    (:class:`engines.sources.ReconSources`) names the model files as for ``rllsm reconstruct``. The returned list
    keeps what the chain declares about its output (``grid``, ``fitter``, ``provenance``) when it has them.

    Raises
    ------
    StagesUnavailable
        ``full``/``classical`` requested while ``engines.reconstruct`` is not installed.
    """
    mode = PipelineMode(mode)
    if mode is PipelineMode.none:
        return []
    if mode is PipelineMode.deskew:
        from engines.deskew import deskew

        def _deskew(stack: np.ndarray) -> np.ndarray:
            return deskew(stack, optics.pixel_size_um, optics.stage_step_um, optics.skew_angle_deg,
                          skew_axis=str(getattr(optics.skew_axis, "value", optics.skew_axis)), interp="linear",
                          device=device)

        return [Stage("deskew", _deskew)]
    try:
        from engines import reconstruct
    except ImportError as err:
        raise StagesUnavailable(
            f"reconstruction mode '{mode}' needs engines.reconstruct, which is not available here ({err}); "
            "use --mode deskew or --mode none"
        ) from None
    chain = reconstruct.stage_chain(str(mode), optics, device=device, weights=weights,
                                    memory_budget_gb=memory_budget_gb(device), backend=backend, sources=sources,
                                    fused_depth=fused_depth)
    chain[:] = [s if isinstance(s, Stage) else Stage(*s) for s in chain]  # in place: keeps the chain's grid
    return chain


def memory_budget_gb(device: str | None) -> float:
    """Memory one reconstruction may use (see :func:`engines.device.default_memory_budget_gb`)."""
    from engines.device import default_memory_budget_gb, pick_device

    return default_memory_budget_gb(pick_device(device))


# --- the worker ---------------------------------------------------------------------------------------------------


@dataclass
class _InFlight:
    token: Any
    out: Any
    events: list[tuple[str, Any, Any]] = field(default_factory=list)  # (stage, start event, end event) on CUDA
    host_times: dict[str, float] = field(default_factory=dict)
    done_event: Any = None
    keep: Any = None  # the pinned input, alive until its copy to the device has surely finished


class StageWorker:
    """Runs a stage chain on one stack at a time, overlapping transfers and compute on CUDA.

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

    # Host-side conversions between the stage kinds; on CUDA they are enqueued on the compute stream.
    def _to_torch(self, x: Any) -> Any:
        t = self._torch
        if isinstance(x, t.Tensor):
            return x
        x = t.from_numpy(np.ascontiguousarray(x))
        if self.cuda:
            x = x.pin_memory().to(self.device, non_blocking=True)
        return x

    def _to_numpy(self, x: Any) -> Any:
        # Between stages a value may be a tuple (e.g. the two views of split-views); only tensors are converted.
        if self._torch is not None and isinstance(x, self._torch.Tensor):
            return x.detach().cpu().numpy()
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

    def submit(self, array: np.ndarray, token: Any) -> list[tuple[Any, np.ndarray]]:
        """Start processing ``array``; returns the ``(token, result)`` pairs that finished meanwhile, in order."""
        item = _InFlight(token, None)
        if not self.cuda:
            item.out = np.asarray(self._to_numpy(self._run_chain(array, item, token)))
            self._pending.append(item)
            return self._collect(block=True)
        t = self._torch
        with t.cuda.stream(self._s_in):
            host = t.from_numpy(np.ascontiguousarray(array)).pin_memory()
            dev = host.to(self.device, non_blocking=True)
            ready = t.cuda.Event()
            ready.record()
        item.keep = host
        with t.cuda.stream(self._s_comp):
            self._s_comp.wait_event(ready)
            dev.record_stream(self._s_comp)
            out = self._run_chain(dev, item, token)
            computed = t.cuda.Event()
            computed.record()
        with t.cuda.stream(self._s_out):
            self._s_out.wait_event(computed)
            if isinstance(out, t.Tensor):
                out.record_stream(self._s_out)
                pinned = t.empty(out.shape, dtype=out.dtype, pin_memory=True)
                pinned.copy_(out, non_blocking=True)
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
                result = np.asarray(self._to_numpy(item.out))
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
