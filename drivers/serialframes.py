"""Serial byte formats: bytes to sample batches and back, a batch at a time, with numpy.

A serial device sends one of three kinds of byte stream (see docs/drivers.md, "Serial
devices"):

- ``lines``: one sample per text line, values in channel order, separated by a comma
  (or another single character) or by whitespace.
- ``keyvalue``: one sample per text line of ``key=value`` / ``key:value`` pairs.
- ``binary``: fixed-size packets: sync bytes, a payload described by a ``struct`` format,
  an optional checksum byte and optional end bytes.

A :class:`Parser` is fed whatever a read returned and gives back the complete samples in
it as ``(values, counters)`` arrays; bytes of an incomplete line or packet wait for the
next read. Every batch is parsed by numpy as a whole (``np.loadtxt`` over the good lines,
``np.frombuffer`` over packets found with vectorised sync and checksum tests); Python code
runs per bad line or per distinct key, never per good sample. Bad input is counted in a
:class:`ParseStats` and skipped, never fatal.

:class:`SampleClock` turns arrival times (and optional device counters) into sample
timestamps. :func:`encode_samples` and :class:`PtySerialWriter` go the other way: they
present frames as a serial device on a pseudo-terminal, so a simulated stream can be read
by anything that reads serial ports.

This module needs numpy only (no pyserial).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import io
import logging
import os
import re
import struct
import sys
import tty
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..checks import check_keys
from ..clock import SampleClock
from ..errors import ConfigError
from ..model import Frame, StreamError
from ..util import END_OF_STREAM
from .signals import cast_values

__all__ = [
    "CHECKSUMS",
    "FORMAT_TYPES",
    "BinaryParser",
    "FormatSpec",
    "KeyValueParser",
    "LineParser",
    "MarkerLineParser",
    "ParseStats",
    "Parser",
    "PtySerialWriter",
    "SampleClock",
    "encode_samples",
    "make_parser",
    "parse_format",
    "serve_stream_on_pty",
    "struct_dtype",
]

log = logging.getLogger(__name__)

FORMAT_TYPES = ("lines", "keyvalue", "binary")
CHECKSUMS = ("none", "xor8", "sum8")

# A "line" longer than this without a newline is noise (wrong baud rate, binary data):
# it is dropped and counted instead of growing the buffer forever.
MAX_LINE_BYTES = 4096

_NL, _CR, _SPACE, _TAB = 10, 13, 32, 9
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
# key=value and key:value pairs; a newline token marks the end of each line.
_PAIR = re.compile(rb"(\n)|([A-Za-z_][A-Za-z0-9_.\-]*)[ \t]*[=:][ \t]*([^\s,;]*)")


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
    if name not in channels:
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


# -- parsing -------------------------------------------------------------------------


@dataclass
class ParseStats:
    """What a device sent that was not a good sample. Counts only grow.

    Attributes:
        samples: good samples delivered.
        bad: lines or packets rejected: unparsable, wrong field count, bad checksum,
            too long, or a value that does not fit an integer dtype.
        missing: key=value lines: channel values absent from a good line (NaN).
        resyncs: binary: times bytes had to be skipped to find the next packet.
        skipped_bytes: binary: bytes skipped between packets.
        dropped: samples dropped because a consumer fell behind.
        last_bad: the last rejected input (shortened), for logs.
    """

    samples: int = 0
    bad: int = 0
    missing: int = 0
    resyncs: int = 0
    skipped_bytes: int = 0
    dropped: int = 0
    last_bad: str = ""

    def problems(self) -> int:
        """Everything worth a warning, as one growing number."""
        return self.bad + self.missing + self.resyncs + self.dropped

    def reject(self, count: int, example: bytes | str) -> None:
        if count <= 0:
            return
        self.bad += count
        text = example if isinstance(example, str) else example.decode("latin-1")
        self.last_bad = text[:80].rstrip("\r\n")


_Empty = tuple[np.ndarray, np.ndarray | None]


class Parser(abc.ABC):
    """Turns bytes, as they arrive, into samples. One per open port; not thread-safe.

    Args:
        spec: the format.
        n_channels: values per sample.
        dtype: the stream's dtype; values are cast to it.
        stats: where bad input is counted.
    """

    def __init__(self, spec: FormatSpec, n_channels: int, dtype: np.dtype, stats: ParseStats):
        self.spec = spec
        self.n_channels = n_channels
        self.dtype = np.dtype(dtype)
        self.stats = stats

    @abc.abstractmethod
    def _parse(self, data: bytes) -> tuple[np.ndarray, np.ndarray | None]:
        """Complete samples in ``data`` (plus what earlier calls left), as float64."""

    def feed(self, data: bytes) -> tuple[np.ndarray, np.ndarray | None]:
        """The complete samples so far: ``(values (n, channels), counters (n,) or None)``.

        Values have the stream's dtype; counters are float64 raw device counters.
        """
        values, counters = self._parse(data)
        if self.dtype.kind != "U":
            values, counters = self._fit(values, counters)
        self.stats.samples += len(values)
        return values, counters

    def _fit(self, values: np.ndarray, counters: np.ndarray | None) -> _Empty:
        # NaN has no integer form, and a sample without its counter has no time.
        keep = None
        if self.dtype.kind in "iub":
            keep = np.isfinite(values).all(axis=1)
        if counters is not None:
            ok = np.isfinite(counters)
            keep = ok if keep is None else keep & ok
        if keep is not None and not keep.all():
            example = values[np.flatnonzero(~keep)[-1]]
            self.stats.reject(int((~keep).sum()), f"no {self.dtype.name} value in {example}")
            values = values[keep]
            counters = counters[keep] if counters is not None else None
        return cast_values(values, self.dtype), counters

    def _empty(self) -> _Empty:
        dtype = np.float64 if self.dtype.kind != "U" else self.dtype
        counters = np.empty(0) if self.spec.counter is not None else None
        return np.empty((0, self.n_channels), dtype), counters


class _TextParser(Parser):
    """Shared line handling: complete lines only, the first partial line skipped."""

    def __init__(self, spec: FormatSpec, n_channels: int, dtype: np.dtype, stats: ParseStats):
        super().__init__(spec, n_channels, dtype, stats)
        self._rest = b""
        # Opening a port drops into the middle of whatever the device is sending: the
        # first line is likely cut, and a cut line can still look valid ("2.5" of "12.5").
        self._skip_partial = True

    def _complete_lines(self, data: bytes) -> bytes:
        """The complete lines received so far (ending with a newline), or b""."""
        buf = self._rest + data
        cut = buf.rfind(b"\n") + 1
        if cut == 0:
            if len(buf) > MAX_LINE_BYTES:
                if not self._skip_partial:
                    self.stats.reject(1, buf)
                buf, self._skip_partial = b"", True  # resume at the next newline
            self._rest = buf
            return b""
        block, self._rest = buf[:cut], buf[cut:]
        if self._skip_partial:
            self._skip_partial = False
            block = block[block.index(b"\n") + 1 :]
        return block


def _line_table(arr: np.ndarray, sep: int | None) -> tuple[np.ndarray, ...]:
    """Per line of a block of complete lines: start, end, whether blank, field count."""
    newline = arr == _NL
    ends = np.flatnonzero(newline)
    starts = np.concatenate(([0], ends[:-1] + 1))
    space = newline | (arr == _SPACE) | (arr == _TAB) | (arr == _CR)
    content = np.concatenate(([0], np.cumsum(~space)))
    nonblank = content[ends] > content[starts]
    if sep is None:  # a whitespace field starts where a non-space follows a space
        begins = ~space & np.concatenate(([True], space[:-1]))
        counted = np.concatenate(([0], np.cumsum(begins)))
        fields = counted[ends] - counted[starts]
    else:
        counted = np.concatenate(([0], np.cumsum(arr == sep)))
        fields = counted[ends] - counted[starts] + 1
    return starts, ends, nonblank, fields, newline


class LineParser(_TextParser):
    """One sample per line, values in channel order (CSV-like or whitespace-separated)."""

    def __init__(self, spec: FormatSpec, n_channels: int, dtype: np.dtype, stats: ParseStats):
        super().__init__(spec, n_channels, dtype, stats)
        whitespace = spec.separator == "whitespace"
        self._sep_byte = None if whitespace else ord(spec.separator)
        self._delimiter = None if whitespace else spec.separator

    def _parse(self, data: bytes) -> _Empty:
        block = self._complete_lines(data)
        if not block:
            return self._empty()
        arr = np.frombuffer(block, np.uint8)
        starts, ends, nonblank, fields, newline = _line_table(arr, self._sep_byte)
        good = nonblank & (fields == self.n_channels)
        wrong = np.flatnonzero(nonblank & ~good)
        if len(wrong):
            last = wrong[-1]
            self.stats.reject(len(wrong), block[starts[last] : ends[last]])
        if not good.any():
            return self._empty()
        # Keep the bytes of the good lines (newlines included); CR becomes a space.
        line_of_byte = np.cumsum(newline) - newline
        kept = arr[good[line_of_byte]]
        kept = np.where(kept == _CR, _SPACE, kept).astype(np.uint8)
        rows = self._load(kept.tobytes().decode("latin-1"))
        counters = rows[:, self.spec.counter].copy() if self.spec.counter is not None else None
        return rows, counters

    def _load(self, text: str) -> np.ndarray:
        try:
            return self._loadtxt(io.StringIO(text))
        except ValueError:  # some line does not parse: find it by halving
            parts = self._bisect(text.split("\n")[:-1])
            return np.concatenate(parts) if parts else np.empty((0, self.n_channels))

    def _loadtxt(self, lines: Any) -> np.ndarray:
        rows = np.loadtxt(
            lines, dtype=np.float64, delimiter=self._delimiter, comments=None, ndmin=2
        )
        if rows.shape[1] != self.n_channels:
            raise ValueError("wrong number of fields")
        return rows

    def _bisect(self, lines: list[str]) -> list[np.ndarray]:
        # O(bad lines x log(lines)) loadtxt calls, so one garbled line costs little.
        try:
            return [self._loadtxt(lines)]
        except ValueError:
            if len(lines) == 1:
                self.stats.reject(1, lines[0])
                return []
            mid = len(lines) // 2
            return self._bisect(lines[:mid]) + self._bisect(lines[mid:])


class MarkerLineParser(_TextParser):
    """String streams: every non-blank line is one sample (a label), stripped."""

    def __init__(self, spec: FormatSpec, n_channels: int, dtype: np.dtype, stats: ParseStats):
        super().__init__(spec, n_channels, dtype, stats)
        # Marker devices are idle between events, so the first line is rarely cut, and
        # dropping it could lose a real event.
        self._skip_partial = False

    def _parse(self, data: bytes) -> _Empty:
        block = self._complete_lines(data)
        labels = [line.strip() for line in block.decode("utf-8", "replace").split("\n")]
        labels = [label for label in labels if label]
        return np.array(labels, dtype=np.str_).reshape(-1, 1), None


class KeyValueParser(_TextParser):
    """One sample per line of ``key=value`` or ``key:value`` pairs, in any order.

    Missing keys become NaN (counted in ``missing``), unknown keys are ignored, and a
    line without any known key or with an unreadable value is bad.
    """

    def __init__(
        self,
        spec: FormatSpec,
        channels: Sequence[str],
        dtype: np.dtype,
        stats: ParseStats,
    ) -> None:
        super().__init__(spec, len(channels), dtype, stats)
        self._columns = {name.encode(): i for i, name in enumerate(channels)}

    def _parse(self, data: bytes) -> _Empty:
        block = self._complete_lines(data)
        if not block:
            return self._empty()
        arr = np.frombuffer(block, np.uint8)
        starts, ends, nonblank, _, _ = _line_table(arr, None)
        n_lines = len(ends)
        values = np.full((n_lines, self.n_channels), np.nan)
        seen = np.zeros((n_lines, self.n_channels), dtype=bool)
        unreadable = np.zeros(n_lines, dtype=bool)
        tokens = _PAIR.findall(block)
        if tokens:
            newlines, keys, texts = (np.array(column) for column in zip(*tokens, strict=True))
            is_newline = newlines == b"\n"
            line = np.cumsum(is_newline) - is_newline
            unique, inverse = np.unique(keys, return_inverse=True)
            column_of = np.array([self._columns.get(bytes(k), -1) for k in unique.tolist()])
            column = column_of[inverse.reshape(-1)]
            pick = np.flatnonzero(~is_newline & (column >= 0))
            numbers, ok = _to_float(texts[pick])
            unreadable[line[pick[~ok]]] = True
            pick, numbers = pick[ok], numbers[ok]
            values[line[pick], column[pick]] = numbers
            seen[line[pick], column[pick]] = True
        good = seen.any(axis=1) & ~unreadable
        wrong = np.flatnonzero(nonblank & ~good)
        if len(wrong):
            last = wrong[-1]
            self.stats.reject(len(wrong), block[starts[last] : ends[last]])
        values, seen = values[good], seen[good]
        self.stats.missing += int((~seen).sum())
        counters = values[:, self.spec.counter].copy() if self.spec.counter is not None else None
        return values, counters


def _to_float(texts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Parse byte strings as float64 (vectorised); ``ok`` marks the ones that parsed."""
    try:
        return texts.astype(np.float64), np.ones(len(texts), dtype=bool)
    except ValueError:  # at least one is not a number: find which, one by one
        numbers = np.full(len(texts), np.nan)
        ok = np.zeros(len(texts), dtype=bool)
        for i, text in enumerate(texts.tolist()):
            with contextlib.suppress(ValueError):
                numbers[i], ok[i] = float(text), True
        return numbers, ok


class BinaryParser(Parser):
    """Fixed-size packets: sync bytes, a struct payload, a checksum byte, end bytes.

    Every position where the sync bytes occur is a candidate; candidates with a good
    checksum and end bytes are packets, and packets may not overlap (a sync byte value
    inside a payload is not a packet start). All of it is numpy over the whole buffer.
    """

    def __init__(self, spec: FormatSpec, n_channels: int, dtype: np.dtype, stats: ParseStats):
        super().__init__(spec, n_channels, dtype, stats)
        self._payload = spec.payload_dtype
        self._size = spec.packet_size
        self._sync = np.frombuffer(spec.sync, np.uint8)
        self._end = np.frombuffer(spec.end, np.uint8)
        self._rest = b""
        self._synced = False  # junk before the first packet is the tail of a cut packet
        self._in_junk = False  # the last call ended in junk: its continuation is no resync
        self._junk_suspect = False  # ... and that junk was already counted as a bad packet

    def _parse(self, data: bytes) -> _Empty:
        buf = self._rest + data
        arr = np.frombuffer(buf, np.uint8)
        size = self._size
        limit = len(arr) - size + 1  # candidates from here on are not complete yet
        if limit <= 0:
            self._rest = buf
            return self._empty()
        candidates = self._sync_positions(arr, limit)
        windows = sliding_window_view(arr, size)[candidates]
        valid = self._valid(windows)
        packets = _non_overlapping(candidates[valid], size)
        last_end = int(packets[-1]) + size if len(packets) else 0
        consumed = max(limit, last_end)
        self._rest = buf[consumed:]
        self._account(candidates[~valid], packets, consumed, windows[~valid])
        if not len(packets):
            return self._empty()
        return self._decode(sliding_window_view(arr, size)[packets])

    def _sync_positions(self, arr: np.ndarray, limit: int) -> np.ndarray:
        match = arr[:limit] == self._sync[0]
        for i in range(1, len(self._sync)):
            match &= arr[i : limit + i] == self._sync[i]
        return np.flatnonzero(match)

    def _valid(self, windows: np.ndarray) -> np.ndarray:
        valid = np.ones(len(windows), dtype=bool)
        start = len(self._sync)
        stop = start + self._payload.itemsize
        if self.spec.checksum != "none":
            payload = windows[:, start:stop]
            if self.spec.checksum == "xor8":
                expected = np.bitwise_xor.reduce(payload, axis=1)
            else:
                expected = (payload.sum(axis=1, dtype=np.uint64) & 0xFF).astype(np.uint8)
            valid &= windows[:, stop] == expected
            stop += 1
        if len(self._end):
            valid &= (windows[:, stop:] == self._end).all(axis=1)
        return valid

    def _account(
        self, failed: np.ndarray, packets: np.ndarray, consumed: int, windows: np.ndarray
    ) -> None:
        """Count the junk between packets: a resync per run, a bad packet per run with a
        sync match that failed its checks (a broken packet, not just line noise).

        Runs are counted, not failed sync matches: a broken packet's payload may hold
        more sync values, and those are the same one bad packet.
        """
        size = self._size
        gap_starts = np.concatenate(([0], packets + size))
        gap_ends = np.concatenate((packets, [consumed]))
        gaps = gap_ends - gap_starts
        gap_of = np.searchsorted(gap_starts, failed, side="right") - 1
        outside = failed < gap_ends[gap_of]  # failed matches inside packets are payload
        suspect = np.zeros(len(gaps), dtype=bool)
        suspect[gap_of[outside]] = True
        junk = gaps > 0
        if not self._synced:  # the cut packet before the first one is expected
            if not len(packets):
                return
            junk[0] = suspect[0] = False
            self._synced = True
        continuing = self._in_junk and bool(junk[0])
        was_suspect = continuing and self._junk_suspect
        if continuing:  # the same run of junk as at the end of the last call
            self.stats.skipped_bytes += int(gaps[0])
            junk[0] = False
            suspect[0] &= not was_suspect
        self.stats.skipped_bytes += int(gaps[junk].sum())
        self.stats.resyncs += int(junk.sum())
        if suspect.any():
            last = np.flatnonzero(outside & (gap_of == np.flatnonzero(suspect)[-1]))
            example = windows[last[0]].tobytes().hex(" ") if len(last) else ""
            self.stats.reject(int(suspect.sum()), example)
        self._in_junk = bool(gaps[-1] > 0)
        self._junk_suspect = bool(suspect[-1]) or (was_suspect and len(gaps) == 1)

    def _decode(self, packets: np.ndarray) -> _Empty:
        start = len(self._sync)
        payload = np.ascontiguousarray(packets[:, start : start + self._payload.itemsize])
        records = payload.view(self._payload).reshape(-1)
        names = self._payload.names or ()
        values = np.column_stack([records[name].astype(np.float64) for name in names])
        counters = values[:, self.spec.counter].copy() if self.spec.counter is not None else None
        return values, counters


def _non_overlapping(starts: np.ndarray, size: int) -> np.ndarray:
    """Greedy from the left: keep a start unless it lies inside the last kept packet.

    Vectorised by rounds: a start whose predecessor is certainly kept (the predecessor
    has no conflict itself) and that conflicts with it is dropped. Chains of conflicts are
    as long as sync values inside one payload, so this takes a round or two.
    """
    kept = starts
    while len(kept) > 1:
        conflict = np.diff(kept) < size  # conflict[i]: kept[i + 1] overlaps kept[i]
        if not conflict.any():
            break
        sure = np.concatenate(([True], ~conflict))  # kept[i] has no conflict with i - 1
        drop = np.concatenate(([False], conflict & sure[:-1]))
        kept = kept[~drop]
    return kept


def make_parser(
    spec: FormatSpec, channels: Sequence[str], dtype: np.dtype, stats: ParseStats
) -> Parser:
    """The parser for a format, casting to ``dtype`` and counting into ``stats``."""
    if spec.type == "binary":
        return BinaryParser(spec, len(channels), dtype, stats)
    if spec.type == "keyvalue":
        return KeyValueParser(spec, channels, dtype, stats)
    if np.dtype(dtype).kind == "U":
        return MarkerLineParser(spec, len(channels), dtype, stats)
    return LineParser(spec, len(channels), dtype, stats)


# -- encoding and the pseudo-terminal writer -----------------------------------------


def _number_format(dtype: np.dtype) -> str:
    if dtype.kind == "f":
        return "%.9g" if dtype.itemsize <= 4 else "%.17g"  # round-trips the dtype
    if dtype.kind in "iub":
        return "%d"
    return "%s"


def encode_samples(spec: FormatSpec, channels: Sequence[str], values: np.ndarray) -> bytes:
    """Encode samples ``(n, channels)`` the way a device of format ``spec`` sends them."""
    values = np.asarray(values)
    if values.ndim == 1:
        values = values.reshape(-1, 1)
    if not len(values):
        return b""
    if spec.type == "binary":
        return _encode_binary(spec, values)
    number = _number_format(values.dtype)
    out = io.StringIO()
    if spec.type == "keyvalue":
        row = " ".join(f"{name.replace('%', '%%')}={number}" for name in channels)
        np.savetxt(out, values, fmt=row)
    else:
        delimiter = " " if spec.separator == "whitespace" else spec.separator
        np.savetxt(out, values, fmt=number, delimiter=delimiter)
    return out.getvalue().encode("utf-8")


def _encode_binary(spec: FormatSpec, values: np.ndarray) -> bytes:
    dtype = spec.payload_dtype
    records = np.zeros(len(values), dtype=dtype)
    for i, name in enumerate(dtype.names or ()):
        records[name] = cast_values(values[:, i].astype(np.float64), dtype.fields[name][0])
    payload = records.view(np.uint8).reshape(len(values), dtype.itemsize)
    parts = [np.broadcast_to(np.frombuffer(spec.sync, np.uint8), (len(values), len(spec.sync)))]
    parts.append(payload)
    if spec.checksum == "xor8":
        parts.append(np.bitwise_xor.reduce(payload, axis=1).reshape(-1, 1))
    elif spec.checksum == "sum8":
        parts.append((payload.sum(axis=1, dtype=np.uint64) & 0xFF).astype(np.uint8)[:, None])
    if spec.end:
        parts.append(
            np.broadcast_to(np.frombuffer(spec.end, np.uint8), (len(values), len(spec.end)))
        )
    return np.concatenate(parts, axis=1).tobytes()


class PtySerialWriter:
    """A pseudo-terminal that looks like a serial device and sends frames' samples.

    Open it, point a serial reader (the serial driver, pyserial, a terminal program) at
    :attr:`path`, and write frames: they are encoded in ``fmt`` (the same ``format``
    object as a ``drivers.serial`` device; CSV lines by default). Writes never block:
    while no one reads, the terminal buffers a few KiB and the rest is dropped and
    counted in :attr:`bytes_dropped`, like a device that keeps sending into a closed port.

    Args:
        fmt: the format section (``{"type": "lines", "separator": ","}`` by default).
        max_pending: bytes held for a slow reader before they are dropped.
    """

    def __init__(self, fmt: Mapping[str, Any] | None = None, *, max_pending: int = 1 << 16):
        self.fmt = dict(fmt) if fmt is not None else {"type": "lines"}
        self.max_pending = max_pending
        self.path = ""
        self.bytes_written = 0
        self.bytes_dropped = 0
        self.frames_written = 0
        self._master = -1
        self._slave = -1
        self._pending = b""
        self._spec: FormatSpec | None = None
        self._channels: list[str] = []

    def __enter__(self) -> PtySerialWriter:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> str:
        """Create the pseudo-terminal; returns the path to read from (its slave side)."""
        if self._master >= 0:
            return self.path
        master, slave = os.openpty()
        # Raw mode: no echo and no line editing, so bytes pass through unchanged, as on a
        # real serial line. The slave end stays open here so the terminal (and its raw
        # settings) outlives readers that come and go.
        tty.setraw(slave)
        os.set_blocking(master, False)
        self._master, self._slave = master, slave
        self.path = os.ttyname(slave)
        return self.path

    def close(self) -> None:
        """Close both ends; readers then get an I/O error, as on an unplugged device."""
        for fd in (self._master, self._slave):
            if fd >= 0:
                os.close(fd)
        self._master = self._slave = -1

    def spec_for(self, channels: Sequence[str]) -> FormatSpec:
        """The validated format for these channels (checked once, then reused)."""
        if self._spec is None or list(channels) != self._channels:
            self._spec = parse_format(self.fmt, "format", list(channels))
            self._channels = list(channels)
        return self._spec

    def write(self, values: np.ndarray, channels: Sequence[str]) -> int:
        """Encode and send samples ``(n, channels)``; returns the bytes sent now."""
        return self.write_bytes(encode_samples(self.spec_for(channels), channels, values))

    def write_frame(self, frame: Frame) -> int:
        """Send one frame's samples."""
        sent = self.write(frame.values, frame.channels)
        self.frames_written += 1
        return sent

    def write_bytes(self, data: bytes) -> int:
        """Send raw bytes (after whatever is still pending); returns the bytes sent now."""
        if self._master < 0:
            raise RuntimeError("the pseudo-terminal is not open")
        self._pending += data
        sent = 0
        while self._pending:
            try:
                n = os.write(self._master, self._pending)
            except BlockingIOError:
                break
            sent += n
            self._pending = self._pending[n:]
        self.bytes_written += sent
        if len(self._pending) > self.max_pending:  # no one is reading: drop it all
            self.bytes_dropped += len(self._pending)
            self._pending = b""
        return sent

    def device_config(
        self,
        channels: Sequence[str],
        *,
        rate: float = 0.0,
        dtype: str = "f32",
        stream: str = "data",
    ) -> dict[str, Any]:
        """A ``drivers.serial.devices.<id>`` entry that reads this pseudo-terminal."""
        spec = self.spec_for(channels)
        return {
            "port": self.path,
            "stream": stream,
            "channels": list(channels),
            "dtype": dtype,
            "rate": rate,
            "format": spec.to_dict(channels),
        }

    async def serve(self, frames: AsyncIterator[Frame] | asyncio.Queue[Any]) -> int:
        """Write frames until the iterator ends or the queue yields END_OF_STREAM.

        Non-frame items on a queue (status items) are skipped; an error item ends it.
        Returns the number of frames written.
        """
        if isinstance(frames, asyncio.Queue):
            while True:
                item = await frames.get()
                if item is END_OF_STREAM or isinstance(item, StreamError):
                    break
                if isinstance(item, Frame):
                    self.write_frame(item)
        else:
            async for frame in frames:
                self.write_frame(frame)
        return self.frames_written


async def serve_stream_on_pty(
    frames: AsyncIterator[Frame] | asyncio.Queue[Any],
    fmt: Mapping[str, Any] | None = None,
    *,
    on_open: Callable[[PtySerialWriter], Any] | None = None,
) -> PtySerialWriter:
    """Present a stream of frames as a serial device on a new pseudo-terminal.

    Args:
        frames: frames to send: an async iterator, or a sink queue ending with
            END_OF_STREAM (what ``proxy_live_stream`` fills).
        fmt: the serial ``format`` to write (CSV lines by default).
        on_open: called with the writer once its :attr:`~PtySerialWriter.path` exists
            (e.g. to print it); by default the path is printed to stderr.

    Returns:
        The (closed) writer, with its byte and frame counts.
    """
    writer = PtySerialWriter(fmt)
    with writer:
        if on_open is None:
            print(f"serial device: {writer.path}", file=sys.stderr, flush=True)
        else:
            on_open(writer)
        await writer.serve(frames)
    return writer
