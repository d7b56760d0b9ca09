"""Plans for the two batch commands: ``rllsm reconstruct`` over TIFF stacks and ``rllsm replay --offline``.

A plan maps each input to its ``(timepoint, channel)`` volume; :func:`~streamer.distributed.runner.run_volumes` runs it.
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from streamer.distributed.cluster import open_client
from streamer.distributed.errors import DistributedError
from streamer.distributed.recipe import Recipe, source_paths
from streamer.distributed.runner import RunSummary, VolumeJob, run_volumes
from streamer.distributed.store import LEDGER
from streamer.distributed.tasks import RecordedInput, TiffInput
from streamer.sinks.base import VolumeMeta

log = logging.getLogger(__name__)
# a token between separators (or the ends): t12, c1, ch1 (lookarounds, so that neighbouring tokens share a separator)
_TC = re.compile(r"(?<![^_\-. ])(?:t(\d+)|ch?(\d+))(?![^_\-. ])", re.IGNORECASE)
_NOT_RECIPE = {"func", "input", "output", "workers", "scheduler", "keep_intermediates", "command", "verbose", "quiet",
               "log_level", "no_progress", "overwrite", "pattern"}
_SOURCES = ("checkpoint", "otf_dir", "model", "psf", "psf_a", "psf_b", "weights", "config")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def timepoint_channel(names: Sequence[str]) -> list[tuple[int, int]]:
    """``(t, c)`` of each file: from ``t<N>`` and ``c<N>``/``ch<N>`` tokens in every name, else (file order, 0).

    ``cell_t0003_ch1.tif`` → (3, 1); names without both tokens everywhere fall back to sorted order.
    """
    found = []
    for name in names:
        t = c = None
        for m in _TC.finditer(Path(name).stem):
            if m.group(1) is not None:
                t = int(m.group(1))
            if m.group(2) is not None:
                c = int(m.group(2))
        found.append((t, c))
    if all(t is not None for t, _ in found):
        out = [(int(t), int(c or 0)) for t, c in found]  # type: ignore[arg-type]
        if len(set(out)) == len(out):
            return out
    return [(i, 0) for i in range(len(names))]


def store_path(output: Path) -> Path:
    """``OUT`` if it ends in ``.zarr``, else ``OUT/reconstructed.ome.zarr``."""
    return output if output.suffix == ".zarr" else output / "reconstructed.ome.zarr"


def reconstruct_distributed(args: argparse.Namespace, inputs: Sequence[Path], optics: Any = None, *,
                            progress: bool = True, say: Callable[[str], None] = _stderr) -> RunSummary:
    """``rllsm reconstruct IN OUT --workers N | --scheduler ADDRESS``: one OME-Zarr at :func:`store_path`.

    ``args`` are the command's parsed options (mode already resolved), ``optics`` the optics it resolved (default:
    from the options alone).
    """
    import torch

    from engines.support import min_planes, planes_reason
    from streamer.cli.options import optics_from_args

    if getattr(args, "keep_intermediates", False):
        raise DistributedError("--keep-intermediates is for in-process runs; drop it with --workers/--scheduler")
    optics = optics if optics is not None else optics_from_args(args)
    kwargs = {k: v for k, v in vars(args).items() if k not in _NOT_RECIPE}
    sources = [getattr(args, k, None) for k in _SOURCES]
    recipe = Recipe.make("streamer.distributed.recipe:reconstruct_cli", {"args": kwargs, "optics": optics}, sources,
                         torch_threads=torch.get_num_threads())
    tc = timepoint_channel([p.name for p in inputs])
    # the raw-stack checks of the in-process command: single-view reads 7-plane windows only with VSI-SR
    from engines.reconstruct import uses_lateral_sr

    sr = uses_lateral_sr(args.mode) or (args.mode == "single-view" and getattr(args, "checkpoint", None) is not None)
    need = {"min_planes": min_planes(args.mode, sr), "needed_by": planes_reason(args.mode, sr)}
    jobs = [VolumeJob(t, c, TiffInput(str(p.resolve()), **need)) for p, (t, c) in zip(inputs, tc)]
    n_c = max(c for _, c in tc) + 1
    from engines.reconstruct import views_voxel_um

    v = views_voxel_um(optics, args.mode)

    def meta_for(shape: tuple[int, int, int], dtype: str, voxel: Any = None) -> VolumeMeta:
        return VolumeMeta(acquisition_id=Path(str(args.input)).name or "reconstructed", shape=shape, dtype=dtype,
                          voxel_size_um=tuple(voxel) if voxel else (v, v, v), channels=tuple(str(optics.wavelength_nm if n_c == 1 else i)
                                                                  for i in range(n_c)),
                          n_timepoints=max(t for t, _ in tc) + 1, optics=optics)

    store = store_path(args.output).resolve()
    if getattr(args, "overwrite", False) and store.exists():
        if not (store / LEDGER).exists():
            raise DistributedError(f"{store} exists and is not the output of a distributed run; not replacing it")
        say(f"reconstruct: --overwrite: removing {store}")
        shutil.rmtree(store)
    from engines.scaling import OutputScaling

    scaling = OutputScaling(dtype="float32" if args.float32 else "uint16", gain=getattr(args, "gain", None))
    with open_client(getattr(args, "workers", None), getattr(args, "scheduler", None), device=args.device,
                     say=say) as client:
        summary = run_volumes(client, recipe, jobs, store, meta_for, progress=progress, say=say, scaling=scaling)
    say(f"reconstruct: {summary.describe()}")
    say(f"reconstruct: wrote {store}")
    return summary


# --- replay --------------------------------------------------------------------------------------------------------


def plan_recording(recording: str | Path) -> tuple[dict[str, Any], dict[str, list[VolumeJob]], list[str]]:
    """Read the headers (not the pixels) of a recording: starts by acquisition, one job per whole stack, and the
    stacks left out (incomplete, as the in-process replay skips them).

    Duplicate planes or stacks keep the first one received, as the assembler does.
    """
    from streamer.recording import RecordingReader
    from streamer.wire import AcquisitionStart, Frame, Stack, WireError, decode_header

    starts: dict[str, Any] = {}
    stacks: dict[tuple[str, int, int], int] = {}
    frames: dict[tuple[str, int, int], dict[int, int]] = {}
    z_counts: dict[tuple[str, int, int], int] = {}
    with RecordingReader(recording) as rec:
        for i in range(len(rec)):
            try:
                h = decode_header(rec.header(i))
            except WireError:
                continue  # rejected in-process too
            if isinstance(h, AcquisitionStart):
                starts.setdefault(h.acquisition_id, h)
            elif isinstance(h, Stack):
                key = (h.acquisition_id, h.timepoint, h.channel)
                if key not in stacks and key not in frames:
                    stacks[key] = i
            elif isinstance(h, Frame):
                key = (h.acquisition_id, h.timepoint, h.channel)
                if key in stacks or h.z_index >= h.z_count or z_counts.setdefault(key, h.z_count) != h.z_count:
                    continue
                frames.setdefault(key, {}).setdefault(h.z_index, i)
    path = str(Path(recording).resolve())
    jobs: dict[str, list[VolumeJob]] = {}
    skipped: list[str] = []
    for (acq, t, c), i in stacks.items():
        jobs.setdefault(acq, []).append(VolumeJob(t, c, RecordedInput(path, (i,))))
    for (acq, t, c), planes in frames.items():
        n = z_counts[(acq, t, c)]
        missing = [z for z in range(n) if z not in planes]
        if missing:
            skipped.append(f"{acq} t={t} c={c}: incomplete, missing {len(missing)} of {n} planes")
            continue
        jobs.setdefault(acq, []).append(VolumeJob(t, c, RecordedInput(path, tuple(planes[z] for z in range(n)), n)))
    for acq_jobs in jobs.values():
        acq_jobs.sort(key=lambda j: (j.t, j.c))
    return starts, jobs, skipped


def replay_distributed(recording: str | Path, out: str | Path, *, workers: int | None = None,
                       scheduler: str | None = None, mode: str = "classical", device: str | None = None,
                       weights: str | Path | None = None, backend: Any = None, sources: Any = None,
                       fused_depth: int | None = None, memory_budget_mib: float | None = None, retries: int = 2,
                       progress: bool = True, say: Callable[[str], None] = _stderr) -> dict[str, Any]:
    """``rllsm replay REC --offline --out DIR --workers N | --scheduler ADDRESS``: ``DIR/<acquisition>.ome.zarr``."""
    import torch

    from engines.config import OpticsConfig
    from streamer.wire import AcquisitionStart

    starts, jobs, skipped = plan_recording(recording)
    for s in skipped:
        say(f"replay: skipped {s}")
    w = str(Path(weights).resolve()) if weights is not None else None
    report: dict[str, Any] = {"skipped_incomplete": skipped, "acquisitions": {}}
    with open_client(workers, scheduler, device=device, say=say) as client:
        for acq, acq_jobs in sorted(jobs.items()):
            start = starts.get(acq) or AcquisitionStart(acquisition_id=acq, seq=0, z_count=1, frame_shape=(1, 1))
            optics: OpticsConfig = start.optics
            recipe = Recipe.make("streamer.distributed.recipe:service_stages",
                                 {"mode": str(mode), "optics": optics, "device": device, "weights": w,
                                  "backend": backend, "sources": sources, "fused_depth": fused_depth,
                                  "memory_budget_mib": memory_budget_mib},
                                 [w, *source_paths(sources)], torch_threads=torch.get_num_threads())
            n_c = max(len(start.channels), max(j.c for j in acq_jobs) + 1)
            n_t = max(start.n_timepoints or 0, max(j.t for j in acq_jobs) + 1)

            def meta_for(shape: tuple[int, int, int], dtype: str, voxel: Any = None, start: AcquisitionStart = start,
                         n_c: int = n_c) -> VolumeMeta:
                meta = VolumeMeta.from_start(start, shape=shape, dtype=dtype)
                if len(meta.channels) < n_c:  # stacks on channels the start did not announce: name them by number
                    meta = VolumeMeta(meta.acquisition_id, meta.shape, meta.dtype, meta.voxel_size_um,
                                      tuple(meta.channels) + tuple(str(i) for i in range(len(meta.channels), n_c)),
                                      None, meta.time_interval_s, meta.optics, meta.metadata)
                return meta

            store = (Path(out) / f"{acq}.ome.zarr").resolve()
            summary = run_volumes(client, recipe, acq_jobs, store, meta_for, n_timepoints=n_t, retries=retries,
                                  progress=progress, say=say)
            say(f"replay: {acq}: {summary.describe()}")
            report["acquisitions"][acq] = summary.as_dict()
    return report
