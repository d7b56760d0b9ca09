"""The wire schema every rllsm stream speaks.

A message is a ZMQ multipart ``[header, payload]``: the header is a small UTF-8 JSON document (one of the models
below, discriminated by ``kind``), the payload the raw pixel bytes of a frame or a whole stack, or absent for control
messages. Big arrays travel beside the header, never inside it, and are sent and received without copies.

``decode(..., strict=True)`` turns every malformed message into a :class:`WireError` subclass whose text says what was
wrong in the microscopist's terms ("stack t=12 c=0: header says 101×768×768 uint16 = 119.1 MB, payload has 52.0 MB").
"""

from __future__ import annotations

import json
import re
import time
import zlib
from collections.abc import Sequence
from enum import StrEnum
from typing import Annotated, Any, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from engines.config import OpticsConfig, describe_validation_error
from engines.errors import RllsmValueError

WIRE_VERSION = 1
# Documented limits (docs/streaming.md); a message outside them is refused with a typed error, never processed.
MAX_HEADER_BYTES = 256 << 10  # a header is metadata; anything larger is not one of ours
MAX_JSON_DEPTH = 32  # nesting of the header JSON, checked before it is parsed
MAX_METADATA_BYTES = 64 << 10  # free-form metadata of a start or frame, as compact JSON
MAX_DIM = 1 << 16  # planes per stack, pixels per frame side
MAX_TIMEPOINTS = 1_000_000  # timepoint index < this, n_timepoints ≤ this
MAX_SEQ = (1 << 53) - 1  # seq and n_messages: exact in every JSON implementation
MAX_CHANNELS = 16
MAX_CHANNEL_NAME = 64
MAX_SENT_AT = 1e11  # seconds since epoch (year 5138)
DTYPES = ("uint8", "uint16", "int16", "uint32", "float32")
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"


class MessageKind(StrEnum):
    acquisition_start = "acquisition_start"
    frame = "frame"
    stack = "stack"
    acquisition_end = "acquisition_end"


# --- errors -----------------------------------------------------------------------------------------------------


class WireError(RllsmValueError):
    """A message that does not follow the wire schema; the text says what was wrong."""


class MalformedHeader(WireError):
    """The header part is not a UTF-8 JSON object."""


class UnknownKind(WireError):
    """The header's ``kind`` is not one this version knows."""


class UnsupportedVersion(WireError):
    """The header was written by an incompatible version of the schema."""


class InvalidHeader(WireError):
    """A header field is missing, unknown, or out of its range."""


class PartCountError(WireError):
    """The multipart message has the wrong number of parts for its kind."""


class PayloadSizeMismatch(WireError):
    """The payload's byte count does not match the shape and dtype in the header."""


class ChecksumMismatch(WireError):
    """The payload's checksum differs from the header's: the bytes were damaged."""


# --- models -----------------------------------------------------------------------------------------------------

_STRICT = ConfigDict(extra="forbid", frozen=True)
ChannelName = Annotated[str, Field(min_length=1, max_length=MAX_CHANNEL_NAME, pattern=r"^[^\x00-\x1f\x7f]+$")]


def _check_metadata(value: dict[str, Any]) -> dict[str, Any]:
    size = len(json.dumps(value, separators=(",", ":")))
    if size > MAX_METADATA_BYTES:
        raise ValueError(f"metadata is {size / 1024:.0f} KiB of JSON, more than the {MAX_METADATA_BYTES // 1024} KiB "
                         "allowed (send big metadata as a file beside the data)")
    return value


class _Header(BaseModel):
    model_config = _STRICT

    version: Literal[1] = WIRE_VERSION
    acquisition_id: str = Field(pattern=ID_PATTERN, description="Identifies one acquisition across all its messages.")
    seq: int = Field(ge=0, le=MAX_SEQ, description="Sequence number of this message within the acquisition's stream.")
    sent_at: float = Field(default_factory=time.time, ge=0, le=MAX_SENT_AT, allow_inf_nan=False,
                           description="Sender's wall clock (s since epoch).")


class AcquisitionStart(_Header):
    """Opens an acquisition and carries the optics every later stack is reconstructed with."""

    kind: Literal["acquisition_start"] = "acquisition_start"
    optics: OpticsConfig = Field(default_factory=OpticsConfig)
    z_count: int = Field(ge=1, le=MAX_DIM, description="Planes per stack.")
    frame_shape: tuple[Annotated[int, Field(ge=1, le=MAX_DIM)], Annotated[int, Field(ge=1, le=MAX_DIM)]]
    dtype: Literal["uint8", "uint16", "int16", "uint32", "float32"] = "uint16"
    n_timepoints: int | None = Field(None, ge=1, le=MAX_TIMEPOINTS,
                                     description="Timepoints planned; None for open-ended.")
    channels: tuple[ChannelName, ...] = Field(("488",), min_length=1, max_length=MAX_CHANNELS)
    metadata: dict[str, Any] = Field(default_factory=dict, description=f"Free-form microscope metadata (JSON, at most "
                                     f"{MAX_METADATA_BYTES // 1024} KiB).")

    _metadata_size = field_validator("metadata")(classmethod(lambda cls, v: _check_metadata(v)))


class _Pixels(_Header):
    timepoint: int = Field(ge=0, lt=MAX_TIMEPOINTS)
    channel: int = Field(0, ge=0, lt=16)
    dtype: Literal["uint8", "uint16", "int16", "uint32", "float32"] = "uint16"
    byte_order: Literal["<", ">", "|"] = "<"
    checksum: str | None = Field(
        None, pattern=r"^crc32:[0-9a-f]{8}$", description="'crc32:<hex>' of the payload bytes, or null."
    )

    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def numpy_dtype(self) -> np.dtype:
        order = "|" if np.dtype(self.dtype).itemsize == 1 else self.byte_order
        return np.dtype(self.dtype).newbyteorder(order)


class Frame(_Pixels):
    """One camera plane of a stack; planes may arrive in any order."""

    kind: Literal["frame"] = "frame"
    z_index: int = Field(ge=0, lt=MAX_DIM)
    z_count: int = Field(ge=1, le=MAX_DIM)
    shape: tuple[Annotated[int, Field(ge=1, le=MAX_DIM)], Annotated[int, Field(ge=1, le=MAX_DIM)]]
    metadata: dict[str, Any] = Field(default_factory=dict)

    _metadata_size = field_validator("metadata")(classmethod(lambda cls, v: _check_metadata(v)))

    def label(self) -> str:
        return f"frame t={self.timepoint} c={self.channel} z={self.z_index}/{self.z_count}"


class Stack(_Pixels):
    """A whole (z, y, x) stack in one message."""

    kind: Literal["stack"] = "stack"
    shape: tuple[
        Annotated[int, Field(ge=1, le=MAX_DIM)],
        Annotated[int, Field(ge=1, le=MAX_DIM)],
        Annotated[int, Field(ge=1, le=MAX_DIM)],
    ]

    def label(self) -> str:
        return f"stack t={self.timepoint} c={self.channel}"


class AcquisitionEnd(_Header):
    """Closes an acquisition; ``n_messages`` lets the receiver tell whether it saw everything."""

    kind: Literal["acquisition_end"] = "acquisition_end"
    n_messages: int = Field(ge=0, le=MAX_SEQ, description="Messages the sender sent before this one, start included.")
    reason: Literal["complete", "aborted", "error"] = "complete"


Message = Annotated[Union[AcquisitionStart, Frame, Stack, AcquisitionEnd], Field(discriminator="kind")]
MESSAGE_ADAPTER: TypeAdapter[Message] = TypeAdapter(Message)
MODELS: dict[str, type[_Header]] = {
    "acquisition_start": AcquisitionStart,
    "frame": Frame,
    "stack": Stack,
    "acquisition_end": AcquisitionEnd,
}


# --- encode / decode --------------------------------------------------------------------------------------------


def checksum(payload: Any) -> str:
    """``crc32:<hex>`` of a buffer (zlib's CRC-32 runs at several GB/s and needs no extra package)."""
    return f"crc32:{zlib.crc32(memoryview(payload).cast('B')) & 0xFFFFFFFF:08x}"


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _dims(shape: Sequence[int]) -> str:
    return "×".join(str(s) for s in shape)


def encode(header: _Header, payload: np.ndarray | memoryview | bytes | None = None) -> list[Any]:
    """Return the multipart parts for ``socket.send_multipart(parts, copy=False)``.

    The payload is passed through as a buffer (no copy) when it is C-contiguous; the header must already carry the
    checksum if one is wanted (see :func:`pixels_header`).
    """
    head = header.model_dump_json().encode()
    if payload is None:
        return [head]
    if isinstance(payload, np.ndarray):
        payload = np.ascontiguousarray(payload)
        return [head, memoryview(payload).cast("B")]
    return [head, payload]


def pixels_header(
    array: np.ndarray, *, acquisition_id: str, seq: int, timepoint: int, channel: int = 0,
    z_index: int | None = None, z_count: int | None = None, with_checksum: bool = True,
    metadata: dict[str, Any] | None = None,
) -> Frame | Stack:
    """Build the header describing ``array`` (2D → :class:`Frame`, 3D → :class:`Stack`)."""
    if array.dtype.name not in DTYPES:
        raise InvalidHeader(f"pixel type {array.dtype.name} is not sendable; use one of {', '.join(DTYPES)}")
    order = "|" if array.dtype.itemsize == 1 else ("<" if array.dtype.byteorder in "=<" else ">")
    if order == "<" and array.dtype.byteorder == "=" and np.little_endian is False:  # pragma: no cover
        order = ">"
    common: dict[str, Any] = dict(
        acquisition_id=acquisition_id, seq=seq, timepoint=timepoint, channel=channel, dtype=array.dtype.name,
        byte_order=order, checksum=checksum(np.ascontiguousarray(array)) if with_checksum else None,
    )
    if array.ndim == 2:
        if z_index is None or z_count is None:
            raise InvalidHeader("a 2D frame needs z_index and z_count")
        return Frame(shape=array.shape, z_index=z_index, z_count=z_count, metadata=metadata or {}, **common)
    if array.ndim == 3:
        return Stack(shape=array.shape, **common)
    raise InvalidHeader(f"pixels must be a 2D frame or a 3D stack, got {array.ndim}D {_dims(array.shape)}")


def _buffer(part: Any) -> memoryview:
    # zmq.Frame exposes .buffer (a zero-copy memoryview); bytes and memoryviews pass through.
    buf = getattr(part, "buffer", part)
    return memoryview(buf).cast("B")


_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def json_depth(raw: bytes) -> int:
    """Deepest nesting of ``[``/``{`` in a JSON text, strings ignored (linear time, no recursion)."""
    bare = _STRINGS.sub(b"", raw)
    if b"[" not in bare and b"{" not in bare:
        return 0
    step = np.zeros(256, np.int8)
    step[ord("[")] = step[ord("{")] = 1
    step[ord("]")] = step[ord("}")] = -1
    return int(np.cumsum(step[np.frombuffer(bare, np.uint8)], dtype=np.int64).max(initial=0))


def _walk(doc: Any, path: str = "") -> None:
    """Refuse what JSON allows but this schema does not: lone surrogates, ``true`` for a version number."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            _walk(k, path)
            if k == "version" and isinstance(v, bool):
                raise InvalidHeader(f"{path + k}: version must be the number 1, not {json.dumps(v)}")
            _walk(v, f"{path}{_clip(k, 40)}.")
    elif isinstance(doc, list):
        for v in doc:
            _walk(v, path)
    elif isinstance(doc, str):
        try:
            doc.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidHeader(f"{path.rstrip('.') or 'header'}: text contains a lone UTF-16 surrogate "
                                f"({_clip(doc.encode('utf-8', 'backslashreplace').decode(), 40)}), which no file "
                                "format can store") from None


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}… [{len(text) - limit} more characters]"


def _reject_constant(name: str) -> Any:
    raise MalformedHeader(f"header is not valid JSON: {name} is not a JSON number")


def decode_header(part: Any, *, strict: bool = True) -> _Header:
    """Parse and validate the header part alone (cheap: the payload is not touched).

    Total: size and nesting depth are checked before parsing, types are checked exactly as the committed JSON Schema
    states (no ``"5"`` for 5, no ``true`` for 1), and every error text is bounded.
    """
    raw = _buffer(part)
    if len(raw) > MAX_HEADER_BYTES:
        raise MalformedHeader(f"header is {_megabytes(len(raw))}, larger than the {MAX_HEADER_BYTES // 1024} KiB limit")
    data = bytes(raw)
    depth = json_depth(data)
    if depth > MAX_JSON_DEPTH:
        raise MalformedHeader(f"header nests {depth} levels deep, more than the {MAX_JSON_DEPTH} allowed")
    integral = [False]

    def number(s: str) -> float | int:
        # JSON Schema counts 5.0 as an integer: so does this receiver (and 5.5 stays a float, refused for an int)
        f = float(s)
        if f.is_integer():
            integral[0] = True
            return int(f)
        return f

    try:
        text = data.decode("utf-8")
        doc = json.loads(text, parse_constant=_reject_constant, parse_float=number)
    except UnicodeDecodeError:
        raise MalformedHeader("header is not UTF-8 text (was the payload sent first?)") from None
    except json.JSONDecodeError as err:
        raise MalformedHeader(f"header is not valid JSON: {err.msg} at character {err.pos}") from None
    except RecursionError:  # pragma: no cover - the depth check comes first
        raise MalformedHeader("header nests too deeply") from None
    if not isinstance(doc, dict):
        raise MalformedHeader(f"header must be a JSON object, got {type(doc).__name__}")
    kind = doc.get("kind")
    if not isinstance(kind, str) or kind not in MODELS:
        raise UnknownKind(f"unknown message kind {_clip(repr(kind), 60)}; expected one of {', '.join(MODELS)}")
    version = doc.get("version", WIRE_VERSION)
    if isinstance(version, bool) or version != WIRE_VERSION:
        raise UnsupportedVersion(f"{kind} message has wire version {_clip(json.dumps(version), 60)}; this receiver "
                                 f"speaks {WIRE_VERSION}")
    _walk(doc)
    model = MODELS[kind]
    if not strict:
        known = set(model.model_fields)
        if set(doc) - known:
            doc = {k: v for k, v in doc.items() if k in known}
            integral[0] = True
    if integral[0]:
        text = json.dumps(doc)
    try:
        # JSON mode, strict: types as the JSON Schema states them (arrays are tuples, no string→number coercion)
        return model.model_validate_json(text, strict=True)
    except ValidationError as err:
        seq = doc.get("seq", "?")
        label = f"{kind} seq={seq if isinstance(seq, int) else '?'}"
        text = describe_validation_error(err, label)
        raise InvalidHeader(text if len(text) <= 600 else _describe(err, label)) from None


def _describe(err: ValidationError, label: str, limit: int = 5) -> str:
    """Field, short value and reason of each problem (values clipped: a 60 KB field must not make a 60 KB reply)."""
    out = []
    for e in err.errors()[:limit]:
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        value = e.get("input")
        shown = "" if isinstance(value, dict) and field != "<root>" and len(repr(value)) > 60 else \
            f" = {_clip(repr(value), 60)}"
        out.append(f"field '{_clip(field, 80)}'{shown}: {_clip(e['msg'], 200)}")
    more = len(err.errors()) - limit
    return f"{label}: " + "; ".join(out) + (f" (and {more} more)" if more > 0 else "")


def decode(parts: Sequence[Any], *, strict: bool = True) -> tuple[_Header, np.ndarray | None]:
    """Decode one multipart message into its header and a zero-copy array view of the payload.

    In strict mode unknown header fields are errors and the payload checksum, when present, is verified; in lax mode
    unknown fields are ignored (newer senders) and checksums are not computed. Size always must match.
    """
    if not parts:
        raise PartCountError("empty message")
    header = decode_header(parts[0], strict=strict)
    if not isinstance(header, (Frame, Stack)):
        if len(parts) != 1:
            raise PartCountError(f"{header.kind} carries no payload, but the message has {len(parts)} parts")
        return header, None
    label = header.label()
    if len(parts) != 2:
        raise PartCountError(f"{label}: expected [header, payload], got {len(parts)} part(s)")
    buf = _buffer(parts[1])
    expected = header.nbytes()
    if len(buf) != expected:
        raise PayloadSizeMismatch(
            f"{label}: header says {_dims(header.shape)} {header.dtype} = {_megabytes(expected)}, "
            f"payload has {_megabytes(len(buf))} ({len(buf)} bytes, expected {expected})"
        )
    if strict and header.checksum is not None:
        got = checksum(buf)
        if got != header.checksum:
            raise ChecksumMismatch(f"{label}: payload checksum {got} differs from header's {header.checksum}")
    array = np.frombuffer(buf, dtype=header.numpy_dtype()).reshape(header.shape)
    return header, array


def json_schemas() -> dict[str, dict[str, Any]]:
    """JSON Schema of every message kind, plus the union, as committed under ``streamer/wire_schema``."""
    out = {name: model.model_json_schema() for name, model in MODELS.items()}
    out["message"] = MESSAGE_ADAPTER.json_schema()
    return out


def write_json_schemas(directory: str) -> list[str]:
    """(Re)write the committed JSON Schema files; returns their paths."""
    from pathlib import Path

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, schema in json_schemas().items():
        path = root / f"{name}.v{WIRE_VERSION}.schema.json"
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        paths.append(str(path))
    return paths


if __name__ == "__main__":  # python -m streamer.wire: regenerate the committed schema files
    from pathlib import Path

    for p in write_json_schemas(str(Path(__file__).parent / "wire_schema")):
        print(p)
