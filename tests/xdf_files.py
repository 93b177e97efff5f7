"""A tiny XDF writer, for cases the example files do not cover."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np


def _varlen(n: int) -> bytes:
    return b"\x01" + struct.pack("<B", n) if n < 256 else b"\x04" + struct.pack("<I", n)


def _chunk(tag: int, content: bytes) -> bytes:
    return _varlen(len(content) + 2) + struct.pack("<H", tag) + content


def _header(sid: int, name: str, fmt: str, count: int, rate: float, channels: str = "") -> bytes:
    xml = (
        f"<?xml version='1.0'?><info><name>{name}</name><type>T</type>"
        f"<channel_count>{count}</channel_count><nominal_srate>{rate}</nominal_srate>"
        f"<channel_format>{fmt}</channel_format><source_id>src{sid}</source_id>"
        f"<desc>{channels}</desc></info>"
    )
    return _chunk(2, struct.pack("<I", sid) + xml.encode())


def _samples(sid: int, stamps: list[float], rows: list[list], dtype: str) -> bytes:
    body = _varlen(len(stamps))
    for stamp, row in zip(stamps, rows, strict=True):
        body += b"\x08" + struct.pack("<d", stamp)
        if dtype == "str":
            body += b"".join(_varlen(len(v.encode())) + v.encode() for v in row)
        else:
            body += np.asarray(row, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()
    return _chunk(3, struct.pack("<I", sid) + body)


def _write(path: Path, *chunks: bytes) -> Path:
    file_header = _chunk(1, b"<?xml version='1.0'?><info><version>1.0</version></info>")
    path.write_bytes(b"XDF:" + file_header + b"".join(chunks))
    return path
