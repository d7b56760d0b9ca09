"""One output grid per acquisition: place every fused volume into the same shape, anchored on the mirror plane.

The fused volume's depth follows the mirror: :func:`engines.views.split_views` cuts each view from the far end up to
the slice next to the mirror, so when the coverslip drifts by a fraction of a micrometre between stacks the view depth
changes by a slice or more (and the lateral size would change with the raw frame size). A time series needs one
shape, so each volume is *placed* into a grid fixed once per acquisition:

* **z** — the documented anchor is the mirror plane: the slice nearest the mirror (the last plane of a fused volume)
  always lands on the grid's last plane; a deeper volume loses planes at the far end, a shallower one is padded there
  with zeros (the fill value a viewer shows as empty). The mirror lies 0.5 or 1 slice beyond the last plane
  (:func:`engines.views.view_indices`); that sub-slice gap and the split position are recorded per stack.
* **y, x** — centred (crop or zero-pad symmetrically); they only differ when the frame size changes.

The grid's depth comes from the optics and the raw stack shape, not from where the mirror happened to be in the
first stack: it is the depth a mirror exactly at the centre of the rotated volume gives
(:func:`nominal_depth`), so a restarted service fixes the very same grid. It can also be set explicitly.

Pure compute: arrays and numbers in, arrays and frozen records out.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


class GridError(ValueError):
    """A volume cannot be placed into the acquisition's grid (wrong dimensionality, unusable grid)."""


@dataclass(frozen=True)
class Placement:
    """How one fused volume was placed into the grid (recorded per stack in the outputs).

    ``pad_z`` > 0: planes of zeros added at the far end; < 0: far planes dropped. ``pad_y``/``pad_x`` likewise,
    split evenly between both sides. ``split_index`` is the mirror position found in the rotated volume (slices,
    may be x.5) and ``mirror_gap`` the distance in slices from the grid's last plane to the mirror (0.5 or 1).
    """

    native_shape: tuple[int, int, int]
    pad_z: int
    pad_y: int
    pad_x: int
    split_index: float | None = None
    split_offset: float | None = None
    mirror_gap: float | None = None

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["native_shape"] = list(self.native_shape)
        return d


def nominal_depth(rotated_depth: int, max_depth: int) -> int:
    """Depth of each view when the mirror sits exactly at the centre of a rotated volume of ``rotated_depth``."""
    from engines.views import view_indices

    if rotated_depth < 2:
        raise GridError(f"a rotated volume of {rotated_depth} plane(s) holds no two views")
    return len(view_indices(int(rotated_depth), 0.0, int(max_depth))[0])


def _fit_axis(n_in: int, n_out: int, anchor: str) -> tuple[slice, slice]:
    """Source and destination slices placing ``n_in`` samples into ``n_out`` (anchor: ``end`` or ``centre``)."""
    n = min(n_in, n_out)
    if anchor == "end":
        return slice(n_in - n, n_in), slice(n_out - n, n_out)
    s0, d0 = (n_in - n) // 2, (n_out - n) // 2
    return slice(s0, s0 + n), slice(d0, d0 + n)


def fit_to_grid(volume: np.ndarray, shape: tuple[int, int, int]) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Place ``volume`` (z, y, x) into ``shape``: z anchored at the last plane, y and x centred; zeros elsewhere.

    Returns the placed volume (``volume`` itself when it already has the shape) and the padding per axis
    (positive: added, negative: cropped).
    """
    if volume.ndim != 3:
        raise GridError(f"expected a (z, y, x) volume, got {volume.ndim}-D {volume.shape}")
    if len(shape) != 3 or any(int(s) < 1 for s in shape):
        raise GridError(f"grid shape must be 3 positive sizes (z, y, x), got {shape}")
    shape = tuple(int(s) for s in shape)  # type: ignore[assignment]
    pads = (shape[0] - volume.shape[0], shape[1] - volume.shape[1], shape[2] - volume.shape[2])
    if pads == (0, 0, 0):
        return volume, pads
    # a device tensor is placed where it is (the service's chain stays on the GPU until the volume is published)
    out = volume.new_zeros(shape) if hasattr(volume, "new_zeros") else np.zeros(shape, dtype=volume.dtype)
    src, dst = zip(*(_fit_axis(n_in, n_out, a) for n_in, n_out, a in zip(volume.shape, shape, ("end", "c", "c"))))
    out[dst] = volume[src]
    return out, pads


@dataclass(frozen=True)
class OutputGrid:
    """What a stage chain declares about its output: the voxel size of the fused grid (z, y, x) in µm.

    ``depth`` fixes the number of planes explicitly; None takes :func:`nominal_depth` of the first stack.
    """

    voxel_size_um: tuple[float, float, float]
    depth: int | None = None
    anchor: str = "mirror plane: last plane nearest the mirror; far end cropped or zero-padded; y, x centred"

    def __post_init__(self) -> None:
        if len(self.voxel_size_um) != 3 or any(not (float(v) > 0) for v in self.voxel_size_um):
            raise GridError(f"voxel size must be 3 positive numbers in µm, got {self.voxel_size_um}")
        if self.depth is not None and int(self.depth) < 1:
            raise GridError(f"grid depth must be ≥ 1 plane, got {self.depth}")


class GridFitter:
    """Fixes the grid of one acquisition at its first volume and places every volume into it.

    ``placements`` holds one :class:`Placement` per placed volume, in order, for the caller to pair with the
    volumes it receives (the chain runs one stack at a time, so the order is the volumes' order).
    """

    def __init__(self, grid: OutputGrid, max_depth: int = 101) -> None:
        self.grid = grid
        self.max_depth = int(max_depth)
        self.shape: tuple[int, int, int] | None = None
        self.placements: deque[Placement] = deque(maxlen=4096)  # bounded: a reader that never pops costs nothing
        self._lock = threading.Lock()

    def fix(self, fused_shape: tuple[int, ...], rotated_depth: int | None) -> tuple[int, int, int]:
        """The grid shape, fixed on the first call (explicit depth, else the nominal one, else the volume's)."""
        with self._lock:
            if self.shape is None:
                if self.grid.depth is not None:
                    depth = int(self.grid.depth)
                elif rotated_depth is not None:
                    depth = nominal_depth(rotated_depth, self.max_depth)
                else:
                    depth = int(fused_shape[0])
                self.shape = (depth, int(fused_shape[1]), int(fused_shape[2]))
            return self.shape

    def place(self, fused: np.ndarray, report: Any = None) -> np.ndarray:
        """Place one fused volume; ``report`` is the :class:`engines.views.ViewsReport` of its split (or None)."""
        if fused.ndim != 3:
            raise GridError(f"expected a (z, y, x) fused volume, got {fused.ndim}-D {fused.shape}")
        rotated_depth = int(report.rotated_shape[0]) if report is not None else None
        shape = self.fix(fused.shape, rotated_depth)
        out, (pz, py, px) = fit_to_grid(fused, shape)
        split = gap = offset = None
        if report is not None:
            split, offset = float(report.split_index), float(report.split_offset)
            k = int(round(2 * split))  # the index sum of mirror pairs, as engines.views.view_indices rounds it
            gap = k / 2.0 - (int(np.ceil(k / 2.0)) - 1)
        self.placements.append(Placement(tuple(int(s) for s in fused.shape), pz, py, px, split, offset, gap))
        return out

    def pop(self) -> Placement | None:
        """The oldest placement not yet taken, or None."""
        try:
            return self.placements.popleft()
        except IndexError:
            return None
