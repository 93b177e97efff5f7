"""Serial byte formats (lines, key=value, binary packets): their options, validated."""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...checks import check_keys
from ...errors import ConfigError

FORMAT_TYPES = ("lines", "keyvalue", "binary")
CHECKSUMS = ("none", "xor8", "sum8")
_FORMAT_KEYS = {
    "lines": {"type", "separator", "timestamp", "counter_channel", "counter_bits"},
    "keyvalue": {"type", "timestamp", "counter_channel", "counter_bits"},
    "binary": {"type", "sync", "layout", "checksum", "end", "counter", "counter_bits"},
}
# struct codes -> numpy type codes (standard sizes: a byte order prefix is required).
_STRUCT_CODES = {
    "b": "i1", "B": "u1", "?": "b1", "h": "i2", "H": "u2", "i": "i4", "I": "u4",
    "l": "i4", "L": "u4", "q": "i8", "Q": "u8", "e": "f2", "f": "f4", "d": "f8",
}  # fmt: skip
_STRUCT_ORDER = {"<": "<", ">": ">", "!": ">", "=": "="}
_STRUCT_TOKEN = re.compile(r"\s*(\d*)([A-Za-z?])")
# -- format specs --------------------------------------------------------------------


@dataclass(frozen=True)
class FormatSpec:
    """How a device encodes samples, validated (see :func:`parse_format`).

    Attributes:
        type: ``"lines"``, ``"keyvalue"`` or ``"binary"``.
        separator: lines: one separator character, or ``"whitespace"``.
        counter: column (lines, keyvalue) or payload field (binary) holding a sample
            counter that timestamps derive from; None: timestamps from arrival times.
        counter_bits: the counter wraps at ``2**counter_bits`` (None: it never wraps).
        sync: binary: the bytes every packet starts with.
        layout: binary: ``struct`` format of the payload after the sync bytes.
        checksum: binary: ``"none"``, ``"xor8"`` or ``"sum8"`` of the payload bytes, in
            the byte after the payload.
        end: binary: bytes every packet ends with (after the checksum), e.g. OpenBCI's.
    """

    type: str = "lines"
    separator: str = ","
    counter: int | None = None
    counter_bits: int | None = None
    sync: bytes = b""
    layout: str = ""
    checksum: str = "none"
    end: bytes = b""

    @property
    def payload_dtype(self) -> np.dtype:
        """Binary: the packed structured dtype of the payload (fields f0, f1, ...)."""
        return struct_dtype(self.layout)

    @property
    def packet_size(self) -> int:
        """Binary: bytes per packet, sync to end."""
        checksum = 0 if self.checksum == "none" else 1
        return len(self.sync) + self.payload_dtype.itemsize + checksum + len(self.end)

    def to_dict(self, channels: Sequence[str]) -> dict[str, Any]:
        """The config form of this format (inverse of :func:`parse_format`)."""
        out: dict[str, Any] = {"type": self.type}
        if self.type == "lines":
            out["separator"] = self.separator
        if self.type == "binary":
            out.update(sync=self.sync.hex(), layout=self.layout, checksum=self.checksum)
            if self.end:
                out["end"] = self.end.hex()
            if self.counter is not None:
                out["counter"] = self.counter
        elif self.counter is not None:
            out.update(timestamp="counter", counter_channel=channels[self.counter])
        if self.counter is not None and self.counter_bits is not None:
            out["counter_bits"] = self.counter_bits
        return out


def struct_dtype(layout: str) -> np.dtype:
    """The numpy dtype of a ``struct`` format: packed fields ``f0, f1, ...``; pads skipped.

    Only explicit byte orders (``<``, ``>``, ``!``, ``=``) are accepted: native ``@``
    alignment depends on the machine that compiled the device's firmware, not ours.
    24-bit integers have no struct code; read them as bytes (``3B``) or not at all.

    Raises:
        ValueError: the format is not supported, with what to write instead.
    """
    if not isinstance(layout, str) or not layout or layout[0] not in _STRUCT_ORDER:
        raise ValueError(
            f"layout {layout!r} must start with a byte order: '<' (little-endian, "
            "Arduino, most boards) or '>' (big-endian)"
        )
    order = _STRUCT_ORDER[layout[0]]
    names: list[str] = []
    formats: list[str] = []
    offsets: list[int] = []
    offset, pos, body = 0, 0, layout[1:]
    while pos < len(body.rstrip()):
        match = _STRUCT_TOKEN.match(body, pos)
        if match is None:
            raise ValueError(f"cannot read layout {layout!r} at {body[pos:]!r}")
        count = int(match.group(1) or 1)
        code = match.group(2)
        pos = match.end()
        if code == "x":
            offset += count
            continue
        if code not in _STRUCT_CODES:
            raise ValueError(
                f"struct code {code!r} is not supported; use x (pad) or one of "
                f"{''.join(_STRUCT_CODES)} (24-bit values: read them as 3B)"
            )
        item = np.dtype(order + _STRUCT_CODES[code] if code not in "b?B" else _STRUCT_CODES[code])
        for _ in range(count):
            names.append(f"f{len(names)}")
            formats.append(item.str)
            offsets.append(offset)
            offset += item.itemsize
    if not names:
        raise ValueError(f"layout {layout!r} has no fields")
    dtype = np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": offset})
    if dtype.itemsize != struct.calcsize(layout):  # our reading must agree with struct's
        raise ValueError(f"cannot read layout {layout!r}")
    return dtype


def _hex_bytes(data: Mapping[str, Any], key: str, path: str, *, required: bool) -> bytes:
    raw = data.get(key, "")
    fix = 'write hex bytes, e.g. "a0" or "aa 55"'
    if not isinstance(raw, str):
        raise ConfigError(f"expected hex bytes, got {raw!r}", key=f"{path}.{key}", fix=fix)
    text = raw.lower().replace("0x", "").replace(" ", "")
    try:
        value = bytes.fromhex(text)
    except ValueError:
        raise ConfigError(f"{raw!r} is not hex bytes", key=f"{path}.{key}", fix=fix) from None
    if required and not value:
        raise ConfigError("packets need sync bytes", key=f"{path}.{key}", fix=fix)
    if len(value) > 16:
        raise ConfigError("more than 16 bytes", key=f"{path}.{key}", fix="use fewer bytes")
    return value


def _counter_bits(data: Mapping[str, Any], path: str, default: int | None) -> int | None:
    bits = data.get("counter_bits", default)
    if bits is None:
        return None
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 64:
        raise ConfigError(
            f"expected an integer from 1 to 64, got {bits!r}",
            key=f"{path}.counter_bits",
            fix="use the width of the device's counter, e.g. 8 for a counter that wraps at 255",
        )
    return bits


def _text_counter(data: Mapping[str, Any], path: str, channels: Sequence[str]) -> int | None:
    mode = data.get("timestamp", "arrival")
    if mode not in ("arrival", "counter"):
        raise ConfigError(
            f"unknown timestamp mode {mode!r}",
            key=f"{path}.timestamp",
            fix='use "arrival" (default) or "counter" with "counter_channel"',
        )
    name = data.get("counter_channel")
    if mode == "arrival":
        if name is not None:
            raise ConfigError(
                "counter_channel is only used with timestamp counter",
                key=f"{path}.counter_channel",
                fix='add "timestamp": "counter", or remove counter_channel',
            )
        return None
    if not isinstance(name, str) or name not in channels:
        raise ConfigError(
            f"counter_channel {name!r} is not one of the channels {list(channels)}",
            key=f"{path}.counter_channel",
            fix="name the channel that holds the device's sample counter",
        )
    return list(channels).index(name)


def _separator(data: Mapping[str, Any], path: str) -> str:
    sep = data.get("separator", ",")
    if sep in ("whitespace", " "):
        return "whitespace"
    if not isinstance(sep, str) or len(sep) != 1 or sep.isalnum() or sep in "+-.\r\n\"'":
        raise ConfigError(
            f"invalid separator {sep!r}",
            key=f"{path}.separator",
            fix='use one character such as "," ";" "\\t", or "whitespace"',
        )
    return sep


def _binary_format(data: Mapping[str, Any], path: str, channels: Sequence[str]) -> FormatSpec:
    sync = _hex_bytes(data, "sync", path, required=True)
    layout = data.get("layout")
    try:
        dtype = struct_dtype(layout)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ConfigError(
            str(exc), key=f"{path}.layout", fix='write a struct format such as "<Bhhh"'
        ) from None
    n_fields = len(dtype.names or ())
    if len(channels) != n_fields:
        raise ConfigError(
            f"layout {layout!r} has {n_fields} fields but there are {len(channels)} channels",
            key=f"{path}.layout",
            fix="name one channel per payload field (the counter field too), in order",
        )
    checksum = data.get("checksum", "none")
    if checksum not in CHECKSUMS:
        raise ConfigError(
            f"unknown checksum {checksum!r}",
            key=f"{path}.checksum",
            fix=f"use one of {list(CHECKSUMS)}",
        )
    counter = data.get("counter")
    default_bits = None
    if counter is not None:
        if isinstance(counter, bool) or not isinstance(counter, int) or not 0 <= counter < n_fields:
            raise ConfigError(
                f"expected a payload field index from 0 to {n_fields - 1}, got {counter!r}",
                key=f"{path}.counter",
                fix="give the index of the sample-counter field in the layout",
            )
        field_type = dtype.fields[f"f{counter}"][0]  # type: ignore[index]
        if field_type.kind not in "iu":
            raise ConfigError(
                f"payload field {counter} is {field_type.name}, not an integer",
                key=f"{path}.counter",
                fix="point it at an integer field",
            )
        default_bits = field_type.itemsize * 8  # a counter wraps at its field's width
    return FormatSpec(
        type="binary",
        sync=sync,
        layout=layout,  # type: ignore[arg-type]
        checksum=checksum,
        end=_hex_bytes(data, "end", path, required=False),
        counter=counter,
        counter_bits=_counter_bits(data, path, default_bits) if counter is not None else None,
    )


def parse_format(data: Any, path: str, channels: Sequence[str]) -> FormatSpec:
    """Validate a device's ``format`` section against its channels.

    Args:
        data: the format's JSON object; None means CSV lines.
        path: its key path for error messages, e.g. ``drivers.serial.devices.imu.format``.
        channels: the device's channel names, in column or payload order.

    Raises:
        ConfigError: naming the offending key path and how to fix it.
    """
    if data is None:
        return FormatSpec()
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"format must be a JSON object, got {type(data).__name__}",
            key=path,
            fix='write e.g. {"type": "lines", "separator": ","}',
        )
    kind = data.get("type", "lines")
    if kind not in FORMAT_TYPES:
        raise ConfigError(
            f"unknown format type {kind!r}", key=f"{path}.type", fix=f"use one of {FORMAT_TYPES}"
        )
    check_keys(data, path, _FORMAT_KEYS[kind], f"{kind} format")
    if kind == "binary":
        return _binary_format(data, path, channels)
    counter = _text_counter(data, path, channels)
    return FormatSpec(
        type=kind,
        separator=_separator(data, path) if kind == "lines" else ",",
        counter=counter,
        counter_bits=_counter_bits(data, path, None) if counter is not None else None,
    )
