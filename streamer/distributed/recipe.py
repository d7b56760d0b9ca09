"""What a worker builds once and reuses: a :class:`Recipe` names a builder and its arguments, never the models.

A task ships the recipe (a few hundred bytes); the worker builds the volume function from it on first use and keeps
it in a process-local cache keyed by the recipe's fingerprint, which hashes the builder, its arguments and the
*contents* of every model file it reads (checkpoints, OTFs, PSFs). So models and PSF/OTF tensors are loaded once per
worker, and a long-lived cluster never reuses a model whose file changed between two runs.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from streamer.distributed.errors import DistributedError

VolumeFn = Callable[[np.ndarray], np.ndarray]
_CACHE_MAX = 2  # recipes kept per worker: a model swap mid-run must not hold two sets of weights for ever


def _jsonable(v: Any) -> Any:
    if isinstance(v, BaseModel):
        return v.model_dump(mode="json")
    if isinstance(v, (Path, os.PathLike)):
        return os.fspath(v)
    if isinstance(v, (set, frozenset)):
        return sorted(v)
    return repr(v)


def hash_sources(paths: Iterable[str | os.PathLike[str]]) -> str:
    """sha256 over the names and bytes of every file under ``paths`` (files or folders), in a stable order."""
    h = hashlib.sha256()
    for src in sorted({os.fspath(p) for p in paths}):
        p = Path(src)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            if not f.exists():
                raise DistributedError(f"model file not found: {f}")
            h.update(f.relative_to(p).as_posix().encode() if p.is_dir() else f.name.encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


class Recipe(BaseModel):
    """How a worker builds the function ``raw stack → volume``; identical recipes share one cached build.

    ``builder`` is ``"module:function"``; it is called with ``kwargs`` and returns the volume function.
    ``torch_threads`` is the driver's intra-op thread count: torch's CPU reductions (FFTs, sums) depend on it, so
    workers use the same count to produce byte-identical volumes.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    version: Literal[1] = 1
    builder: str = Field(pattern=r"^[\w.]+:\w+$")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    sources: tuple[str, ...] = Field((), description="Model files/folders whose contents identify the models.")
    sources_sha256: str = ""
    torch_threads: int | None = Field(None, ge=1, le=1024)

    @classmethod
    def make(cls, builder: str, kwargs: dict[str, Any], sources: Iterable[str | os.PathLike[str] | None] = (),
             torch_threads: int | None = None) -> Recipe:
        """A recipe with its model sources hashed now (on the driver, once)."""
        srcs = tuple(sorted({os.fspath(s) for s in sources if s is not None}))
        return cls(builder=builder, kwargs=kwargs, sources=srcs, sources_sha256=hash_sources(srcs),
                   torch_threads=torch_threads)

    @property
    def fingerprint(self) -> str:
        """Identity of what this recipe computes: builder, arguments and model contents (not threads or device)."""
        doc = json.dumps([self.builder, self.kwargs, self.sources_sha256], default=_jsonable, sort_keys=True)
        return hashlib.sha256(doc.encode()).hexdigest()[:16]

    def build(self) -> VolumeFn:
        mod, _, name = self.builder.partition(":")
        try:
            fn = getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError) as err:
            raise DistributedError(f"builder {self.builder} is not importable on this worker: {err}") from None
        return fn(**self.kwargs)


# --- the worker-local cache -------------------------------------------------------------------------------------

_lock = threading.Lock()
_cache: OrderedDict[str, VolumeFn] = OrderedDict()
_loads: Counter[str] = Counter()


def cached_volume_fn(recipe: Recipe) -> VolumeFn:
    """The recipe's volume function, built on this process's first use of the recipe and kept (LRU of 2)."""
    key = recipe.fingerprint
    with _lock:  # a worker with several threads builds once, not once per thread
        fn = _cache.get(key)
        if fn is None:
            fn = recipe.build()
            _loads[key] += 1
            _cache[key] = fn
            while len(_cache) > _CACHE_MAX:
                _cache.popitem(last=False)
        else:
            _cache.move_to_end(key)
    return fn


def cache_info() -> dict[str, Any]:
    """Recipes built by this process and how often (run on every worker with ``client.run(cache_info)``)."""
    with _lock:
        return {"pid": os.getpid(), "loads": dict(_loads), "cached": list(_cache)}


# --- builders -----------------------------------------------------------------------------------------------------


def reconstruct_cli(args: dict[str, Any], optics: Any) -> VolumeFn:
    """The ``rllsm reconstruct`` chain, built from the command's own options and resolved optics as it builds it.

    Returns the fused volume in the fusion's own units; the run's one uint16 gain is applied by the task
    (:func:`streamer.distributed.tasks.compute_volume`). ``last_voxel_zyx_um`` is the fused voxel of the last call.
    """
    from engines.errors import RllsmError
    from streamer.cli.reconstruct_cmd import build_reconstructor

    ns = argparse.Namespace(**args)
    rec = build_reconstructor(ns, optics)

    def run(raw: np.ndarray) -> np.ndarray:
        try:
            res = rec(raw)
            v = float(res.voxel_um)
            run.last_voxel_zyx_um = tuple(getattr(res, "voxel_zyx_um", None) or (v, v, v))  # type: ignore[attr-defined]
            return res.fused
        except RllsmError as err:  # the command's typed errors are about the data: the volume is rejected
            if isinstance(err, ValueError):
                raise
            from streamer.distributed.errors import VolumeRejected

            raise VolumeRejected(str(err)) from err

    run.last_voxel_zyx_um = None  # type: ignore[attr-defined]
    return run


def service_stages(mode: str, optics: Any, device: str | None = None, weights: str | None = None,
                   backend: Any = None, sources: Any = None, fused_depth: int | None = None,
                   memory_budget_mib: float | None = None) -> VolumeFn:
    """The service's stage chain for ``mode`` (what ``rllsm serve`` and ``rllsm replay --offline`` run).

    The function keeps what the chain declares (``chain``: grid, provenance), the per-stage seconds of the last
    stack (``timings_s``) and how its volume was placed into the acquisition's grid (``last_placement``).
    """
    from streamer.pipeline import StageWorker, build_stages

    timings: dict[str, float] = {}
    chain = build_stages(mode, optics, device=device, weights=weights, backend=backend, sources=sources,
                         fused_depth=fused_depth, memory_budget_mib=memory_budget_mib)
    worker = StageWorker(chain, device=device, observe=timings.__setitem__)
    fitter = getattr(chain, "fitter", None)

    def run(raw: np.ndarray) -> np.ndarray:
        timings.clear()
        done = worker.submit(raw, None) + worker.drain()
        run.last_placement = fitter.pop() if fitter is not None else None  # type: ignore[attr-defined]
        return np.asarray(done[-1][1])

    run.timings_s = timings  # type: ignore[attr-defined]
    run.chain = chain  # type: ignore[attr-defined]
    run.last_placement = None  # type: ignore[attr-defined]
    return run


def source_paths(sources: Any) -> list[Any]:
    """The model files named by an :class:`engines.sources.ReconSources` (hashed into the recipe's fingerprint)."""
    if sources is None:
        return []
    return [getattr(sources, k, None) for k in ("checkpoint", "otf_dir", "model", "psf", "psf_a", "psf_b", "weights")]
