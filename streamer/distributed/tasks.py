"""What runs on a worker: read one volume's input, run the cached chain, write its own region, say what happened.

Inputs are described, not shipped: a TIFF path, or the record numbers of a recording (the workers read the shared
filesystem). Errors that come from the data (:class:`VolumeRejected`, an engine's ``ValueError``) are returned as a
failure and not retried: they would fail the same way elsewhere. Anything else (out of memory, a lost disk, a CUDA
error) propagates, and Dask retries the task up to the run's bound.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streamer.distributed.errors import VolumeRejected
from streamer.distributed.recipe import Recipe, cached_volume_fn
from streamer.distributed.store import DoesNotFit, verify_volume, write_volume


@dataclass(frozen=True)
class TiffInput:
    """One raw (z, y, x) TIFF stack."""

    path: str
    min_planes: int = 1  # the checks `rllsm reconstruct` makes before it reconstructs
    needed_by: str = "this step"

    def load(self) -> np.ndarray:
        from pathlib import Path

        from streamer.cli import CLIError
        from streamer.cli.geometry_io import read_stack

        try:
            return read_stack(Path(self.path), "raw stack", min_planes=self.min_planes, needed_by=self.needed_by)
        except CLIError as err:
            raise VolumeRejected(str(err)) from None


@dataclass(frozen=True)
class RecordedInput:
    """One stack of a recording: its records (one ``stack`` message, or ``frame`` messages by plane)."""

    recording: str
    records: tuple[int, ...]
    z_count: int = 0  # frames: planes of the stack; 0 for a stack message
    missing: tuple[int, ...] = ()  # frames never received (zero-filled, as the assembler does)

    def load(self) -> np.ndarray:
        from streamer.wire import Stack, WireError, decode

        reader = _reader(self.recording)
        try:
            if self.z_count == 0:
                header, arr = decode(reader.read(self.records[0]), strict=True)
                assert isinstance(header, Stack) and arr is not None
                return np.array(arr)  # own memory; same dtype (and byte order) as the processor hands on
            out: np.ndarray | None = None
            for i in self.records:
                header, plane = decode(reader.read(i), strict=True)
                assert plane is not None
                if out is None:
                    out = np.zeros((self.z_count, *plane.shape), plane.dtype.newbyteorder("="))
                out[header.z_index] = plane  # type: ignore[union-attr]
            assert out is not None
            return out
        except WireError as err:
            raise VolumeRejected(f"record unreadable: {err}") from None


_readers: dict[str, Any] = {}
_readers_lock = threading.Lock()


def _reader(path: str) -> Any:
    from streamer.recording import RecordingReader

    with _readers_lock:  # one open reader per recording per worker process
        r = _readers.get(path)
        if r is None:
            r = _readers[path] = RecordingReader(path)
        return r


@dataclass
class VolumeResult:
    """A task's answer: where it ran, how long it took, and the CRC-32 written — or why it failed, or the volume."""

    t: int
    c: int
    worker: str
    seconds: float
    crc32: str = ""
    shape: tuple[int, ...] = ()
    error: str = ""
    does_not_fit: bool = False  # larger than the canvas: the driver grows it and sends the task again
    volume: np.ndarray | None = field(default=None, repr=False)
    voxel_zyx_um: tuple[float, ...] | None = None  # the probe's: the store's physical voxel size
    timings_s: dict[str, float] = field(default_factory=dict)


def worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return f"{socket.gethostname()}:{os.getpid()}"


def _set_threads(recipe: Recipe) -> None:
    if recipe.torch_threads is not None:
        import torch

        if torch.get_num_threads() != recipe.torch_threads:
            torch.set_num_threads(recipe.torch_threads)


def compute_volume(recipe: Recipe, source: Any, t: int, c: int, store: str | None,
                   scaling: Any = None) -> VolumeResult:
    """Make volume ``(t, c)`` and write it to ``store``; with ``store=None`` return it instead (the probe).

    ``scaling`` (:class:`engines.scaling.OutputScaling` with the run's gain fixed, or ``float32``) turns the chain's
    output into what is stored; the probe returns the chain's output unscaled (its gain is set from it).
    """
    t0 = time.perf_counter()
    name = worker_name()
    try:
        _set_threads(recipe)
        fn = cached_volume_fn(recipe)
        raw = source.load()
        vol = fn(raw)
        if vol.ndim != 3:
            raise VolumeRejected(f"t={t} c={c}: the chain returned a {vol.ndim}D array, not a (z, y, x) volume")
        if store is None:
            return VolumeResult(t, c, name, time.perf_counter() - t0, volume=vol,
                                voxel_zyx_um=getattr(fn, "last_voxel_zyx_um", None))
        if scaling is not None:
            from engines.scaling import VolumeScaler

            vol = VolumeScaler(scaling)(vol)
        crc = write_volume(store, t, c, vol)
    except DoesNotFit as err:
        return VolumeResult(t, c, name, time.perf_counter() - t0, shape=err.shape, does_not_fit=True)
    except (VolumeRejected, ValueError) as err:  # from the data: failing elsewhere too, so not retried
        return VolumeResult(t, c, name, time.perf_counter() - t0, error=f"{type(err).__name__}: {err}")
    return VolumeResult(t, c, name, time.perf_counter() - t0, crc32=crc, shape=tuple(vol.shape))


def check_volume(store: str, t: int, c: int, crc: str, shape: tuple[int, ...]) -> bool:
    """Resume: does the recorded volume read back whole with its CRC-32? (Runs on a worker, near the data.)"""
    return verify_volume(store, t, c, crc, shape)


def compute_array(recipe: Recipe, array: np.ndarray) -> tuple[np.ndarray, str, float, dict[str, float], Any]:
    """Live path: the chain on a stack shipped from the service.

    Returns ``(volume, worker, seconds, stage times, placement)``. Workers run one task at a time
    (``threads_per_worker=1``), so the stage times and placement read after the call are this stack's.
    """
    t0 = time.perf_counter()
    _set_threads(recipe)
    fn = cached_volume_fn(recipe)
    vol = fn(array)
    return (vol, worker_name(), time.perf_counter() - t0, dict(getattr(fn, "timings_s", {})),
            getattr(fn, "last_placement", None))


def describe_chain(recipe: Recipe) -> tuple[Any, dict[str, Any]]:
    """What the recipe's chain declares about its output: ``(grid, provenance)`` (built and cached on the worker)."""
    _set_threads(recipe)
    chain = getattr(cached_volume_fn(recipe), "chain", None)
    return getattr(chain, "grid", None), dict(getattr(chain, "provenance", None) or {})
