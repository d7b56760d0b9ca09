"""Frame → stack assembly: pure bookkeeping, no sockets, no clocks of its own (the caller passes ``now``).

Frames are keyed by (acquisition, timepoint, channel) and may arrive in any order. A stack is emitted as soon as its
last plane arrives; one that stops receiving planes for ``timeout_s`` (or whose acquisition ends, or that is pushed out
by too many open stacks) is emitted *flagged incomplete* with the list of missing planes (zero-filled), so that it is
recorded, reported and processed instead of silently vanishing.
"""

from __future__ import annotations

import sys
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np

from streamer.wire import Frame, Stack, WireError


class StackBuffers:
    """Recycles the arrays of emitted stacks once nothing references them any more.

    Each plane is copied once, into its stack. Into fresh memory that copy costs a page fault and the kernel's
    zeroing of every 4 KB page: 36 µs per 512×512 uint16 plane instead of 7 µs into memory already touched (2-core
    benchmark machine), the largest cost of assembly. An emitted stack is handed on (stages, sinks, queues); its
    array is reused only when the reference count says this pool is its sole holder. Every NumPy view, memoryview
    or ``torch.from_numpy`` tensor of it holds a reference to it (the pool only hands out arrays that own their
    memory, so views point at them, not past them). Without reference counts (not CPython), nothing is reused.

    A reused array holds an older stack's pixels: the assembler zeroes the planes a stack never received.

    Parameters
    ----------
    keep
        Arrays tracked at most (the most recently allocated).
    max_bytes
        Their total size at most: memory the pool may keep from the OS once the stacks are no longer used.
        Bigger stacks are allocated fresh each time.
    """

    _enabled = hasattr(sys, "getrefcount") and sys.implementation.name == "cpython"

    def __init__(self, keep: int = 4, max_bytes: int = 1 << 30) -> None:
        self.keep = int(keep)
        self.max_bytes = int(max_bytes)
        self._held: list[np.ndarray] = []
        self.reused = 0

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> tuple[np.ndarray, bool]:
        """An array of ``shape``/``dtype`` and whether it is known to be all zeros (fresh) or not (reused)."""
        if self._enabled:
            for i in range(len(self._held)):  # not enumerate(): its reused tuple would hold one more reference
                arr = self._held[i]
                # 3 references: this list, ``arr``, getrefcount's argument. Nobody else can see it.
                if arr.shape == shape and arr.dtype == dtype and sys.getrefcount(arr) <= 3:
                    del self._held[i]
                    self._held.append(arr)
                    self.reused += 1
                    return arr, False
        arr = np.zeros(shape, dtype=dtype)
        if self._enabled and self.keep and arr.nbytes <= self.max_bytes:
            self._held.append(arr)
            while len(self._held) > self.keep or sum(a.nbytes for a in self._held) > self.max_bytes:
                self._held.pop(0)  # forgotten, not freed: whoever holds it keeps it
        return arr, True


class AssemblyError(WireError):
    """A frame that cannot be placed in its stack (the message was well-formed, its content contradicts others)."""


class InconsistentFrame(AssemblyError):
    """The frame's shape, pixel type or plane count differs from the stack's earlier frames."""


class DuplicateFrame(AssemblyError):
    """The stack already has this plane."""


class LateFrame(AssemblyError):
    """The frame's stack was already emitted (complete, or flagged incomplete after its timeout)."""


class StackOutOfRange(AssemblyError):
    """The stack's channel or timepoint lies outside what its acquisition announced in ``acquisition_start``."""


class StackTooLarge(AssemblyError):
    """The stack the frame announces would not fit the memory the service may use for one stack."""


@dataclass(frozen=True, order=True)
class StackKey:
    acquisition_id: str
    timepoint: int
    channel: int

    def label(self) -> str:
        return f"{self.acquisition_id} t={self.timepoint} c={self.channel}"


@dataclass
class AssembledStack:
    """A stack ready for processing.

    ``complete`` is False for a flagged stack; ``missing`` then lists its absent planes (filled with zeros) and
    ``reason`` says why it was emitted early. ``records`` is the range of recording indices its messages came from.
    """

    key: StackKey
    data: np.ndarray
    complete: bool = True
    missing_idx: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # absent planes, ascending
    reason: str = ""
    records: tuple[int, int] = (-1, -1)
    received_at: float = 0.0  # when the last message of the stack arrived

    @property
    def missing(self) -> tuple[int, ...]:
        """The absent planes as a tuple (kept as an array: a 65,536-plane declaration must stay cheap)."""
        return tuple(self.missing_idx.tolist())

    def __str__(self) -> str:  # used in error messages: never print the pixels
        return f"stack {self.key.label()}"


@dataclass
class _Open:
    data: np.ndarray
    have: np.ndarray
    n_have: int
    dtype: np.dtype
    first_record: int
    last_record: int
    last_seen: float
    z_count: int
    shape: tuple[int, int]
    zeroed: bool = True  # False: a reused buffer, whose missing planes must be cleared when it is emitted


@dataclass
class AssemblerStats:
    complete: int = 0
    incomplete: int = 0
    duplicates: int = 0
    late: int = 0
    inconsistent: int = 0
    incomplete_keys: deque[str] = field(default_factory=lambda: deque(maxlen=10_000))  # the most recent ones


class StackAssembler:
    """Assemble :class:`~streamer.wire.Frame` messages into stacks.

    Parameters
    ----------
    timeout_s
        A stack that has received no plane for this long is emitted incomplete by :meth:`expire`.
    max_open
        Open stacks held at once (memory bound); adding one more flags the oldest incomplete.
    remember_closed
        How many emitted keys are remembered to recognise late frames.
    max_stack_bytes
        Largest stack accepted (a frame header announcing more is rejected rather than exhausting memory).
    max_open_bytes
        Bytes of open stacks held at once (default: twice ``max_stack_bytes``); opening one more evicts the oldest
        (flagged incomplete) until it fits, so many big declared stacks cannot add up past it.
    """

    def __init__(self, timeout_s: float = 5.0, max_open: int = 64, remember_closed: int = 4096,
                 max_stack_bytes: int = 8 << 30, max_open_bytes: int | None = None) -> None:
        if timeout_s <= 0 or max_open < 1:
            raise ValueError(f"timeout_s must be > 0 and max_open ≥ 1, got {timeout_s}, {max_open}")
        self.timeout_s = float(timeout_s)
        self.max_open = int(max_open)
        self._open: OrderedDict[StackKey, _Open] = OrderedDict()
        self._closed: OrderedDict[StackKey, None] = OrderedDict()
        self._remember = int(remember_closed)
        self.max_stack_bytes = int(max_stack_bytes)
        self.max_open_bytes = int(max_open_bytes) if max_open_bytes is not None else 2 * self.max_stack_bytes
        self.open_bytes = 0
        self.stats = AssemblerStats()
        self.buffers = StackBuffers()

    @property
    def n_open(self) -> int:
        return len(self._open)

    def open_keys(self) -> list[StackKey]:
        return list(self._open)

    def _close(self, key: StackKey) -> None:
        self._closed[key] = None
        while len(self._closed) > self._remember:
            self._closed.popitem(last=False)

    def _emit(self, key: StackKey, st: _Open, reason: str = "") -> AssembledStack:
        self._close(key)
        self.open_bytes -= st.data.nbytes  # every stack leaves the open set through here
        complete = st.n_have == st.z_count
        missing = np.flatnonzero(~st.have) if not complete else np.zeros(0, np.int64)
        if missing.size and not st.zeroed:
            st.data[~st.have] = 0
        if complete:
            self.stats.complete += 1
        else:
            self.stats.incomplete += 1
            self.stats.incomplete_keys.append(key.label())
        return AssembledStack(
            key, st.data, complete, missing, reason, (st.first_record, st.last_record), st.last_seen
        )

    def add_frame(
        self, header: Frame, plane: np.ndarray, *, now: float, record: int = -1
    ) -> list[AssembledStack]:
        """Place one plane; returns the stacks this completes or evicts (usually zero or one).

        Raises
        ------
        InconsistentFrame, DuplicateFrame, LateFrame
            The frame is rejected (and counted); the open stack is unchanged.
        """
        key = StackKey(header.acquisition_id, header.timepoint, header.channel)
        label = f"{key.label()} z={header.z_index}"
        if key in self._closed:
            self.stats.late += 1
            raise LateFrame(f"{label}: arrived after its stack was already emitted")
        if header.z_index >= header.z_count:
            self.stats.inconsistent += 1
            raise InconsistentFrame(f"{label}: plane index ≥ the stack's {header.z_count} planes")
        out: list[AssembledStack] = []
        st = self._open.get(key)
        dtype = header.numpy_dtype()
        if st is None:
            nbytes = header.z_count * header.nbytes()
            if nbytes > self.max_stack_bytes:
                self.stats.inconsistent += 1
                raise StackTooLarge(
                    f"{label}: {header.z_count} planes of {header.shape[0]}×{header.shape[1]} {header.dtype} = "
                    f"{nbytes / 1e9:.1f} GB, more than the {self.max_stack_bytes / 1e9:.1f} GB allowed per stack"
                )
            # native byte order so downstream never sees a swapped array. Allocated before evicting: if this raises
            # MemoryError, no evicted stack is lost with the exception (its array is handed on either way, so the
            # order does not change the peak memory).
            data, zeroed = self.buffers.take((header.z_count, *header.shape), dtype.newbyteorder("="))
            while self._open and (len(self._open) >= self.max_open
                                  or self.open_bytes + data.nbytes > self.max_open_bytes):
                old_key, old = self._open.popitem(last=False)
                why = (f"more than {self.max_open} stacks open at once" if len(self._open) + 1 >= self.max_open
                       else f"open stacks would hold more than {_size(self.max_open_bytes)}")
                out.append(self._emit(old_key, old, f"evicted: {why}"))
            self.open_bytes += data.nbytes
            st = _Open(data, np.zeros(header.z_count, bool), 0, dtype, record, record, now, header.z_count,
                       tuple(header.shape), zeroed)
            self._open[key] = st
        elif (header.z_count, tuple(header.shape)) != (st.z_count, st.shape) or dtype != st.dtype:
            self.stats.inconsistent += 1
            raise InconsistentFrame(
                f"{label}: frame is {header.shape[0]}×{header.shape[1]} {header.dtype} of {header.z_count} planes, but "
                f"the stack's first frame was {st.shape[0]}×{st.shape[1]} {st.dtype.name} of {st.z_count} planes"
            )
        if st.have[header.z_index]:
            self.stats.duplicates += 1
            raise DuplicateFrame(f"{label}: this plane was already received")
        st.data[header.z_index] = plane
        st.have[header.z_index] = True
        st.n_have += 1
        st.last_seen = now
        st.last_record = max(st.last_record, record)
        self._open.move_to_end(key)
        if st.n_have == st.z_count:
            del self._open[key]
            out.append(self._emit(key, st))
        return out

    def add_stack(self, header: Stack, data: np.ndarray, *, now: float, record: int = -1) -> AssembledStack:
        """A whole stack in one message passes straight through (a late duplicate is rejected)."""
        key = StackKey(header.acquisition_id, header.timepoint, header.channel)
        if key in self._closed or key in self._open:
            self.stats.late += 1
            raise LateFrame(f"stack {key.label()}: this stack was already received")
        self._close(key)
        self.stats.complete += 1
        return AssembledStack(key, data, True, np.zeros(0, np.int64), "", (record, record), now)

    def expire(self, now: float) -> list[AssembledStack]:
        """Emit (flagged incomplete) every open stack that received nothing for ``timeout_s``."""
        out = []
        for key in [k for k, st in self._open.items() if now - st.last_seen >= self.timeout_s]:
            st = self._open.pop(key)
            out.append(self._emit(key, st, f"no plane for {self.timeout_s:g} s"))
        return out

    def end(self, acquisition_id: str, reason: str = "acquisition ended") -> list[AssembledStack]:
        """Emit every open stack of one acquisition (flagged incomplete: its missing planes will never come)."""
        keys = [k for k in self._open if k.acquisition_id == acquisition_id]
        return [self._emit(k, self._open.pop(k), reason) for k in keys]

    def flush(self, reason: str = "service stopped") -> list[AssembledStack]:
        """Emit every open stack, flagged incomplete."""
        return [self._emit(k, self._open.pop(k), reason) for k in list(self._open)]


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n} bytes"

