"""The TensorRT engine container and cache key: damage and mismatch are caught before TensorRT sees a byte."""

from __future__ import annotations

import json

import pytest

from engines.backends.engine_file import (
    MAGIC,
    engine_cache_key,
    read_engine_file,
    read_engine_for,
    read_engine_header,
    write_engine_file,
)
from engines.backends.errors import EngineFileError, EngineMismatchError
from engines.backends.manifest import EngineInfo, Precision, ShapeRange

ONNX_SHA = "ab" * 32
PROFILE = {"planes": ShapeRange(min=[1, 7, 16, 16], opt=[1, 7, 256, 256], max=[2, 7, 768, 768])}
KEY_ARGS = dict(onnx_sha256=ONNX_SHA, tensorrt_version="10.13.0", compute_capability="9.0",
                precision=Precision.FP16, profile=PROFILE)


def _info(**over) -> EngineInfo:
    args = {**KEY_ARGS, **over}
    return EngineInfo(cache_key=engine_cache_key(**args), onnx_sha256=args["onnx_sha256"],
                      tensorrt_version=args["tensorrt_version"], compute_capability=args["compute_capability"],
                      precision=args["precision"], profile=args["profile"], strongly_typed=True)


@pytest.fixture
def engine(tmp_path):
    plan = bytes(range(256)) * 40  # stands in for a serialised plan: the container never interprets it
    path = write_engine_file(tmp_path / "m.engine", plan, _info(), {"model_kind": "vsi-sr"})
    return path, plan


def test_round_trip_returns_plan_info_and_manifest(engine):
    path, plan = engine
    info, manifest, got = read_engine_file(path, engine_cache_key(**KEY_ARGS))
    assert got == plan and info == _info() and manifest == {"model_kind": "vsi-sr"}
    assert path.read_bytes().startswith(MAGIC)
    assert not list(path.parent.glob("*.part")), "no temporary file left behind"


@pytest.mark.parametrize("field, value", [
    ("onnx_sha256", "cd" * 32), ("tensorrt_version", "11.0.0"), ("compute_capability", "8.6"),
    ("precision", Precision.FP32),
    ("profile", {"planes": ShapeRange(min=[1, 7, 16, 16], opt=[1, 7, 256, 256], max=[4, 7, 768, 768])}),
])
def test_cache_key_changes_with_every_field(field, value):
    assert engine_cache_key(**{**KEY_ARGS, field: value}) != engine_cache_key(**KEY_ARGS)
    assert engine_cache_key(**KEY_ARGS) == engine_cache_key(**dict(KEY_ARGS))  # deterministic


def test_mismatching_key_names_what_the_engine_was_built_for(engine):
    path, _ = engine
    other = engine_cache_key(**{**KEY_ARGS, "compute_capability": "8.9"})
    with pytest.raises(EngineMismatchError) as err:
        read_engine_file(path, other)
    assert "TensorRT 10.13.0" in str(err.value) and "compute capability 9.0" in str(err.value)
    assert "rllsm export --format engine" in str(err.value)


@pytest.mark.parametrize("damage, words", [
    (lambda b: b[:-100], "truncated"),
    (lambda b: b + b"\0", "truncated or padded"),
    (lambda b: b[:-1] + bytes([b[-1] ^ 0xFF]), "SHA-256"),
    (lambda b: b"PLANFILE" + b[8:], "bad magic"),
    (lambda b: b[:5], "bad magic"),
    (lambda b: b"", "bad magic"),
    (lambda b: b[: len(MAGIC)] + (2).to_bytes(2, "little") + b[len(MAGIC) + 2:], "container version 2"),
])
def test_damaged_files_are_rejected_with_how_to_fix(engine, damage, words):
    path, _ = engine
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(EngineFileError) as err:
        read_engine_file(path)
    assert words in str(err.value) and "rebuild" in str(err.value)


def test_damaged_header_json(engine):
    path, _ = engine
    raw = path.read_bytes()
    start = len(MAGIC) + 6
    header_len = int.from_bytes(raw[len(MAGIC) + 2:start], "little")
    header = json.loads(raw[start:start + header_len])
    header["engine"]["compute_capability"] = "nine"
    body = json.dumps(header).encode()
    path.write_bytes(raw[:len(MAGIC) + 2] + len(body).to_bytes(4, "little") + body + raw[start + header_len:])
    with pytest.raises(EngineFileError, match="damaged engine header"):
        read_engine_header(path)


def test_engine_from_another_onnx_or_machine_is_refused(engine):
    path, plan = engine
    here = (KEY_ARGS["tensorrt_version"], KEY_ARGS["compute_capability"])
    assert read_engine_for(path, *here)[2] == plan
    assert read_engine_for(path, *here, ONNX_SHA)[2] == plan
    # left over from an export of other weights: intact, but built from another ONNX model
    with pytest.raises(EngineMismatchError, match="ONNX abababababab"):
        read_engine_for(path, *here, "cd" * 32)
    with pytest.raises(EngineMismatchError, match="TensorRT 10.13.0"):
        read_engine_for(path, "10.14.0", "9.0")
    with pytest.raises(EngineMismatchError, match="compute capability 9.0"):
        read_engine_for(path, "10.13.0", "8.9")


def test_missing_engine(tmp_path):
    with pytest.raises(EngineFileError, match="not found"):
        read_engine_file(tmp_path / "none.engine")
