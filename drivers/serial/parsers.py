"""Parsers: bytes as they arrive to sample batches, a batch at a time, with numpy.

Bad input is counted in :class:`ParseStats`, never raised: a noisy device keeps
streaming.
"""

from __future__ import annotations

import abc
import contextlib
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..signals import cast_values
from .formats import FormatSpec

# A "line" longer than this without a newline is noise (wrong baud rate, binary data):
# it is dropped and counted instead of growing the buffer forever.
MAX_LINE_BYTES = 4096

_NL, _CR, _SPACE, _TAB = 10, 13, 32, 9
# key=value and key:value pairs; a newline token marks the end of each line.
_PAIR = re.compile(rb"(\n)|([A-Za-z_][A-Za-z0-9_.\-]*)[ \t]*[=:][ \t]*([^\s,;]*)")
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
