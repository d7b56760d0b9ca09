"""Run one task per (timepoint, channel) volume on a Dask cluster into one OME-Zarr, resumable and fault-tolerant.

1. **Resume.** An existing store must have been made with the same recipe (builder, arguments, model contents); each
   volume in its ledger is re-read on a worker and trusted only if its CRC-32 matches.
2. **Probe.** Without a store, the first volume is computed and returned: its shape and dtype make the store.
3. **Scatter.** Every other volume is one task; each writes its own shard and returns its CRC-32; the driver then
   appends it to the ledger (the only writer), so a volume is recorded exactly once however often it ran.
4. **Faults.** A worker that dies takes its tasks with it; the scheduler reruns them elsewhere (a task that killed
   ``allowed_failures`` workers is given up). An exception is retried ``retries`` times. A volume that fails every
   try is reported by timepoint/channel with its error; the rest completes.
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamer.distributed.errors import DistributedError
from streamer.distributed.recipe import Recipe
from streamer.distributed.store import Ledger, LedgerEntry, create_store, finish_store, grow_canvas, write_volume
from streamer.distributed.tasks import VolumeResult, check_volume, compute_volume
from streamer.sinks.base import VolumeMeta

log = logging.getLogger(__name__)
# (volume shape, dtype, fused voxel (z, y, x) in µm or None) → the store's metadata
MetaFactory = Callable[[tuple[int, int, int], str, Any], VolumeMeta]


@dataclass(frozen=True)
class VolumeJob:
    """One volume to make: where it goes and what to read."""

    t: int
    c: int
    source: Any  # TiffInput | RecordedInput (anything with .load() → ndarray, picklable)


@dataclass
class RunSummary:
    """The end of a distributed run."""

    store: str
    volumes: int
    computed: int = 0
    resumed: int = 0  # recorded in the ledger and verified: not made again
    failed: dict[str, str] = field(default_factory=dict)  # "t=3 c=0" → error
    seconds: float = 0.0
    per_worker: dict[str, int] = field(default_factory=dict)
    run: str = ""

    @property
    def volumes_per_s(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"store": self.store, "volumes": self.volumes, "computed": self.computed, "resumed": self.resumed,
                "failed": self.failed, "seconds": round(self.seconds, 3),
                "volumes_per_s": round(self.volumes_per_s, 4), "per_worker": self.per_worker, "run": self.run}

    def describe(self) -> str:
        workers = ", ".join(f"{w} {n}" for w, n in sorted(self.per_worker.items())) or "none"
        text = (f"{self.computed} volume(s) made, {self.resumed} already done, {len(self.failed)} failed, of "
                f"{self.volumes}, in {self.seconds:.1f} s ({self.volumes_per_s:.2f} volumes/s); per worker: {workers}")
        for k, v in sorted(self.failed.items()):
            text += f"\n  FAILED {k}: {v}"
        return text


def _label(t: int, c: int) -> str:
    return f"t={t} c={c}"


def run_volumes(
    client: Any, recipe: Recipe, jobs: Sequence[VolumeJob], store: Path, meta_for: MetaFactory, *,
    n_timepoints: int | None = None, retries: int = 2, progress: bool = True, scaling: Any = None,
    say: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> RunSummary:
    """Make every job's volume into ``store`` on the cluster behind ``client``; see the module text.

    ``scaling`` (:class:`engines.scaling.OutputScaling`) stores the volumes as ``rllsm reconstruct`` does: uint16
    with one gain for the run, set from the first volume made (the probe) unless given, and kept in the ledger so
    that a resumed run uses it again; None stores the chain's output as it is.

    Raises
    ------
    DistributedError
        The store exists but was made with another recipe or geometry, or cannot be created.
    """
    from distributed import as_completed
    from tqdm import tqdm

    keys = [(j.t, j.c) for j in jobs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise DistributedError(f"two inputs map to the same volume {_label(*dup)}")
    n_t = n_timepoints or (max((j.t for j in jobs), default=-1) + 1)
    summary = RunSummary(str(store), len(jobs), run=uuid.uuid4().hex[:8])
    counts: Counter[str] = Counter()
    t_start = time.perf_counter()
    ledger = Ledger(store) if store.exists() else None
    if ledger is not None and ledger.recipe is None:
        raise DistributedError(f"{store} exists but is not the output of a distributed run (no {ledger.path.name}); "
                               "choose a new output")
    if ledger is not None and ledger.recipe != recipe.fingerprint:
        raise DistributedError(f"{store} was made by another reconstruction (recipe {ledger.recipe}, now "
                               f"{recipe.fingerprint}: different settings or model files); choose a new output (`rllsm reconstruct --overwrite` replaces it)")
    skey = str(store)
    fixed = [scaling]  # the run's scaling once its gain is known (set by the probe, or read from the ledger)
    if ledger is not None and ledger.scaling is not None and scaling is not None:
        fixed[0] = type(scaling).model_validate(ledger.scaling)
    bar = tqdm(total=len(jobs), unit="vol", desc="volumes", disable=not progress, file=sys.stderr)
    todo = list(jobs)
    try:
        if ledger is not None:
            done = ledger.done()
            checks = {(j.t, j.c): client.submit(check_volume, skey, j.t, j.c, done[(j.t, j.c)].crc32,
                                                done[(j.t, j.c)].shape, pure=False)
                      for j in jobs if (j.t, j.c) in done}
            ok = {k for k, f in checks.items() if f.result()}
            if len(ok) < len(checks):
                say(f"resume: {len(checks) - len(ok)} recorded volume(s) do not read back intact; making them again")
            todo = [j for j in jobs if (j.t, j.c) not in ok]
            summary.resumed = len(ok)
            bar.update(len(ok))
        else:
            todo = _probe(client, recipe, todo, store, meta_for, n_t, summary, counts, bar, retries, fixed)
            ledger = Ledger(store) if store.exists() else None
        if ledger is not None and todo:
            def submit(j: VolumeJob) -> Any:
                return client.submit(compute_volume, recipe, j.source, j.t, j.c, skey, fixed[0], retries=retries,
                                     pure=False)

            futures = {submit(j): j for j in todo}
            pending = as_completed(list(futures))
            for fut in pending:
                j = futures.pop(fut)
                try:
                    res: VolumeResult = fut.result()
                except Exception as err:  # noqa: BLE001 — retries exhausted, or the task took down too many workers
                    summary.failed[_label(j.t, j.c)] = f"{type(err).__name__}: {err}"
                else:
                    if res.does_not_fit:  # rare (a plane more than any before): grow, then make it again
                        grow_canvas(skey, res.shape)
                        again = submit(j)
                        futures[again] = j
                        pending.add(again)
                        fut.release()
                        continue
                    if res.error:
                        summary.failed[_label(j.t, j.c)] = res.error
                    else:
                        ledger.append(LedgerEntry(j.t, j.c, res.crc32, res.shape, res.worker, round(res.seconds, 4),
                                                  summary.run))
                        counts[res.worker] += 1
                        summary.computed += 1
                fut.release()
                bar.update(1)
        elif ledger is None:
            for j in todo:
                summary.failed.setdefault(_label(j.t, j.c), "not attempted: no volume could be made to set up the output")
    finally:
        bar.close()
        if ledger is not None:
            ledger.close()
    summary.seconds = time.perf_counter() - t_start
    summary.per_worker = dict(counts)
    if store.exists():
        finish_store(store, summary.failed, complete=not summary.failed)
    for k, v in sorted(summary.failed.items()):
        log.error("volume %s failed: %s", k, v)
    return summary


def _probe(client: Any, recipe: Recipe, todo: list[VolumeJob], store: Path, meta_for: MetaFactory, n_t: int,
           summary: RunSummary, counts: Counter[str], bar: Any, retries: int, fixed: list[Any]) -> list[VolumeJob]:
    """Make volumes one at a time until one succeeds; it sets the store's geometry (and the uint16 gain) and is
    written by the driver."""
    while todo:
        j = todo.pop(0)
        try:
            res = client.submit(compute_volume, recipe, j.source, j.t, j.c, None, retries=retries,
                                pure=False).result()
        except Exception as err:  # noqa: BLE001 — reported per volume like any other failure
            summary.failed[_label(j.t, j.c)] = f"{type(err).__name__}: {err}"
            bar.update(1)
            continue
        if res.error or res.volume is None:
            summary.failed[_label(j.t, j.c)] = res.error or "no volume returned"
            bar.update(1)
            continue
        vol = res.volume
        scaling = fixed[0]
        if scaling is not None:
            from engines.scaling import ScalingError, VolumeScaler

            scaler = VolumeScaler(scaling)
            try:
                vol = scaler(vol)
            except ScalingError as err:  # e.g. an empty volume: no gain from it; the next one may set it
                summary.failed[_label(j.t, j.c)] = f"{type(err).__name__}: {err}"
                bar.update(1)
                continue
            fixed[0] = scaling = scaling.model_copy(update={"gain": scaler.gain})
        create_store(store, meta_for(tuple(vol.shape), vol.dtype.name, res.voxel_zyx_um), n_t, recipe.fingerprint,
                     scaling.model_dump(mode="json") if scaling is not None else None)
        crc = write_volume(str(store), j.t, j.c, vol)
        ledger = Ledger(store)
        ledger.append(LedgerEntry(j.t, j.c, crc, tuple(vol.shape), res.worker, round(res.seconds, 4), summary.run))
        ledger.close()
        counts[res.worker] += 1
        summary.computed += 1
        bar.update(1)
        return todo
    return todo
