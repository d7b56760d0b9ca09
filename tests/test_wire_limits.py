"""Total decoding: every header outside the documented limits gets a typed, bounded error; the receiver accepts
exactly what the committed JSON Schema accepts."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamer import wire

ROOT = Path(wire.__file__).parent / "wire_schema"
START = {"kind": "acquisition_start", "acquisition_id": "a1", "seq": 0, "z_count": 3, "frame_shape": [4, 4]}
STACK = {"kind": "stack", "acquisition_id": "a1", "seq": 1, "timepoint": 0, "shape": [2, 3, 4]}
END = {"kind": "acquisition_end", "acquisition_id": "a1", "seq": 2, "n_messages": 2}


def _err(raw: bytes) -> wire.WireError:
    with pytest.raises(wire.WireError) as info:
        wire.decode_header(raw)
    return info.value


@pytest.mark.parametrize("depth", [33, 1000, 100_000])
def test_deep_nesting_is_refused_before_parsing(depth):
    for opener, closer in ((b"[", b"]"), (b'{"a":', b"}")):
        raw = b'{"kind":"acquisition_end","metadata":' + opener * depth + b"1" + closer * depth + b"}"
        if len(raw) > wire.MAX_HEADER_BYTES:
            raw = raw[: wire.MAX_HEADER_BYTES]  # still deep, and unterminated: refused by depth all the same
        err = _err(raw)
        assert isinstance(err, wire.MalformedHeader) and "levels deep" in str(err)


def test_brackets_inside_strings_do_not_count_as_nesting():
    doc = {**START, "metadata": {"note": "[[[[{{{{" * 50, "esc": 'a\\"[[[['}}
    assert isinstance(wire.decode_header(json.dumps(doc).encode()), wire.AcquisitionStart)
    assert wire.json_depth(b'{"a":"\\"[[[","b":[[1]]}') == 3


@pytest.mark.parametrize("doc, field", [
    ({**END, "version": True}, "version"),
    ({**START, "optics": {"version": True}}, "version"),
    ({**STACK, "timepoint": "5"}, "timepoint"),
    ({**STACK, "timepoint": True}, "timepoint"),
    ({**STACK, "timepoint": 5.5}, "timepoint"),
    ({**START, "z_count": "3"}, "z_count"),
    ({**START, "frame_shape": ["4", 4]}, "frame_shape"),
    ({**END, "n_messages": False}, "n_messages"),
])
def test_no_coercion_of_bools_or_strings_into_numbers(doc, field):
    raw = json.dumps(doc).encode()
    err = _err(raw)
    assert field in str(err) or "version" in str(err)
    schema = json.loads((ROOT / f"message.v{wire.WIRE_VERSION}.schema.json").read_text())
    assert not jsonschema.Draft202012Validator(schema).is_valid(doc), "the committed schema refuses it too"


@pytest.mark.parametrize("doc, needle", [
    ({**START, "n_timepoints": 2**63}, "n_timepoints"),
    ({**START, "n_timepoints": 10**30}, "n_timepoints"),
    ({**STACK, "timepoint": 2**62}, "timepoint"),
    ({**STACK, "timepoint": wire.MAX_TIMEPOINTS}, "timepoint"),
    ({**STACK, "seq": 2**64}, "seq"),
    ({**END, "n_messages": 10**40}, "n_messages"),
    ({**STACK, "sent_at": 1e300}, "sent_at"),
    ({**START, "channels": ["c"] * (wire.MAX_CHANNELS + 1)}, "channels"),
    ({**START, "channels": ["x" * (wire.MAX_CHANNEL_NAME + 1)]}, "channels"),
    ({**START, "channels": ["a\nb"]}, "channels"),
    ({**START, "channels": [""]}, "channels"),
    ({**START, "z_count": wire.MAX_DIM + 1}, "z_count"),
    ({**START, "metadata": {"blob": "x" * (wire.MAX_METADATA_BYTES + 10)}}, "metadata"),
])
def test_every_field_is_bounded(doc, needle):
    err = _err(json.dumps(doc).encode())
    assert isinstance(err, wire.InvalidHeader) and needle in str(err) and len(str(err)) <= 1000


@pytest.mark.parametrize("text", ["\ud800", "ok\udfff", "\udc00\ud800"])
def test_lone_surrogates_are_refused_wherever_they_are(text):
    for doc in ({**START, "channels": [text]}, {**START, "metadata": {text: 1}}, {**START, "metadata": {"k": [text]}}):
        err = _err(json.dumps(doc).encode())  # json.dumps writes them as \\ud800 escapes, as a sender would
        assert isinstance(err, wire.InvalidHeader) and "surrogate" in str(err)
    ok = {**START, "channels": ["\U0001F600 488"]}  # a proper surrogate *pair* is a valid character
    assert wire.decode_header(json.dumps(ok).encode()).channels == ("\U0001F600 488",)


def test_integral_numbers_are_integers_as_in_json_schema():
    assert wire.decode_header(json.dumps({**STACK, "timepoint": 5.0}).encode()).timepoint == 5


def test_json_constants_nan_and_infinity_are_not_json():
    for const in (b"NaN", b"Infinity", b"-Infinity"):
        raw = b'{"kind":"acquisition_end","acquisition_id":"a","seq":0,"n_messages":1,"sent_at":' + const + b"}"
        assert isinstance(_err(raw), wire.MalformedHeader)


@pytest.mark.parametrize("size", [wire.MAX_HEADER_BYTES + 1, 900_000])
def test_error_texts_stay_short_whatever_the_value(size):
    huge_id = "x" * size
    for doc in ({**START, "acquisition_id": huge_id}, {**START, "kind": huge_id}, {**STACK, "dtype": huge_id[:200_000]}):
        err = _err(json.dumps(doc).encode())
        assert len(str(err)) < 1000, type(err).__name__


_VALUES = st.one_of(
    st.booleans(), st.none(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=5), st.lists(st.integers(0, 5), max_size=4),
)


@settings(max_examples=400, database=None, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(base=st.sampled_from([START, STACK, END]), field=st.sampled_from(
    ["version", "seq", "timepoint", "channel", "z_count", "frame_shape", "shape", "n_timepoints", "n_messages",
     "sent_at", "dtype", "byte_order", "reason", "acquisition_id"]), value=_VALUES)
def test_receiver_accepts_exactly_what_the_committed_schema_accepts(base, field, value):
    schema = json.loads((ROOT / f"message.v{wire.WIRE_VERSION}.schema.json").read_text())
    doc = {**base, field: value}
    by_schema = jsonschema.Draft202012Validator(schema).is_valid(doc)
    try:
        wire.decode_header(json.dumps(doc).encode())
        by_receiver = True
    except wire.WireError:
        by_receiver = False
    assert by_receiver == by_schema, doc
