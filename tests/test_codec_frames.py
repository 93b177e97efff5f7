"""encode_frame writes CBOR heads around the arrays' buffers: the bytes cbor2 would write."""

from __future__ import annotations

import cbor2
import numpy as np
import pytest

from streaminghub_datamux.codec import decode_frame, encode_frame
from streaminghub_datamux.model import Frame


def reference_encoding(frame: Frame, task_id: str) -> bytes:
    """The message built as plain cbor2 items, arrays copied with tobytes()."""
    values = frame.values.reshape(-1, 1) if frame.values.ndim == 1 else frame.values
    tags = {"float64": 86, "float32": 85, "int16": 77, "int64": 79, "uint8": 64, "bool": 64}
    message = {
        "task": task_id,
        "seq": frame.seq,
        "stream_id": frame.stream_id,
        "channels": list(frame.channels),
        "dtype": "str" if values.dtype.kind == "U" else values.dtype.name,
        "attrs": dict(frame.attrs),
        "t": cbor2.CBORTag(86, np.asarray(frame.timestamps, "<f8").tobytes()),
    }
    if values.dtype.kind == "U":
        cells = values.ravel().tolist()
    else:
        raw = values.view(np.uint8) if values.dtype.kind == "b" else values
        cells = cbor2.CBORTag(tags[values.dtype.name], np.ascontiguousarray(raw).tobytes())
    message["v"] = cbor2.CBORTag(40, [list(values.shape), cells])
    return cbor2.dumps(message)


@pytest.mark.parametrize(
    ("dtype", "rows", "channels"),
    [
        ("float32", 0, 8),
        ("float32", 1, 1),
        ("float32", 5, 8),
        ("float64", 300, 64),  # lengths needing 2- and 4-byte heads
        ("float32", 70_000, 8),
        ("int16", 23, 3),
        ("int64", 24, 2),
        ("bool", 7, 2),
        ("str", 3, 1),
    ],
)
def test_frame_bytes_equal_plain_cbor2(dtype, rows, channels):
    rng = np.random.default_rng(rows)
    if dtype == "str":
        values = np.array([[f"m{i}"] for i in range(rows)], dtype=np.str_)
    else:
        values = (rng.standard_normal((rows, channels)) * 100).astype(dtype)
    frame = Frame(
        stream_id="eeg",
        seq=rows * 1000,
        timestamps=np.arange(rows) / 250.0,
        values=values,
        channels=[f"c{i}" for i in range(values.shape[1])],
        attrs={"k": 1},
    )
    payload = encode_frame(frame, "task-1", "cbor")
    assert payload == reference_encoding(frame, "task-1")
    back = decode_frame(payload).frame
    np.testing.assert_array_equal(back.values, values)
    np.testing.assert_array_equal(back.timestamps, frame.timestamps)


def test_non_contiguous_and_big_endian_arrays_are_encoded_as_little_endian_rows():
    base = np.arange(40, dtype=">f4").reshape(10, 4)
    frame = Frame("s", 0, np.arange(10.0)[::1], base[:, ::2], ["a", "b"], {})
    back = decode_frame(encode_frame(frame, "t", "cbor")).frame
    np.testing.assert_array_equal(back.values, base[:, ::2])


@pytest.mark.parametrize("payload", [b"[1, 2]", b'[{"id": 1, "method": "list_collections"}]'])
def test_json_text_that_is_not_an_object_is_told_so(payload):
    """The first byte picks the codec: a JSON array reads as CBOR, and the error must
    say what the sender meant to write."""
    from streaminghub_datamux.codec import decode
    from streaminghub_datamux.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="a JSON message must be an object, starting with"):
        decode(payload)


def test_a_broken_cbor_map_gets_no_json_hint():
    from streaminghub_datamux.codec import decode
    from streaminghub_datamux.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="malformed payload") as caught:
        decode(cbor2.dumps({"id": 1})[:-1])
    assert "JSON" not in str(caught.value)
