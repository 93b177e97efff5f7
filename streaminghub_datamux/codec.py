"""Codecs for messages on the wire: CBOR (default) and JSON (debugging, low-code tools).

Both carry the same content. Frames put their arrays in RFC 8746 typed arrays: a
``timestamps`` vector is tag 86 (float64, little endian) around the raw bytes, and the
``values`` matrix is tag 40 (row-major multi-dimensional array) holding ``[n, c]`` and a
typed array. Any CBOR decoder can read them; numpy wraps the bytes without copying or
touching each element (:func:`decode_frame`). JSON frames carry the same arrays as
nested lists, with ``null`` for NaN and infinities.

Which codec a message uses is visible in its first byte (a JSON object starts with
``{``, a CBOR map never does), so the receiver never has to be told.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import cbor2
import numpy as np

from .errors import InvalidRequest
from .model import Frame

__all__ = [
    "CODECS",
    "Codec",
    "WireFrame",
    "codec_of",
    "decode",
    "decode_frame",
    "encode",
    "encode_frame",
    "get_codec",
]

CODECS = ("cbor", "json")

# RFC 8746 tag numbers: little-endian typed arrays by numpy dtype, and the
# row-major multi-dimensional array.
_TYPED_ARRAY_TAGS = {
    "uint8": 64,
    "uint16": 69,
    "uint32": 70,
    "uint64": 71,
    "int8": 72,
    "int16": 77,
    "int32": 78,
    "int64": 79,
    "float16": 84,
    "float32": 85,
    "float64": 86,
}
_DTYPE_OF_TAG = {tag: np.dtype(name).newbyteorder("<") for name, tag in _TYPED_ARRAY_TAGS.items()}
# Big-endian typed arrays are decoded too (a client on another platform may send them).
_DTYPE_OF_TAG.update(
    {
        65: np.dtype(">u2"),
        66: np.dtype(">u4"),
        67: np.dtype(">u8"),
        68: np.dtype("u1"),  # uint8, clamped arithmetic: the same bytes
        73: np.dtype(">i2"),
        74: np.dtype(">i4"),
        75: np.dtype(">i8"),
        80: np.dtype(">f2"),
        81: np.dtype(">f4"),
        82: np.dtype(">f8"),
    }
)
_MULTI_DIM_TAG = 40

Codec = str  # "cbor" or "json"


def get_codec(name: str) -> Codec:
    """Check a codec name."""
    if name not in CODECS:
        raise InvalidRequest(f"unknown codec {name!r}; use one of {list(CODECS)}")
    return name


def codec_of(payload: bytes) -> Codec:
    """The codec a payload was written in: JSON objects start with ``{`` (or blanks)."""
    head = payload[:1]
    return "json" if head in (b"{", b" ", b"\n", b"\r", b"\t") else "cbor"


def encode(message: Any, codec: Codec) -> bytes:
    """Encode a message of plain values (dicts, lists, str, numbers, bool, None)."""
    if codec == "json":
        return json.dumps(message, separators=(",", ":"), allow_nan=False).encode()
    return cbor2.dumps(message)


def decode(payload: bytes) -> Any:
    """Decode a message in whichever codec it was written.

    Raises:
        InvalidRequest: the payload is not valid CBOR or JSON.
    """
    try:
        if codec_of(payload) == "json":
            return json.loads(payload)
        return cbor2.loads(payload)
    except (ValueError, RecursionError, cbor2.CBORDecodeError, UnicodeDecodeError) as exc:
        text = f"malformed payload: {exc}"
        if payload[:1] == b"[":
            # A JSON array, read as CBOR by the first-byte rule (objects only are JSON).
            text += " (read as CBOR: a JSON message must be an object, starting with '{')"
        raise InvalidRequest(text) from None


# -- frames ----------------------------------------------------------------------------


def _little_endian(array: np.ndarray) -> np.ndarray:
    if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and not _NATIVE_LE):
        array = array.astype(array.dtype.newbyteorder("<"))
    return np.ascontiguousarray(array)


_NATIVE_LE = np.little_endian


def _typed_array_parts(array: np.ndarray) -> tuple[int, np.ndarray]:
    """RFC 8746 tag and the contiguous little-endian array whose bytes it carries."""
    name = "uint8" if array.dtype.kind == "b" else array.dtype.name
    tag = _TYPED_ARRAY_TAGS.get(name)
    if tag is None:
        raise ValueError(f"no CBOR typed array for dtype {array.dtype}")
    return tag, _little_endian(array.view(np.uint8) if array.dtype.kind == "b" else array)


def _head(major: int, argument: int) -> bytes:
    """A CBOR item head (major type and argument), shortest form, as cbor2 writes it."""
    if argument < 24:
        return bytes((major << 5 | argument,))
    if argument < 0x100:
        return bytes((major << 5 | 24, argument))
    if argument < 0x10000:
        return struct.pack(">BH", major << 5 | 25, argument)
    if argument < 0x100000000:
        return struct.pack(">BI", major << 5 | 26, argument)
    return struct.pack(">BQ", major << 5 | 27, argument)


_MAJOR_UINT, _MAJOR_BYTES, _MAJOR_ARRAY, _MAJOR_MAP, _MAJOR_TAG = 0, 2, 4, 5, 6
_KEY_T, _KEY_V = cbor2.dumps("t"), cbor2.dumps("v")
# "v": tag 40 around [shape, cells]; the shape [rows, columns] follows.
_V_HEAD = (
    _KEY_V + _head(_MAJOR_TAG, _MULTI_DIM_TAG) + _head(_MAJOR_ARRAY, 2) + _head(_MAJOR_ARRAY, 2)
)


def _typed_array_head(array: np.ndarray) -> tuple[bytes, np.ndarray]:
    tag, data = _typed_array_parts(array)
    return _head(_MAJOR_TAG, tag) + _head(_MAJOR_BYTES, data.nbytes), data


def encode_frame(frame: Frame, task_id: str, codec: Codec) -> bytes:
    """One frame as one message (see docs/protocol.md, "Frames").

    CBOR: the arrays' bytes are copied once, into the message. cbor2 encodes the small
    fields; the heads of the typed arrays are written here and the message is joined
    around the arrays' buffers (no ``tobytes()``, no second copy inside cbor2). The
    bytes are exactly what ``cbor2.dumps`` gives for the same message.
    """
    values = frame.values
    if values.ndim == 1:
        values = values.reshape(-1, 1)
    message: dict[str, Any] = {
        "task": task_id,
        "seq": frame.seq,
        "stream_id": frame.stream_id,
        "channels": list(frame.channels),
        "dtype": "str" if values.dtype.kind == "U" else values.dtype.name,
        "attrs": dict(frame.attrs),
    }
    if codec == "json":
        message["t"] = _json_list(frame.timestamps)
        message["v"] = _json_list(values)
        return json.dumps(message, separators=(",", ":"), allow_nan=False).encode()
    t_head, t_data = _typed_array_head(np.asarray(frame.timestamps, dtype=np.float64))
    fields = cbor2.dumps(message)
    # The map of the small fields, re-headed to hold two more entries: "t" and "v".
    parts: list[Any] = [_head(_MAJOR_MAP, len(message) + 2), fields[1:]]
    if fields[0] != 0xA0 | len(message):  # always a short map head (under 24 entries)
        raise AssertionError("unexpected CBOR map head")
    rows, columns = values.shape
    parts += [
        _KEY_T,
        t_head,
        t_data,
        _V_HEAD,
        _head(_MAJOR_UINT, rows),
        _head(_MAJOR_UINT, columns),
    ]
    if values.dtype.kind == "U":
        parts.append(cbor2.dumps(values.ravel().tolist()))  # strings: a plain CBOR array
    else:
        v_head, v_data = _typed_array_head(values)
        parts += [v_head, v_data]
    return b"".join(parts)


def _json_list(array: np.ndarray) -> list[Any]:
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        # JSON has no NaN or infinity: send null (the decoder turns it back into NaN).
        # numpy's stubs lack a None operand (an object array is what is wanted here).
        return np.where(np.isfinite(array), array, None).tolist()  # type: ignore[call-overload]
    return array.tolist()


class WireFrame:
    """A decoded frame message: the :class:`Frame` plus its task id."""

    __slots__ = ("frame", "task_id")

    def __init__(self, task_id: str, frame: Frame) -> None:
        self.task_id = task_id
        self.frame = frame


def decode_frame(payload: bytes) -> WireFrame:
    """Decode a frame message (either codec); arrays are read-only views on the payload.

    Raises:
        InvalidRequest: the message is not a well-formed frame.
    """
    message = decode(payload)
    try:
        dtype = _value_dtype(message["dtype"])
        channels = [str(c) for c in message["channels"]]
        timestamps = _vector(message["t"], np.dtype("<f8"))
        values = _matrix(message["v"], dtype, len(channels))
        if len(values) != len(timestamps):
            raise ValueError(f"{len(timestamps)} timestamps but {len(values)} rows of values")
        seq, attrs = message["seq"], message.get("attrs") or {}
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise ValueError(f"seq must be a non-negative integer, not {seq!r}")
        if not isinstance(attrs, dict):
            raise ValueError("attrs must be a map")
        frame = Frame(
            stream_id=str(message["stream_id"]),
            seq=seq,
            timestamps=timestamps,
            values=values,
            channels=channels,
            attrs=attrs,
        )
        return WireFrame(str(message["task"]), frame)
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise InvalidRequest(f"malformed frame: {exc!r}") from None


def _value_dtype(name: Any) -> np.dtype:
    if name == "str":
        return np.dtype(np.str_)
    dtype = np.dtype(str(name))
    if dtype.kind not in "biuf":
        raise ValueError(f"unsupported dtype {name!r}")
    return dtype


def _vector(item: Any, dtype: np.dtype) -> np.ndarray:
    if isinstance(item, cbor2.CBORTag):
        return _from_typed_array(item)
    return _from_json(item, dtype)


def _matrix(item: Any, dtype: np.dtype, columns: int) -> np.ndarray:
    if isinstance(item, cbor2.CBORTag):
        if item.tag != _MULTI_DIM_TAG:
            raise ValueError(f"values must be tag 40, not tag {item.tag}")
        shape, cells = item.value
        rows, cols = (int(x) for x in shape)
        if rows < 0 or cols != columns:
            raise ValueError(f"shape {shape} does not fit {columns} channels")
        if isinstance(cells, cbor2.CBORTag):
            flat = _from_typed_array(cells)
            if dtype.kind == "b":
                flat = flat.view(np.bool_)
            elif flat.dtype != dtype:
                flat = flat.astype(dtype)
        else:
            flat = (
                np.array([str(c) for c in cells], dtype=np.str_)
                if dtype.kind == "U"
                else (np.asarray(cells, dtype=dtype))
            )
        matrix = flat.reshape(rows, cols)
    elif columns == 0:
        matrix = np.empty((len(item), 0), dtype=dtype)
    else:
        matrix = _from_json(item, dtype).reshape(-1, columns)
    if matrix.shape[1] != columns:
        raise ValueError(f"{matrix.shape[1]} columns of values for {columns} channels")
    return matrix


def _from_typed_array(tag: cbor2.CBORTag) -> np.ndarray:
    dtype = _DTYPE_OF_TAG.get(tag.tag)
    if dtype is None or not isinstance(tag.value, bytes | bytearray):
        raise ValueError(f"tag {tag.tag} is not a supported typed array")
    array = np.frombuffer(tag.value, dtype=dtype)  # a view: no copy, no per-element work
    return array if dtype.isnative else array.astype(dtype.newbyteorder("="))


def _from_json(item: Any, dtype: np.dtype) -> np.ndarray:
    # null stands for NaN (JSON has none): numpy turns None into NaN for float dtypes.
    if dtype.kind == "U":
        return np.asarray(item, dtype=np.str_)
    return np.asarray(item, dtype=dtype)
