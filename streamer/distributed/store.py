"""One OME-Zarr written by many workers, and the ledger that says which of its volumes are done.

Each volume ``(t, c)`` has shards of its own (chunk and shard shape ``(1, 1, …)``), so two workers never write the
same file and a retried volume rewrites only its own shards.

Fused volumes need not all have one shape: the mirror plane found in each stack decides where its two views are cut,
so a volume can be a plane taller or shorter than another. The array is a *canvas*: the largest volume so far, every
volume written at its origin and zero-padded; its own shape is kept in the ledger and, at the end, in
``attributes.rllsm.volume_shapes``. :func:`read_volume` returns it cropped, exactly as the in-process run made it.
Only the driver grows the canvas (a metadata-only resize); chunks are rounded up so that growing by a few planes stays
inside each volume's shards.

The ledger (``rllsm-ledger.jsonl`` inside the store) is written by the driver alone, one JSON line per volume once its
task has returned: ``{"t", "c", "crc32", "shape", "worker", "seconds", "run"}``. The first line names the recipe the store was
made with. A resumed run trusts a line only if the volume it names reads back with the same CRC-32.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamer.distributed.errors import DistributedError, VolumeRejected
from streamer.sinks.base import VolumeMeta
from streamer.sinks.zarr_sink import AXES, default_chunks, ngff_attributes

LEDGER = "rllsm-ledger.jsonl"
ARRAY = "0"


def volume_crc(volume: np.ndarray) -> str:
    """CRC-32 of the volume's bytes as stored (little-endian, C order)."""
    v = np.ascontiguousarray(volume, dtype=volume.dtype.newbyteorder("<"))
    return f"{zlib.crc32(memoryview(v).cast('B')):08x}"


class DoesNotFit(Exception):
    """The volume is larger than the canvas along some axis; the driver grows the canvas and resubmits it."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__(f"volume {'×'.join(map(str, shape))} is larger than the canvas")
        self.shape = shape


def canvas_chunks(shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """:func:`default_chunks` rounded up to multiples of 16: a volume a few planes larger stays in its shards."""
    return tuple(min(cap, -(-c // 16) * 16) for c, cap in zip(default_chunks(shape), (64, 256, 256)))  # type: ignore


def create_store(path: Path, meta: VolumeMeta, n_timepoints: int, recipe_fingerprint: str,
                 scaling: dict[str, Any] | None = None) -> None:
    """Create the dataset ``(t, c, z, y, x)`` with its NGFF 0.5 metadata and an empty ledger naming the recipe
    (and the run's output scaling, e.g. its one uint16 gain, which a resumed run must use again)."""
    import zarr

    if path.exists():
        raise DistributedError(f"{path} already exists but holds no ledger of a distributed run; choose a new output")
    z, y, x = meta.shape
    chunks = canvas_chunks(meta.shape)
    shard = tuple(-(-s // c) * c for s, c in zip(meta.shape, chunks))  # whole chunks; may overhang the edge
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        group = zarr.open_group(store=str(path), mode="w", zarr_format=3)
        group.create_array(name=ARRAY, shape=(n_timepoints, len(meta.channels), z, y, x), dtype=np.dtype(meta.dtype),
                           fill_value=0, dimension_names=list(AXES), compressors=None, chunks=(1, 1, *chunks),
                           shards=(1, 1, *shard))
        group.attrs.update({"ome": ngff_attributes(meta), "rllsm": {
            "acquisition_id": meta.acquisition_id,
            "optics": meta.optics.model_dump(mode="json") if meta.optics is not None else None,
            "recipe": recipe_fingerprint, "scaling": scaling, "complete": False, "skipped": {},
        }})
        with open(path / LEDGER, "w") as fh:
            fh.write(json.dumps({"kind": "store", "recipe": recipe_fingerprint, "shape": list(meta.shape),
                                 "dtype": str(np.dtype(meta.dtype)), "scaling": scaling}) + "\n")
    except OSError as err:
        raise DistributedError(f"cannot create {path}: {err.strerror or err}") from None


def _array(store: str | os.PathLike[str], mode: str = "r+") -> Any:
    import zarr

    return zarr.open_array(store=os.path.join(os.fspath(store), ARRAY), mode=mode, zarr_format=3)


def write_volume(store: str | os.PathLike[str], t: int, c: int, volume: np.ndarray) -> str:
    """Write one volume at the origin of its slot, zero-padded to the canvas; returns its CRC-32.

    Raises
    ------
    VolumeRejected
        Another dtype, or ``(t, c)`` outside the dataset.
    DoesNotFit
        Larger than the canvas: nothing is written.
    """
    arr = _array(store)
    if volume.dtype != arr.dtype:
        raise VolumeRejected(f"t={t} c={c}: volume is {volume.dtype}, but the output holds {arr.dtype} volumes")
    if not (0 <= t < arr.shape[0] and 0 <= c < arr.shape[1]):
        raise VolumeRejected(f"t={t} c={c} lies outside the output's {arr.shape[0]} timepoints × {arr.shape[1]} "
                             "channels")
    canvas = tuple(arr.shape[2:])
    if any(v > s for v, s in zip(volume.shape, canvas)):
        raise DoesNotFit(tuple(volume.shape))
    # An earlier attempt killed mid-write may have left a torn shard, which zarr would try to merge with (a shard
    # overhanging the canvas edge is written partially); the folder holds this volume's shards and nothing else.
    shutil.rmtree(Path(store) / ARRAY / "c" / str(t) / str(c), ignore_errors=True)
    if tuple(volume.shape) == canvas:
        arr[t, c] = volume
    else:  # the whole slot, so that nothing of an earlier, larger attempt survives around it
        slot = np.zeros(canvas, volume.dtype)
        slot[tuple(slice(0, n) for n in volume.shape)] = volume
        arr[t, c] = slot
    return volume_crc(volume)


def grow_canvas(store: str | os.PathLike[str], shape: tuple[int, ...]) -> tuple[int, ...]:
    """Grow the canvas to hold ``shape`` (driver only; metadata-only); returns the new (z, y, x)."""
    arr = _array(store)
    new = tuple(max(a, b) for a, b in zip(arr.shape[2:], shape))
    if new != tuple(arr.shape[2:]):
        arr.resize((*arr.shape[:2], *new))
    return new


def read_volume(store: str | os.PathLike[str], t: int, c: int, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Volume ``(t, c)`` as it was made: cropped to ``shape``, else to the shape its ledger entry records."""
    if shape is None:
        shape = Ledger(Path(store)).shapes().get((t, c))
    arr = _array(store, "r")
    region = (t, c) + tuple(slice(0, n) for n in shape) if shape is not None else (t, c)
    return np.asarray(arr[region])


def verify_volume(store: str | os.PathLike[str], t: int, c: int, crc: str, shape: tuple[int, ...]) -> bool:
    """True if the stored volume reads back whole and with this CRC-32 (a torn or missing shard is False)."""
    try:
        return volume_crc(read_volume(store, t, c, shape)) == crc
    except Exception:  # noqa: BLE001 — any read failure means "not done"; the volume is simply made again
        return False


def finish_store(path: Path, failed: dict[str, str], complete: bool) -> None:
    """Record failed volumes (``rllsm.skipped``), each volume's own shape, and whether every volume is there."""
    import zarr

    group = zarr.open_group(store=str(path), mode="r+", zarr_format=3)
    doc = dict(group.attrs.get("rllsm", {}))
    shapes = {f"t={t} c={c}": list(s) for (t, c), s in sorted(Ledger(path).shapes().items())}
    doc.update({"skipped": failed, "complete": complete, "volume_shapes": shapes})
    group.attrs.update({"rllsm": doc})


@dataclass(frozen=True)
class LedgerEntry:
    t: int
    c: int
    crc32: str
    shape: tuple[int, ...]
    worker: str
    seconds: float
    run: str


class Ledger:
    """Append-only record of finished volumes; only the driver writes it, one line per volume, flushed at once."""

    def __init__(self, store: Path) -> None:
        self.path = store / LEDGER
        self.recipe: str | None = None
        self.shape: tuple[int, ...] | None = None
        self.dtype: str | None = None
        self.scaling: dict[str, Any] | None = None
        self.entries: list[LedgerEntry] = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:  # a torn last line (driver killed mid-write) is ignored: that volume is made again
                    doc = json.loads(line)
                    if doc.get("kind") == "store":
                        self.recipe, self.shape, self.dtype = doc["recipe"], tuple(doc["shape"]), doc["dtype"]
                        self.scaling = doc.get("scaling")
                    else:
                        self.entries.append(LedgerEntry(int(doc["t"]), int(doc["c"]), str(doc["crc32"]),
                                                        tuple(int(n) for n in doc["shape"]),
                                                        str(doc.get("worker", "")), float(doc.get("seconds", 0)),
                                                        str(doc.get("run", ""))))
                except (ValueError, KeyError, TypeError):
                    continue
        self._fh: Any = None

    def done(self) -> dict[tuple[int, int], LedgerEntry]:
        """The last line for each volume ``(t, c)``."""
        return {(e.t, e.c): e for e in self.entries}

    def shapes(self) -> dict[tuple[int, int], tuple[int, ...]]:
        return {(e.t, e.c): e.shape for e in self.entries}

    def append(self, entry: LedgerEntry) -> None:
        if self._fh is None:
            self._cut_torn_tail()
            self._fh = open(self.path, "a", buffering=1)  # noqa: SIM115 — held for the run, closed by close()
        doc = dict(entry.__dict__, shape=list(entry.shape))
        self._fh.write(json.dumps(doc) + "\n")
        self.entries.append(entry)

    def _cut_torn_tail(self) -> None:
        """A line cut short by a killed driver would swallow the next one appended: drop it first."""
        if not self.path.exists():
            return
        with open(self.path, "rb+") as fh:
            data = fh.read()
            if data and not data.endswith(b"\n"):
                fh.truncate(data.rfind(b"\n") + 1)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
