"""Recording: round trip, and recovery of a torn tail as left by kill -9 (everything before it kept)."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from streamer.recording import (
    DATA_NAME, ENTRY_SIZE, INDEX_NAME, RecordingFormatError, RecordingReader, RecordingWriter,
)


def _messages(n: int, rng: np.random.Generator) -> list[list[bytes]]:
    out = []
    for i in range(n):
        head = f'{{"i": {i}}}'.encode()
        parts = [head] if i % 3 == 0 else [head, rng.integers(0, 255, int(rng.integers(0, 5000)), np.uint8).tobytes()]
        out.append(parts)
    return out


def test_round_trip_keeps_parts_and_arrival_times(tmp_path):
    rng = np.random.default_rng(0)
    msgs = _messages(50, rng)
    with RecordingWriter(tmp_path / "r") as w:
        for i, m in enumerate(msgs):
            assert w.append(m, received_at=1000.0 + i) == i
    with RecordingReader(tmp_path / "r") as r:
        assert len(r) == 50
        for i, m in enumerate(msgs):
            assert [bytes(p) for p in r.read(i)] == m
            assert r.header(i) == m[0]
            assert r.entry(i).received_at == 1000.0 + i


def test_reopen_appends_after_existing(tmp_path):
    with RecordingWriter(tmp_path / "r") as w:
        w.append([b"a", b"1"], 1.0)
    with RecordingWriter(tmp_path / "r") as w:
        assert w.recovered_bytes == 0
        assert w.append([b"b"], 2.0) == 1
    with RecordingReader(tmp_path / "r") as r:
        assert [[bytes(p) for p in r.read(i)] for i in range(len(r))] == [[b"a", b"1"], [b"b"]]


@pytest.mark.parametrize("damage", ["partial_entry", "record_cut", "data_without_entry", "corrupt_last"])
def test_torn_tail_is_cut_and_everything_before_kept(tmp_path, damage):
    rng = np.random.default_rng(1)
    msgs = _messages(20, rng)
    path = tmp_path / "r"
    with RecordingWriter(path) as w:
        for m in msgs:
            w.append(m, 0.0)
    data, index = path / DATA_NAME, path / INDEX_NAME
    keep = 20
    if damage == "partial_entry":  # killed while writing an index entry
        with open(index, "ab") as fh:
            fh.write(b"\x01" * (ENTRY_SIZE // 2))
    elif damage == "record_cut":  # entry written (page cache reordering) but the record is short
        size = data.stat().st_size
        os.truncate(data, size - 10)
        keep = 19
    elif damage == "data_without_entry":  # killed between the record and its entry
        with open(data, "ab") as fh:
            fh.write(b"RLR1" + b"\x00" * 100)
    else:  # last record's header bytes damaged
        raw = bytearray(index.read_bytes())
        off, = struct.unpack_from("<Q", raw, (19) * ENTRY_SIZE)
        with open(data, "r+b") as fh:
            fh.seek(off + 4 + 4 + 8 * len(msgs[19]))
            fh.write(b"\xff")
        keep = 19
    with RecordingReader(path) as r:  # a reader ignores the tail without repairing
        assert len(r) == keep
    with RecordingWriter(path) as w:
        assert w.recovered_bytes > 0
        assert len(w) == keep
        assert w.append([b"after"], 1.0) == keep
    with RecordingReader(path) as r:
        assert len(r) == keep + 1
        for i in range(keep):
            assert [bytes(p) for p in r.read(i)] == msgs[i]
        assert [bytes(p) for p in r.read(keep)] == [b"after"]
        assert r.torn_data_bytes == 0 and r.torn_entry_bytes == 0


def test_not_a_recording_is_a_clear_error(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(RecordingFormatError, match="is not a recording"):
        RecordingReader(tmp_path / "x")
    (tmp_path / "x" / "format.json").write_text('{"format": "rllsm-recording", "version": 99}')
    with pytest.raises(RecordingFormatError, match="v99"):
        RecordingReader(tmp_path / "x")


def test_portable_path_without_pread_and_writev(tmp_path, monkeypatch):
    """Windows has no pread/pwrite/preadv/writev: the fallbacks must write and read the same format."""
    for name in ("pread", "pwrite", "preadv", "writev"):
        monkeypatch.delattr(os, name, raising=False)
    msgs = _messages(12, np.random.default_rng(3))
    with RecordingWriter(tmp_path / "r") as w:
        for i, m in enumerate(msgs):
            w.append(m, float(i))
        assert [bytes(p) for p in w.read(4)] == msgs[4]
    with RecordingReader(tmp_path / "r") as r:
        assert [[bytes(p) for p in r.read(i)] for i in range(len(r))] == msgs


def test_message_with_too_many_parts_is_kept_merged_and_flagged(tmp_path):
    from streamer.recording import FLAG_PARTS_MERGED, MAX_PARTS

    parts = [b"h"] + [bytes([i % 251]) * 3 for i in range(MAX_PARTS + 10)]
    with RecordingWriter(tmp_path / "r") as w:
        w.append(parts, 0.0)
    with RecordingReader(tmp_path / "r") as r:
        got = [bytes(p) for p in r.read(0)]
        assert len(got) == MAX_PARTS and got[: MAX_PARTS - 1] == parts[: MAX_PARTS - 1]
        assert got[-1] == b"".join(parts[MAX_PARTS - 1 :])
        assert r.entry(0).flags == FLAG_PARTS_MERGED


def test_second_writer_on_the_same_recording_is_refused(tmp_path):
    from streamer.recording import RecordingError

    with RecordingWriter(tmp_path / "r") as w:
        w.append([b"x"], 0.0)
        with pytest.raises(RecordingError, match="in use by another running service"):
            RecordingWriter(tmp_path / "r")
    with RecordingWriter(tmp_path / "r") as w2:  # released on close (and by the OS when a process dies)
        assert len(w2) == 1


def test_append_many_matches_one_by_one_even_past_the_writev_buffer_limit(tmp_path):
    """One batch of 40 messages × 40 parts is > 1024 buffers (the writev limit): it must still land whole."""
    rng = np.random.default_rng(4)
    msgs = [[f'{{"i": {i}}}'.encode()] + [rng.bytes(int(rng.integers(0, 300))) for _ in range(39)]
            for i in range(40)]
    with RecordingWriter(tmp_path / "r") as w:
        assert w.append([b"first"], 0.5) == 0
        assert w.append_many(msgs, [1.0 + i for i in range(40)]) == 1
        assert w.append([b"last"], 99.0) == 41
    with RecordingReader(tmp_path / "r") as r:
        assert len(r) == 42
        assert [[bytes(p) for p in r.read(i + 1)] for i in range(40)] == msgs
        assert [r.entry(i + 1).received_at for i in range(40)] == [1.0 + i for i in range(40)]
        assert [bytes(p) for p in r.read(41)] == [b"last"]


_KILLED_WRITER = r"""
import os, signal, sys
from streamer.recording import RecordingWriter
w = RecordingWriter(sys.argv[1], reserve_bytes=8 << 20)
for i in range(int(sys.argv[2])):
    w.append([b"h%d" % i, bytes([i % 256]) * 100_000], float(i))
assert os.fstat(w._data_fd).st_size == w.nbytes  # space reserved ahead never shows in the size
os.kill(os.getpid(), signal.SIGKILL)  # no close: the reservation is left behind, as after kill -9
"""


def test_space_reserved_ahead_is_invisible_and_released_after_kill(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    path = tmp_path / "r"
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(path), "30"], cwd=repo, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(repo)}, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    size = (path / DATA_NAME).stat().st_size
    with RecordingWriter(path) as w:
        assert len(w) == 30 and w.recovered_bytes == 0 and w.nbytes == size
        w.append([b"more"], 30.0)
    st = (path / DATA_NAME).stat()
    if hasattr(st, "st_blocks"):  # reopening freed the blocks reserved past the end (8 MB), closing the new ones
        assert st.st_blocks * 512 < st.st_size + (1 << 20)
    with RecordingReader(path) as r:
        assert [bytes(r.read(i)[0]) for i in range(len(r))] == [b"h%d" % i for i in range(30)] + [b"more"]
        assert bytes(r.read(29)[1]) == bytes([29]) * 100_000
