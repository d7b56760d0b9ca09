"""Frame → stack assembly: out-of-order planes, interleaved stacks, typed rejections, incomplete stacks kept."""

from __future__ import annotations

import numpy as np
import pytest

from streamer import wire
from streamer.assembly import DuplicateFrame, InconsistentFrame, LateFrame, StackAssembler, StackKey


def _frames(acq, t, stack, c=0):
    out = []
    for z in range(stack.shape[0]):
        h = wire.pixels_header(stack[z], acquisition_id=acq, seq=z, timepoint=t, channel=c, z_index=z,
                               z_count=stack.shape[0])
        out.append((h, stack[z]))
    return out


def test_interleaved_out_of_order_frames_assemble_exactly():
    rng = np.random.default_rng(0)
    stacks = {(t, c): rng.integers(0, 60000, (7, 5, 6), dtype=np.uint16) for t in range(3) for c in range(2)}
    msgs = [m for (t, c), s in stacks.items() for m in _frames("a", t, s, c)]
    order = rng.permutation(len(msgs))
    asm = StackAssembler(timeout_s=10)
    done = {}
    for k, i in enumerate(order):
        h, plane = msgs[i]
        for st in asm.add_frame(h, plane, now=float(k), record=k):
            done[(st.key.timepoint, st.key.channel)] = st
    assert set(done) == set(stacks)
    for key, st in done.items():
        assert st.complete and st.missing == ()
        np.testing.assert_array_equal(st.data, stacks[key])
    assert asm.n_open == 0 and asm.stats.complete == 6


def test_big_endian_frames_come_out_native():
    s = np.arange(2 * 3 * 4, dtype=">u2").reshape(2, 3, 4)
    asm = StackAssembler()
    out = []
    for h, p in _frames("a", 0, s):
        out += asm.add_frame(h, p, now=0.0)
    assert out[0].data.dtype == np.dtype("uint16") and out[0].data.dtype.isnative
    np.testing.assert_array_equal(out[0].data, s)


def test_rejections_are_typed_and_counted():
    s = np.ones((3, 4, 4), np.uint16)
    fr = _frames("a", 0, s)
    asm = StackAssembler()
    asm.add_frame(*fr[0], now=0.0)
    with pytest.raises(DuplicateFrame, match="a t=0 c=0 z=0: this plane was already received"):
        asm.add_frame(*fr[0], now=0.0)
    other = wire.pixels_header(np.ones((5, 4), np.uint16), acquisition_id="a", seq=9, timepoint=0, z_index=1,
                               z_count=3)
    with pytest.raises(InconsistentFrame, match="5×4 uint16 of 3 planes, but the stack's first frame was 4×4"):
        asm.add_frame(other, np.ones((5, 4), np.uint16), now=0.0)
    asm.add_frame(*fr[1], now=0.0)
    assert asm.add_frame(*fr[2], now=0.0)[0].complete
    with pytest.raises(LateFrame, match="already emitted"):
        asm.add_frame(*fr[2], now=0.0)
    assert (asm.stats.duplicates, asm.stats.inconsistent, asm.stats.late) == (1, 1, 1)


def test_incomplete_stack_flagged_after_timeout_and_kept():
    s = np.arange(5 * 2 * 2, dtype=np.uint16).reshape(5, 2, 2) + 1
    fr = _frames("a", 3, s)
    asm = StackAssembler(timeout_s=2.0)
    for z in (0, 1, 3):
        asm.add_frame(*fr[z], now=10.0 + z * 0.1, record=z)
    assert asm.expire(now=12.0) == []  # 1.7 s after the last plane: not yet
    (st,) = asm.expire(now=12.31)
    assert not st.complete and st.missing == (2, 4) and "no plane for 2 s" in st.reason
    np.testing.assert_array_equal(st.data[[0, 1, 3]], s[[0, 1, 3]])
    assert not st.data[[2, 4]].any()
    assert st.records == (0, 3)
    assert list(asm.stats.incomplete_keys) == ["a t=3 c=0"]
    with pytest.raises(LateFrame):  # a plane after the flag is reported, not silently merged
        asm.add_frame(*fr[2], now=13.0)


def test_end_and_eviction_flag_open_stacks():
    s = np.ones((4, 2, 2), np.uint8)
    asm = StackAssembler(max_open=2)
    asm.add_frame(*_frames("a", 0, s)[0], now=0.0)
    asm.add_frame(*_frames("a", 1, s)[0], now=0.0)
    out = asm.add_frame(*_frames("a", 2, s)[0], now=0.0)  # third open stack evicts the oldest
    assert [o.key for o in out] == [StackKey("a", 0, 0)] and "evicted" in out[0].reason
    ended = asm.end("a")
    assert sorted(o.key.timepoint for o in ended) == [1, 2] and not any(o.complete for o in ended)
    assert asm.n_open == 0


def test_no_memory_for_a_new_stack_loses_no_open_one():
    # The new stack's buffer is taken before the oldest open stack is evicted: a MemoryError then leaves the open
    # stacks as they were, instead of emitting one into an exception that nobody receives.
    s = np.ones((4, 2, 2), np.uint8)
    asm = StackAssembler(max_open=1)
    asm.add_frame(*_frames("a", 0, s)[0], now=0.0)

    def no_memory(shape, dtype):
        raise MemoryError

    asm.buffers.take = no_memory
    with pytest.raises(MemoryError):
        asm.add_frame(*_frames("a", 1, s)[0], now=0.0)
    assert asm.open_keys() == [StackKey("a", 0, 0)] and asm.stats.incomplete == 0


def test_whole_stack_message_passes_through_once():
    s = np.ones((2, 3, 3), np.float32)
    h = wire.pixels_header(s, acquisition_id="a", seq=0, timepoint=0)
    asm = StackAssembler()
    st = asm.add_stack(h, s, now=0.0)
    assert st.complete and st.data is s
    with pytest.raises(LateFrame):
        asm.add_stack(h, s, now=0.0)


def test_a_frame_announcing_a_huge_stack_is_rejected_not_allocated():
    from streamer.assembly import StackTooLarge

    plane = np.zeros((64, 64), np.uint16)
    h = wire.pixels_header(plane, acquisition_id="a", seq=0, timepoint=0, z_index=0, z_count=60000)
    asm = StackAssembler(max_stack_bytes=100 << 20)
    with pytest.raises(StackTooLarge, match="60000 planes of 64×64 uint16 = 0.5 GB, more than the 0.1 GB allowed"):
        asm.add_frame(h, plane, now=0.0)
    assert asm.n_open == 0


def test_stack_buffers_are_reused_only_once_nobody_holds_them():
    """Reusing emitted stacks' memory must never touch pixels someone still holds (a view, a queued stack)."""
    rng = np.random.default_rng(5)
    stacks = [rng.integers(1, 60000, (4, 8, 9), dtype=np.uint16) for _ in range(12)]
    asm = StackAssembler(timeout_s=10)
    kept_view = kept_stack = None
    for t, s in enumerate(stacks):
        for k, (h, plane) in enumerate(_frames("a", t, s)):
            for st in asm.add_frame(h, plane, now=float(t), record=k):
                np.testing.assert_array_equal(st.data, s)
                if t == 1:
                    kept_view = st.data[2:, ::2]  # a view only: it must keep the whole buffer out of reuse
                elif t == 2:
                    kept_stack = st
    assert asm.buffers.reused > 0  # the stacks nobody kept were recycled
    np.testing.assert_array_equal(kept_view, stacks[1][2:, ::2])
    np.testing.assert_array_equal(kept_stack.data, stacks[2])


def test_reused_buffer_leaves_no_stale_pixels_in_missing_planes():
    rng = np.random.default_rng(6)
    asm = StackAssembler(timeout_s=1)
    full = rng.integers(1, 60000, (5, 6, 7), dtype=np.uint16)
    for k, (h, plane) in enumerate(_frames("a", 0, full)):
        asm.add_frame(h, plane, now=0.0, record=k)  # emitted and dropped: its buffer goes back to the pool
    part = rng.integers(1, 60000, (5, 6, 7), dtype=np.uint16)
    for k, (h, plane) in enumerate(_frames("a", 1, part)):
        if k in (1, 3):
            asm.add_frame(h, plane, now=1.0, record=k)
    (st,) = asm.expire(now=5.0)
    assert asm.buffers.reused == 1 and not st.complete and st.missing == (0, 2, 4)
    np.testing.assert_array_equal(st.data[[1, 3]], part[[1, 3]])
    assert not st.data[[0, 2, 4]].any()  # zeros, not the previous stack's planes


def test_stack_buffer_pool_keeps_at_most_its_memory_budget():
    from streamer.assembly import StackBuffers

    pool = StackBuffers(keep=4, max_bytes=3000)
    in_use = [pool.take((10, 10, 10), np.dtype("<u2")) for _ in range(5)]  # 2000 bytes each: one fits the budget
    assert all(fresh for _, fresh in in_use) and pool.reused == 0  # all still referenced: nothing handed out twice
    assert sum(a.nbytes for a in pool._held) <= 3000
    big, fresh = pool.take((40, 40, 40), np.dtype("<u2"))  # over the budget: never kept
    assert fresh and all(a is not big for a in pool._held)
    last = id(in_use[-1][0])  # its id, not a reference: a reference would keep it from being reused
    del in_use
    arr, fresh = pool.take((10, 10, 10), np.dtype("<u2"))
    assert not fresh and pool.reused == 1 and id(arr) == last  # the one kept, now unreferenced, is handed out again


def test_open_stacks_are_bounded_in_bytes_too():
    from streamer.wire import pixels_header

    plane = np.ones((8, 8), np.uint16)  # a stack of 10 planes: 1280 bytes
    asm = StackAssembler(timeout_s=60, max_open=100, max_stack_bytes=2000, max_open_bytes=3000)
    out = []
    for t in range(5):  # five stacks declared, one plane each: only two fit in 3000 bytes
        h = pixels_header(plane, acquisition_id="b", seq=t, timepoint=t, z_index=0, z_count=10)
        out += asm.add_frame(h, plane, now=0.0)
    assert asm.n_open == 2 and asm.open_bytes == 2 * 1280
    assert [st.key.timepoint for st in out] == [0, 1, 2]
    assert all(not st.complete and "open stacks would hold more than 3000 bytes" in st.reason for st in out)
    asm.flush()
    assert asm.open_bytes == 0
