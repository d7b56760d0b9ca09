"""Wire schema: round trips over a real ZMQ socket, every malformed message gets its typed error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamer import wire
from streamer.wire import (
    AcquisitionEnd,
    AcquisitionStart,
    ChecksumMismatch,
    Frame,
    InvalidHeader,
    MalformedHeader,
    PartCountError,
    PayloadSizeMismatch,
    Stack,
    UnknownKind,
    UnsupportedVersion,
    WireError,
)

ACQ = "acq-001"


@pytest.fixture()
def pair():
    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    pull.RCVTIMEO = 5000
    yield push, pull
    push.close(0)
    pull.close(0)


def _frame(z: int = 3) -> tuple[Frame, np.ndarray]:
    img = np.arange(12 * 10, dtype=np.uint16).reshape(12, 10) + z
    return wire.pixels_header(img, acquisition_id=ACQ, seq=z + 1, timepoint=0, z_index=z, z_count=8), img


def test_round_trip_all_kinds_over_zmq(pair) -> None:
    push, pull = pair
    start = AcquisitionStart(acquisition_id=ACQ, seq=0, z_count=8, frame_shape=(12, 10))
    fh, img = _frame()
    stack = np.random.default_rng(0).integers(0, 4000, (4, 6, 5), dtype=np.uint16)
    sh = wire.pixels_header(stack, acquisition_id=ACQ, seq=5, timepoint=1, channel=1)
    end = AcquisitionEnd(acquisition_id=ACQ, seq=6, n_messages=6)
    for header, payload in [(start, None), (fh, img), (sh, stack), (end, None)]:
        push.send_multipart(wire.encode(header, payload), copy=False)
    got = [wire.decode(pull.recv_multipart(copy=False)) for _ in range(4)]
    assert got[0][0] == start and got[0][1] is None
    assert got[1][0] == fh and np.array_equal(got[1][1], img)
    assert isinstance(got[2][0], Stack) and np.array_equal(got[2][1], stack)
    assert got[3][0] == end


def test_received_payload_is_a_view_not_a_copy(pair) -> None:
    push, pull = pair
    header, img = _frame()
    push.send_multipart(wire.encode(header, img), copy=False)
    parts = pull.recv_multipart(copy=False)
    _, arr = wire.decode(parts)
    assert not arr.flags.owndata
    assert np.shares_memory(arr, np.frombuffer(parts[1].buffer, dtype=np.uint8))


def test_big_endian_payload_is_read_correctly() -> None:
    img = np.arange(20, dtype=">u2").reshape(4, 5)
    header = wire.pixels_header(img, acquisition_id=ACQ, seq=0, timepoint=0, z_index=0, z_count=1)
    assert header.byte_order == ">"
    _, arr = wire.decode(wire.encode(header, img))
    assert np.array_equal(arr.astype(np.uint16), np.arange(20).reshape(4, 5))


def test_size_mismatch_message_names_shape_dtype_and_sizes() -> None:
    header = Stack(acquisition_id=ACQ, seq=12, timepoint=12, shape=(101, 768, 768), dtype="uint16")
    with pytest.raises(PayloadSizeMismatch) as exc:
        wire.decode([header.model_dump_json().encode(), bytes(52_000_000)])
    msg = str(exc.value)
    assert "stack t=12" in msg and "101×768×768 uint16 = 119.1 MB" in msg and "52.0 MB" in msg


def test_checksum_detects_damage_in_strict_mode_only() -> None:
    header, img = _frame()
    damaged = bytearray(img.tobytes())
    damaged[7] ^= 0xFF
    with pytest.raises(ChecksumMismatch, match="frame t=0 c=0 z=3/8"):
        wire.decode([header.model_dump_json().encode(), bytes(damaged)])
    h, _ = wire.decode([header.model_dump_json().encode(), bytes(damaged)], strict=False)
    assert h == header


def _h(**kw) -> bytes:
    base = {"kind": "frame", "acquisition_id": ACQ, "seq": 1, "timepoint": 0, "z_index": 0, "z_count": 4,
            "shape": [2, 2], "dtype": "uint16"}
    base.update(kw)
    return json.dumps({k: v for k, v in base.items() if v is not ...}).encode()


PAYLOAD = bytes(8)


@pytest.mark.parametrize(
    ("parts", "error", "needle"),
    [
        ([], PartCountError, "empty"),
        ([b"\xff\xfe\x00"], MalformedHeader, "UTF-8"),
        ([b"{not json"], MalformedHeader, "not valid JSON"),
        ([b"[1, 2]"], MalformedHeader, "JSON object"),
        ([_h(kind="volume")], UnknownKind, "'volume'"),
        ([_h(kind=...)], UnknownKind, "None"),
        ([_h(version=2), PAYLOAD], UnsupportedVersion, "version 2"),
        ([_h(seq=-1), PAYLOAD], InvalidHeader, "seq"),
        ([_h(acquisition_id="../etc"), PAYLOAD], InvalidHeader, "acquisition_id"),
        ([_h(acquisition_id=""), PAYLOAD], InvalidHeader, "acquisition_id"),
        ([_h(timepoint=...), PAYLOAD], InvalidHeader, "timepoint"),
        ([_h(dtype="complex128"), PAYLOAD], InvalidHeader, "dtype"),
        ([_h(byte_order="?"), PAYLOAD], InvalidHeader, "byte_order"),
        ([_h(shape=[2, 2, 2]), PAYLOAD], InvalidHeader, "shape"),
        ([_h(shape=[0, 2]), PAYLOAD], InvalidHeader, "shape"),
        ([_h(shape=[2, 70000]), PAYLOAD], InvalidHeader, "shape"),
        ([_h(z_count=0), PAYLOAD], InvalidHeader, "z_count"),
        ([_h(channel=99), PAYLOAD], InvalidHeader, "channel"),
        ([_h(checksum="md5:abc"), PAYLOAD], InvalidHeader, "checksum"),
        ([_h(colour="red"), PAYLOAD], InvalidHeader, "unknown field 'colour'"),
        ([_h()], PartCountError, "expected [header, payload]"),
        ([_h(), PAYLOAD, PAYLOAD], PartCountError, "3 part"),
        ([_h(), bytes(7)], PayloadSizeMismatch, "2×2 uint16"),
        ([json.dumps({"kind": "acquisition_end", "acquisition_id": ACQ, "seq": 3, "n_messages": 3}).encode(),
          PAYLOAD], PartCountError, "carries no payload"),
        ([json.dumps({"kind": "acquisition_start", "acquisition_id": ACQ, "seq": 0, "z_count": 4,
                      "frame_shape": [4, 4], "optics": {"na_detection": 9}}).encode()], InvalidHeader,
         "optics.na_detection"),
        ([b" " * (wire.MAX_HEADER_BYTES + 1)], MalformedHeader, "larger than"),
    ],
)
def test_malformed_messages_raise_typed_errors(parts, error, needle) -> None:
    with pytest.raises(error) as exc:
        wire.decode(parts)
    assert needle in str(exc.value)


def test_lax_mode_ignores_unknown_fields() -> None:
    header, _ = wire.decode([_h(colour="red"), PAYLOAD], strict=False)
    assert isinstance(header, Frame)


def test_pixels_header_rejects_unsendable_arrays() -> None:
    with pytest.raises(InvalidHeader, match="complex128"):
        wire.pixels_header(np.zeros((2, 2), complex), acquisition_id=ACQ, seq=0, timepoint=0, z_index=0, z_count=1)
    with pytest.raises(InvalidHeader, match="4D"):
        wire.pixels_header(np.zeros((1, 2, 2, 2), np.uint16), acquisition_id=ACQ, seq=0, timepoint=0)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=300), min_size=0, max_size=4))
def test_fuzzed_bytes_never_crash_the_decoder(parts) -> None:
    try:
        header, array = wire.decode(parts)
    except WireError:
        return
    # whatever got through is consistent: a payload only with a pixel message, and exactly the bytes it announced
    assert (array is None) == (len(parts) == 1)
    assert array is None or array.nbytes == header.nbytes() == len(parts[1])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["kind", "acquisition_id", "seq", "timepoint", "z_index", "z_count", "shape",
                                        "dtype", "byte_order", "checksum", "version", "channel", "extra"]),
                       st.one_of(st.none(), st.integers(-5, 70000), st.text(max_size=8),
                                 st.lists(st.integers(-2, 9), max_size=4),
                                 st.sampled_from(["frame", "stack", "uint16", "<"]))),
       st.binary(max_size=64))
def test_fuzzed_headers_are_rejected_with_wire_errors_only(doc, payload) -> None:
    try:
        header, array = wire.decode([json.dumps(doc).encode(), payload])
    except WireError:
        return
    assert array is not None and array.nbytes == header.nbytes() == len(payload)


def test_committed_json_schema_matches_models() -> None:
    root = Path(wire.__file__).parent / "wire_schema"
    for name, schema in wire.json_schemas().items():
        path = root / f"{name}.v{wire.WIRE_VERSION}.schema.json"
        assert path.is_file(), f"{path} missing: run python -m streamer.wire"
        assert json.loads(path.read_text()) == json.loads(json.dumps(schema)), f"{path} drifted: run python -m streamer.wire"


def test_headers_validate_against_committed_schema() -> None:
    import jsonschema

    root = Path(wire.__file__).parent / "wire_schema"
    schema = json.loads((root / f"message.v{wire.WIRE_VERSION}.schema.json").read_text())
    header, _ = _frame()
    jsonschema.validate(json.loads(header.model_dump_json()), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"kind": "frame", "seq": 1}, schema)
