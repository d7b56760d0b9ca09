"""Our TensorRT engine container: a checked header in front of the serialised plan.

TensorRT deserialises a plan built for another TensorRT version, another GPU or simply a truncated file by
failing deep in native code (at best ``None`` and a log line, at worst a crash).  So the plan never reaches
TensorRT unchecked: the file starts with a magic string, a JSON header (the cache key fields, the manifest, the
payload size and SHA-256), then the plan.  Everything here is plain Python, testable without TensorRT or a GPU.

Layout::

    b"RLLSM-TRT\\0"   10 bytes magic
    u16 little-endian container version (1)
    u32 little-endian header length in bytes
    header            UTF-8 JSON
    payload           the serialised engine (``IHostMemory`` bytes)
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from engines.backends.errors import EngineFileError, EngineMismatchError
from engines.backends.manifest import EngineInfo, Precision, ShapeRange

MAGIC = b"RLLSM-TRT\0"
CONTAINER_VERSION = 1
_PREFIX = struct.Struct("<HI")
_MAX_HEADER = 16 * 1024 * 1024


def engine_cache_key(onnx_sha256: str, tensorrt_version: str, compute_capability: str, precision: Precision | str,
                     profile: Mapping[str, ShapeRange]) -> str:
    """SHA-256 naming one engine build: same key ⇔ the engine can be reused as is.

    Parameters
    ----------
    onnx_sha256
        Hash of the ONNX file the engine is built from.
    tensorrt_version
        Full TensorRT version string (plans are not portable across versions).
    compute_capability
        ``"major.minor"`` of the GPU (plans are not portable across architectures).
    precision
        ``fp32``/``fp16``/``bf16``.
    profile
        Input name → min/opt/max shapes of the optimisation profile.
    """
    doc = {
        "onnx_sha256": onnx_sha256,
        "tensorrt": tensorrt_version,
        "compute_capability": compute_capability,
        "precision": Precision(precision).value,
        "profile": {k: profile[k].model_dump() for k in sorted(profile)},
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_engine_file(path: Path, plan: bytes, engine: EngineInfo, manifest: Mapping[str, Any] | None = None) -> Path:
    """Write *plan* behind a header holding *engine* (the cache key fields) and the *manifest*.

    The file is written to a temporary name and renamed, so a crash mid-write never leaves a half engine
    under the real name.
    """
    path = Path(path)
    plan = bytes(plan)
    header = json.dumps({
        "payload_size": len(plan),
        "payload_sha256": hashlib.sha256(plan).hexdigest(),
        "engine": engine.model_dump(mode="json"),
        "manifest": dict(manifest) if manifest is not None else None,
    }).encode("utf-8")
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as fh:
        fh.write(MAGIC)
        fh.write(_PREFIX.pack(CONTAINER_VERSION, len(header)))
        fh.write(header)
        fh.write(plan)
    tmp.replace(path)
    return path


def read_engine_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse and check the header of an engine file; return ``(header, payload_offset)``.

    Raises
    ------
    EngineFileError
        Missing, not one of our engine files, unknown container version, or a damaged header.
    """
    path = Path(path)
    how = "delete it and rebuild with `rllsm export --format engine` (or run with --rebuild-engine)"
    if not path.is_file():
        raise EngineFileError(f"TensorRT engine not found: {path}")
    with open(path, "rb") as fh:
        head = fh.read(len(MAGIC) + _PREFIX.size)
        if len(head) < len(MAGIC) + _PREFIX.size or not head.startswith(MAGIC):
            raise EngineFileError(f"{path} is not an rllsm TensorRT engine (bad magic bytes; a bare trtexec plan "
                                  f"or a damaged file?); {how}")
        version, header_len = _PREFIX.unpack(head[len(MAGIC):])
        if version != CONTAINER_VERSION:
            raise EngineFileError(f"{path}: engine container version {version}, this build reads "
                                  f"{CONTAINER_VERSION}; {how}")
        if header_len > _MAX_HEADER:
            raise EngineFileError(f"{path}: header length {header_len} bytes is implausible (damaged file); {how}")
        raw = fh.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
        EngineInfo.model_validate(header["engine"])
        int(header["payload_size"]), str(header["payload_sha256"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, ValidationError) as err:
        raise EngineFileError(f"{path}: damaged engine header ({type(err).__name__}); {how}") from None
    return header, len(MAGIC) + _PREFIX.size + header_len


def read_engine_file(path: Path, expected_key: str | None = None) -> tuple[EngineInfo, dict[str, Any] | None, bytes]:
    """Read an engine file, verify size, hash and (optionally) cache key, and return ``(info, manifest, plan)``.

    Parameters
    ----------
    path
        The engine file.
    expected_key
        Cache key computed for *this* machine (:func:`engine_cache_key`); a different key raises
        :class:`EngineMismatchError` naming which field differs.

    Raises
    ------
    EngineFileError
        The file is damaged (truncated, altered) — checked before TensorRT sees a byte of the plan.
    EngineMismatchError
        The engine is intact but was built for another TensorRT, GPU, precision, profile or ONNX model.
    """
    header, offset = read_engine_header(path)
    info = EngineInfo.model_validate(header["engine"])
    with open(path, "rb") as fh:
        fh.seek(offset)
        plan = fh.read()
    how = "rebuild it with `rllsm export --format engine` (or run with --rebuild-engine)"
    if len(plan) != header["payload_size"]:
        raise EngineFileError(f"{path}: engine is truncated or padded ({len(plan)} bytes of plan, header says "
                              f"{header['payload_size']}); {how}")
    if hashlib.sha256(plan).hexdigest() != header["payload_sha256"]:
        raise EngineFileError(f"{path}: engine contents do not match their SHA-256 (file damaged); {how}")
    if expected_key is not None and info.cache_key != expected_key:
        raise EngineMismatchError(f"{path} was built for TensorRT {info.tensorrt_version}, GPU compute capability "
                                  f"{info.compute_capability}, {info.precision.value}, ONNX {info.onnx_sha256[:12]}…, "
                                  f"which does not match this machine/request (cache key {info.cache_key[:12]}… ≠ "
                                  f"{expected_key[:12]}…); {how}")
    return info, header.get("manifest"), plan


def read_engine_for(path: Path, tensorrt_version: str, compute_capability: str,
                    onnx_sha256: str | None = None) -> tuple[EngineInfo, dict[str, Any] | None, bytes]:
    """Read an engine file and check it was built here, from the expected ONNX model.

    The expected cache key takes precision and profile from the engine's own header (either is a valid build
    choice), but TensorRT version and GPU from this machine and, when given, *onnx_sha256* from the manifest
    beside the engine: an engine left over from an earlier export of other weights would otherwise deserialise
    fine and silently run the old network.

    Parameters
    ----------
    path
        The engine file.
    tensorrt_version, compute_capability
        Of this machine (``tensorrt.__version__``, ``"major.minor"``).
    onnx_sha256
        Hash of the ONNX model the engine must have been built from; None trusts the header.

    Raises
    ------
    EngineFileError, EngineMismatchError
        As :func:`read_engine_file`.
    """
    header, _ = read_engine_header(path)
    info = EngineInfo.model_validate(header["engine"])
    key = engine_cache_key(onnx_sha256 or info.onnx_sha256, tensorrt_version, compute_capability, info.precision,
                           info.profile)
    return read_engine_file(path, key)
