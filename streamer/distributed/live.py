"""The live service's stage worker on a Dask cluster (``rllsm serve --scheduler ADDRESS``).

:class:`DaskStageWorker` has the interface of :class:`streamer.pipeline.StageWorker` (``submit / poll / drain /
in_flight``), so the :class:`~streamer.processor.StackProcessor` drives it unchanged: each assembled stack is sent
to the cluster as one task, at most ``max_in_flight`` at a time, and results come back **in submission order**
(timepoint order for a microscope), through the processor's usual outputs, done.log and exactly-once bookkeeping.

Backpressure: when ``max_in_flight`` stacks are out, ``submit`` waits for the oldest. It runs on the processor thread,
which reads the recording; the ingest thread keeps recording (spilling past the in-memory cache), so a slow cluster
delays processing, never the microscope.

A stack whose task fails (after the bounded retries, or because it took down too many workers) is handed back as
the exception; the processor counts it as a stage error and skips that stack, as for an in-process failure.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from streamer.distributed.recipe import Recipe
from streamer.distributed.tasks import compute_array, describe_chain
from streamer.pipeline import PipelineError

log = logging.getLogger(__name__)


class _Placements:
    """The chain's ``fitter`` as the processor reads it: one placement per delivered volume, in order."""

    def __init__(self) -> None:
        self.placements: deque[Any] = deque(maxlen=4096)

    def pop(self) -> Any:
        return self.placements.popleft() if self.placements else None


class RemoteChain(list):
    """Stands for the chain running on the workers: what it declares (grid, provenance) and its placements."""

    def __init__(self, grid: Any, provenance: dict[str, Any]) -> None:
        super().__init__()
        self.grid, self.provenance, self.fitter = grid, provenance, _Placements()


class DaskStageWorker:
    """Send stacks to a Dask cluster; hand back ``(token, volume or exception)`` pairs in submission order.

    Parameters
    ----------
    client
        A connected ``distributed.Client``.
    recipe
        What each worker builds once and applies to every stack (see :func:`streamer.distributed.recipe.service_stages`).
    max_in_flight
        Stacks sent and not yet returned, at most; beyond it ``submit`` waits for the oldest.
    retries
        Re-runs of a task that raised (a task lost with its worker is rerun by the scheduler anyway).
    observe
        ``observe(name, seconds)``: each stage's time on the worker, and ``cluster_round_trip`` (send → result).
    timeout_s
        A stack without a result this long after it was sent (no workers left, a hung task) is handed back as failed.
    """

    def __init__(self, client: Any, recipe: Recipe, *, max_in_flight: int = 4, retries: int = 2,
                 observe: Callable[[str, float], None] | None = None, timeout_s: float = 600.0) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        self.client = client
        self.recipe = recipe
        self.max_in_flight = int(max_in_flight)
        self.retries = int(retries)
        self.observe = observe or (lambda name, s: None)
        self.timeout_s = float(timeout_s)
        self._pending: deque[tuple[Any, Any, float]] = deque()  # (token, future, submitted at)
        self.per_worker: dict[str, int] = {}
        # what the chain declares (grid, provenance), asked of a worker once: it builds and caches the chain anyway
        try:
            grid, provenance = client.submit(describe_chain, recipe, pure=False).result(timeout=self.timeout_s)
        except TimeoutError:
            raise PipelineError(f"no Dask worker built the reconstruction within {self.timeout_s:g} s (are any "
                                "workers connected to the scheduler?)") from None
        self.chain = RemoteChain(grid, provenance)

    def submit(self, array: np.ndarray, token: Any) -> list[tuple[Any, Any]]:
        """Send one stack; returns the results that are ready (in order), after waiting while too many are out."""
        done = []
        while len(self._pending) >= self.max_in_flight:
            done.extend(self._collect(block=True))
        # scattered on its own, so that a retry elsewhere fetches it from the cluster rather than from us again
        data = self.client.scatter(np.ascontiguousarray(array), direct=False, hash=False)
        fut = self.client.submit(compute_array, self.recipe, data, retries=self.retries, pure=False)
        self._pending.append((token, fut, time.perf_counter()))
        return done + self._collect(block=False)

    def _collect(self, block: bool) -> list[tuple[Any, Any]]:
        out = []
        while self._pending:
            token, fut, t0 = self._pending[0]
            if not fut.done() and not block:
                break
            try:
                vol, worker, _seconds, stages, placement = fut.result(timeout=max(0.0, t0 + self.timeout_s
                                                                                 - time.perf_counter()))
            except Exception as err:  # noqa: BLE001 — handed to the processor, which counts and skips the stack
                if isinstance(err, TimeoutError):
                    fut.cancel()
                    err = TimeoutError(f"no result within {self.timeout_s:g} s")
                result: Any = PipelineError(f"cluster task failed on {token}: {type(err).__name__}: {err}")
                self.chain.fitter.placements.append(None)
            else:
                result = vol
                self.chain.fitter.placements.append(placement)
                self.per_worker[worker] = self.per_worker.get(worker, 0) + 1
                for name, s in stages.items():  # the same stage names as in-process, timed on the worker
                    self.observe(name, s)
                self.observe("cluster_round_trip", time.perf_counter() - t0)
            fut.release()
            self._pending.popleft()
            out.append((token, result))
            block = False  # waited for the oldest; the rest only if already there
        return out

    def poll(self) -> list[tuple[Any, Any]]:
        """Results ready now, in order, without waiting."""
        return self._collect(block=False)

    def drain(self) -> list[tuple[Any, Any]]:
        """Wait for every stack in flight."""
        out = []
        while self._pending:
            out.extend(self._collect(block=True))
        return out

    @property
    def in_flight(self) -> int:
        return len(self._pending)


def live_worker_factory(client: Any, *, mode: str, device: str | None, weights: str | None, backend: Any,
                        max_in_flight: int, observe: Callable[[str, float], None] | None = None,
                        sources: Any = None, fused_depth: int | None = None) -> Callable[[Any], DaskStageWorker]:
    """``AcquisitionStart → DaskStageWorker`` with the service's stage chain for that acquisition's optics."""
    import torch

    from streamer.distributed.recipe import source_paths

    def make(start: Any) -> DaskStageWorker:
        recipe = Recipe.make("streamer.distributed.recipe:service_stages",
                             {"mode": str(mode), "optics": start.optics, "device": device, "weights": weights,
                              "backend": backend, "sources": sources, "fused_depth": fused_depth},
                             [weights, *source_paths(sources)], torch_threads=torch.get_num_threads())
        return DaskStageWorker(client, recipe, max_in_flight=max_in_flight, observe=observe)

    return make


def connect_live(cfg: Any, metrics: Any, on_error: Callable[[], None]) -> tuple[Any, Callable[[Any], DaskStageWorker]]:
    """For :class:`streamer.service.Service`: a client on ``cfg.scheduler`` and the worker factory using it.

    Raises :class:`streamer.service.ServiceError` (after ``on_error()`` released what the start took) when the
    scheduler cannot be reached.
    """
    from streamer.distributed.errors import DistributedError
    from streamer.service import ServiceError

    try:
        from distributed import Client
    except ImportError:
        on_error()
        raise ServiceError("--scheduler needs Dask: pip install 'rllsm-vsim[cluster]'") from None
    try:
        client = Client(cfg.scheduler, timeout="30s")
    except (OSError, TimeoutError, ValueError, DistributedError) as err:
        on_error()
        raise ServiceError(f"cannot reach the Dask scheduler at {cfg.scheduler}: {err}") from None
    log.info("reconstructing on the Dask cluster at %s (dashboard %s), at most %d stacks in flight",
             cfg.scheduler, client.dashboard_link, cfg.max_in_flight)
    weights = str(cfg.weights) if cfg.weights is not None else None
    factory = live_worker_factory(client, mode=str(cfg.mode), device=cfg.device, weights=weights,
                                  backend=cfg.backend, max_in_flight=cfg.max_in_flight, observe=metrics.observe,
                                  sources=cfg.sources, fused_depth=cfg.fused_depth)
    return client, factory
