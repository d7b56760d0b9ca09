"""Decode + range checks: everything the processor asks of a message before any state changes.

:func:`decode_message` is total: whatever the bytes, it returns a validated header (and payload view) or raises a
:class:`~streamer.wire.WireError` subclass with a bounded text. :func:`out_of_range` checks a stack against what its
acquisition announced (the OME writers cannot place a stack outside it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from streamer.assembly import StackKey
from streamer.textlimits import clip
from streamer.wire import AcquisitionStart, MalformedHeader, WireError, decode


def decode_message(parts: Sequence[Any], *, strict: bool = True) -> tuple[Any, np.ndarray | None]:
    """:func:`streamer.wire.decode`, with any unforeseen failure turned into a :class:`MalformedHeader`."""
    try:
        return decode(parts, strict=strict)
    except WireError:
        raise
    except (RecursionError, MemoryError, ValueError, TypeError, OverflowError, UnicodeError) as err:
        raise MalformedHeader(f"message cannot be decoded: {type(err).__name__}: {clip(str(err), 120)}") from None


def out_of_range(key: StackKey, start: AcquisitionStart | None) -> str | None:
    """Why a stack lies outside what its acquisition announced, or None."""
    if start is None:
        return None
    n_c = len(start.channels)
    if key.channel >= n_c:
        return f"{key.label()}: channel {key.channel}, but the acquisition announced {n_c} channel{'s' * (n_c > 1)}"
    n_t = start.n_timepoints
    if n_t is not None and key.timepoint >= n_t:
        return f"{key.label()}: timepoint {key.timepoint}, but the acquisition announced {n_t} timepoint{'s' * (n_t > 1)}"
    return None


def ranges(zs: Sequence[int], limit: int = 200) -> str:
    """[0,1,2,5,7,8] → '0-2,5,7-8' (readable lists of missing planes), cut to ``limit`` characters.

    Vectorised: a 65,536-plane declaration must not cost a Python loop per plane.
    """
    z = np.asarray(zs, dtype=np.int64)
    if z.size == 0:
        return ""
    breaks = np.flatnonzero(np.diff(z) != 1)
    starts = np.concatenate(([z[0]], z[breaks + 1]))
    ends = np.concatenate((z[breaks], [z[-1]]))
    out: list[str] = []
    size = 0
    for a, b in zip(starts.tolist(), ends.tolist()):
        out.append(str(a) if a == b else f"{a}-{b}")
        size += len(out[-1]) + 1
        if size > limit:  # the rest is not shown anyway
            out.append(f"… ({len(starts) - len(out)} more runs)")
            break
    return clip(",".join(out), limit + 40)


# Memory one stack's reconstruction needs, as a multiple of its deskewed float32 volume: the views, the fusion's
# padded FFT work arrays and the result. An estimate (not a measurement) meant to refuse only absurd stacks; the
# absolute budget is --memory-budget (MiB).
WORK_FACTOR = 16
# Deskewing pads the sheared axis by nz·dz·cos θ/dx pixels; a stack whose padding is this many times its own width is
# not a light-sheet stack (e.g. 4096 planes of 2×2 pixels would become 4096×2×7602) and is refused, not computed.
MAX_DESKEW_GROWTH = 32.0


def make_work_check(mode: str, budget_bytes: int) -> Any:
    """A :data:`streamer.processor.WorkCheck` for the stage chains of ``mode`` under a memory budget in bytes."""
    from engines.config import OpticsConfig
    from engines.deskew import deskewed_width

    deskews = str(mode) not in ("none",)

    def check(shape: tuple[int, ...], start: AcquisitionStart | None) -> str | None:
        nz, ny, nx = (int(s) for s in shape)
        raw = nz * ny * nx * 4
        work = raw
        if deskews:
            o = start.optics if start is not None else OpticsConfig()
            along_x = str(o.skew_axis) == "x"
            n_sheared = nx if along_x else ny
            try:
                wide = deskewed_width(n_sheared, nz, o.pixel_size_um, o.stage_step_um, o.skew_angle_deg)
            except Exception as err:  # optics the deskew refuses: said when the stages are built
                return f"unusable optics for deskewing ({clip(str(err), 120)})"
            if wide > MAX_DESKEW_GROWTH * n_sheared + 64:
                return (f"{nz}×{ny}×{nx} planes would deskew to a {wide}-pixel-wide volume "
                        f"({wide / n_sheared:.0f}× its width): not a light-sheet stack this service reconstructs")
            work = nz * (ny * wide if along_x else nx * wide) * 4 * WORK_FACTOR
        if work > budget_bytes:
            return (f"reconstructing {nz}×{ny}×{nx} needs about {work / 2**20:.0f} MiB, more than the "
                    f"{budget_bytes / 2**20:.0f} MiB memory budget (--memory-budget)")
        return None

    return check
