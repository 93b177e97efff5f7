"""Stream one numeric XDF stream chunk by chunk, with pyxdf's clock sync and dejitter.

``pyxdf.load_xdf`` decodes every sample of the file in Python before returning, so a
replay held the whole stream in memory (2.2 bytes of RAM per byte of file) and its first
frame waited for the whole load. Here one pass over the file (:func:`index_stream`)
reads the stream's header, footer, ClockOffset chunks and the time stamps of its Samples
chunks, remembering where each chunk's data is; values are decoded later, a few chunks
at a time, when replay asks for them (:meth:`StreamIndex.blocks`).

Identical results: clock synchronisation and dejittering need every clock offset and
every time stamp of the stream, which the index pass has. Clock sync runs through
pyxdf's own functions (``_truncate_corrupted_offsets``, ``_clock_sync``) with
``load_xdf``'s defaults. Dejittering uses pyxdf's own rules for where segments break
(``_detect_breaks``, ``_find_segment_indices``, ``_stream_can_drop_samples``) but our
own least-squares fit per segment (:func:`_fit_line`): pyxdf's ``_jitter_removal``
needs about 80 bytes a sample above the stamps while it fits, the peak of the whole
pass; ours hands LAPACK the very same numbers in 40 (its copies of the design matrix
and the stamps, 24, and the matrix, 16; one LAPACK fit over the segment, which exact
agreement requires, cannot need less) and so gets the same line, written back a block at
a time. Tests compare both, byte for byte, on breaks, lone samples, segments of over a
million samples and irregular streams, and :func:`index_stream` checks once per process
that the installed pyxdf still agrees (:func:`_dejitter_agrees`). Timestamps are thus
those of ``load_xdf`` bit for bit, for the installed pyxdf. Memory is the time stamps
(8 bytes per sample, plus the 40 of the fit, briefly, before the first frame) and one
block of values, not the values of the whole stream.

:func:`index_stream` raises :class:`Unsupported` when the streamed path cannot promise
that (string streams, compressed files, a chunk it cannot decode, an older or newer
pyxdf without those functions or whose fit differs); the caller then loads the stream
with ``load_xdf``.
"""

from __future__ import annotations

import array
import functools
import struct
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..errors import DataError
from .base import Chunk

try:
    from pyxdf import pyxdf as _pyxdf

    _SYNC: tuple[Any, Any, Any, Any, Any, Any, Any] | None = (
        _pyxdf.StreamData,
        _pyxdf._xml2dict,
        _pyxdf._truncate_corrupted_offsets,
        _pyxdf._clock_sync,
        _pyxdf._detect_breaks,
        _pyxdf._find_segment_indices,
        _pyxdf._jitter_removal,  # only to check, once, that ours still agrees with it
    )
    # Newer pyxdf leaves streams that declare can_drop_samples undejittered; older ones
    # have no such rule and neither do we then.
    _CAN_DROP: Any = getattr(_pyxdf, "_stream_can_drop_samples", None)
except (ImportError, AttributeError):  # pragma: no cover - depends on the pyxdf version
    _SYNC, _CAN_DROP = None, None

__all__ = ["StreamIndex", "Unsupported", "index_stream"]

_MAGIC = b"XDF:"
_TAG_HEADER, _TAG_SAMPLES, _TAG_CLOCK, _TAG_FOOTER = 2, 3, 4, 6
_STREAM_TAGS = frozenset({2, 3, 4, 6})
_VARLEN = {1: "<B", 4: "<I", 8: "<Q"}
_FORMATS = {
    "float32": "<f4",
    "double64": "<f8",
    "int8": "<i1",
    "int16": "<i2",
    "int32": "<i4",
    "int64": "<i8",
}
# load_xdf's defaults for what LOAD_OPTIONS does not set (pyxdf 1.16-1.17).
_RESET_ARGS = (5, 5, 10, 1, 0.0001)  # stds, seconds, offset stds, offset seconds, winsor
_JITTER_ARGS = (1, 500)  # break threshold seconds, samples
_LINE_BLOCK = 1 << 16  # dejittered stamps are written this many at a time


class Unsupported(Exception):
    """The streamed path cannot promise load_xdf's result here; load the whole stream."""


@dataclass(frozen=True, slots=True)
class _SampleChunk:
    offset: int  # file offset of the first sample
    size: int  # bytes of sample data
    count: int  # samples
    stamped: int  # samples carrying their own time stamp
    first_stamped: bool = False  # only the first sample does (LabRecorder's pattern)


@dataclass
class StreamIndex:
    """Where one stream's samples are, and their final (synchronised) time stamps."""

    path: Path
    value_dtype: np.dtype  # little-endian, as stored
    channels: int
    chunks: list[_SampleChunk]
    timestamps: np.ndarray  # float64, synchronised and dejittered like load_xdf
    samples: int  # samples to deliver (pyxdf may drop a pylsl#67 extra at the end)

    def blocks(
        self, block_bytes: int, dtype: np.dtype, columns: list[int] | None = None
    ) -> Iterator[Chunk]:
        """``(timestamps, values)`` of at most about ``block_bytes``, decoded chunk by chunk.

        Each block's values are copied once, from the file's bytes straight into the
        block (in ``dtype``), whatever the chunks' sizes: no joining of chunks, then of
        pieces. Timestamps are views of :attr:`timestamps`.
        """
        width = self.channels if columns is None else len(columns)
        rows = max(1, block_bytes // (8 + dtype.itemsize * max(width, 1)))
        start = 0  # index of the next block's first sample
        with self.path.open("rb") as handle:
            parts = self._parts(handle, columns, block_bytes)
            part: np.ndarray | None = None  # values decoded but not yet in a block
            while start < self.samples:
                block = np.empty((min(rows, self.samples - start), width), dtype)
                filled = 0
                while filled < len(block):
                    if part is None or not len(part):
                        part = next(parts, None)
                        if part is None:
                            break
                        continue
                    take = min(len(block) - filled, len(part))
                    block[filled : filled + take] = part[:take]
                    filled += take
                    part = part[take:]
                if filled == 0:
                    return
                yield self.timestamps[start : start + filled], block[:filled]
                start += filled

    def _parts(
        self, handle: BinaryIO, columns: list[int] | None, span_bytes: int
    ) -> Iterator[np.ndarray]:
        """Every chunk's values, in order, as views on the file's bytes.

        Neighbouring chunks are read together, up to ``span_bytes`` at a time: one read
        per block instead of one per chunk (LabRecorder writes chunks of a few KiB).
        """
        for start, stop, group in _spans(self.chunks, span_bytes):
            handle.seek(start)
            data = handle.read(stop - start)
            if len(data) != stop - start:
                raise DataError(
                    f"the file changed while replaying: bytes {start}-{stop} are cut short",
                    file=str(self.path),
                )
            for chunk in group:
                at = chunk.offset - start
                for part in _value_views(data, at, chunk, self.value_dtype, self.channels):
                    yield part if columns is None else part[:, columns]


def _spans(chunks: list[_SampleChunk], limit: int) -> Iterator[tuple[int, int, list[_SampleChunk]]]:
    """Runs of neighbouring chunks, each read at once: ``(start, stop, chunks)``.

    A run spans at most ``limit`` bytes (or one chunk), and at least half of what it
    spans is the stream's (other streams' chunks in between are read and skipped).
    """
    at = 0
    while at < len(chunks):
        first = chunks[at]
        start, stop, useful = first.offset, first.offset + first.size, first.size
        end = at + 1
        while end < len(chunks):
            chunk = chunks[end]
            after = chunk.offset + chunk.size
            if after - start > limit or 2 * (useful + chunk.size) < after - start:
                break
            stop, useful = after, useful + chunk.size
            end += 1
        yield start, stop, chunks[at:end]
        at = end


def _value_views(
    data: bytes, at: int, chunk: _SampleChunk, value_dtype: np.dtype, channels: int
) -> list[np.ndarray]:
    """The values of the chunk at ``data[at:]``: 1-2 strided views, or a decoded copy.

    The layouts recorders write (every sample stamped, none, or only the first) need
    no per-sample work; the index pass checked their sample flags.
    """
    item, count = value_dtype.itemsize, chunk.count
    record = item * channels
    if chunk.stamped in (0, count):
        stamp = 8 if chunk.stamped else 0
        step = 1 + stamp + record
        shape = (count, channels)
        return [np.ndarray(shape, value_dtype, data, at + 1 + stamp, (step, item))]
    if chunk.first_stamped:
        head = np.ndarray((1, channels), value_dtype, data, at + 9, (9 + record, item))
        rest_at = at + 9 + record + 1
        rest = np.ndarray((count - 1, channels), value_dtype, data, rest_at, (1 + record, item))
        return [head, rest]
    raw = data[at : at + chunk.size]
    return _decode(raw, count, chunk.stamped, value_dtype, channels, stamps=False)[1]


@functools.lru_cache(maxsize=64)
def _layout(stamped: bool, value_dtype: np.dtype, channels: int) -> np.dtype:
    """One sample's record (cached: building a dtype costs more than decoding a chunk)."""
    fields: list[tuple[Any, ...]] = [("flag", "u1")]
    if stamped:
        fields.append(("t", "<f8"))
    fields.append(("v", value_dtype, (channels,)))
    return np.dtype(fields)  # packed: no alignment padding, as in the file


def _decode(
    data: bytes,
    count: int,
    stamped: int,
    value_dtype: np.dtype,
    channels: int,
    *,
    stamps: bool = True,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """``(stamp or NaN per sample, values)`` of one Samples chunk; values in 1-2 parts.

    Vectorised for the layouts recorders write (every sample stamped, none, or only the
    first); any other mix is decoded sample by sample. Without ``stamps`` the first
    array is empty (the values pass of replay has the stamps already).
    """
    no_stamps = np.empty(0)
    if stamped in (0, count):
        rows = np.frombuffer(data, _layout(stamped == count, value_dtype, channels), count)
        if (stamped and not rows["flag"].all()) or (not stamped and rows["flag"].any()):
            raise Unsupported("sample flags disagree with the chunk length")
        times = no_stamps if not stamps else rows["t"] if stamped else np.full(count, np.nan)
        return times, [rows["v"].reshape(count, channels)]
    if stamped == 1 and data[0]:
        head = np.frombuffer(data, _layout(True, value_dtype, channels), 1)
        rest = np.frombuffer(data, _layout(False, value_dtype, channels), count - 1, head.nbytes)
        if rest["flag"].any():
            raise Unsupported("sample flags disagree with the chunk length")
        times = no_stamps
        if stamps:
            times = np.full(count, np.nan)
            times[0] = head["t"][0]
        return times, [head["v"].reshape(1, channels), rest["v"].reshape(-1, channels)]
    sample_bytes = value_dtype.itemsize * channels
    times = np.full(count, np.nan)
    values = np.empty((count, channels), value_dtype)
    at = 0
    for k in range(count):
        if data[at]:
            times[k] = struct.unpack_from("<d", data, at + 1)[0]
            at += 9
        else:
            at += 1
        values[k] = np.frombuffer(data, value_dtype, channels, at)
        at += sample_bytes
    if at != len(data):
        raise Unsupported("sample flags disagree with the chunk length")
    return (times if stamps else no_stamps), [values]


def _fill_stamps(stamps: np.ndarray, last: float, tdiff: float) -> float:
    """Unstamped samples (NaN) become previous + tdiff, added one at a time as pyxdf does.

    Each run of unstamped samples is one sequential sum (``np.add.accumulate`` adds in
    order, so the rounding is pyxdf's). Returns the chunk's last stamp.
    """
    if not len(stamps):
        return last
    missing = np.isnan(stamps)
    if not missing.any():
        return float(stamps[-1])
    # Starts and ends of runs of missing stamps.
    edges = np.flatnonzero(np.diff(np.concatenate(([0], missing.view(np.int8), [0]))))
    for start, stop in zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True):
        before = last if start == 0 else float(stamps[start - 1])
        steps = np.full(stop - start + 1, tdiff)
        steps[0] = before
        stamps[start:stop] = np.add.accumulate(steps)[1:]
    return float(stamps[-1])


def _varlen(handle: BinaryIO) -> int | None:
    width = handle.read(1)
    if not width:
        return None
    fmt = _VARLEN.get(width[0])
    if fmt is None:
        raise Unsupported(f"bad length prefix {width[0]}")
    raw = handle.read(struct.calcsize(fmt))
    if len(raw) != struct.calcsize(fmt):
        raise Unsupported("cut short")
    return struct.unpack(fmt, raw)[0]


def _read(handle: BinaryIO, size: int) -> bytes:
    data = handle.read(size)
    if len(data) != size:
        raise Unsupported("cut short")
    return data


def _fit_line(stamps: np.ndarray, start: int, stop: int) -> None:
    """``stamps[start:stop]`` become pyxdf's least-squares line through them, bit for bit.

    pyxdf fits ``[1, idx]`` (int64) against a gathered copy of the stamps; numpy casts
    the ints to float64 before LAPACK sees them, so building that float64 matrix directly
    (Fortran order, as LAPACK wants it) and passing a view of the stamps gives LAPACK the
    same numbers, hence the same mapping. ``m0 + m1 * k`` is then the same two float
    operations per sample whether ``k`` is an int or its float. Index columns are made a
    block at a time: a freed full-length temporary stays resident (glibc raises its mmap
    threshold after the clock sync's temporaries, then keeps such blocks in its heap).
    """
    design = np.empty((stop - start, 2), order="F")
    design[:, 0] = 1.0
    for at, end, index in _index_blocks(start, stop):
        design[at - start : end - start, 1] = index
    mapping = np.linalg.lstsq(design, stamps[start:stop, None], rcond=-1)[0]
    del design  # freed before the write-back, which needs none of it
    intercept, slope = mapping[0, 0], mapping[1, 0]
    for at, end, index in _index_blocks(start, stop):
        stamps[at:end] = intercept + slope * index


def _index_blocks(start: int, stop: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """``(at, end, float64 at..end-1)`` covering start..stop-1 (exact: ints below 2**53)."""
    for at in range(start, stop, _LINE_BLOCK):
        end = min(stop, at + _LINE_BLOCK)
        yield at, end, np.arange(at, end, dtype=np.float64)


def _dejitter(stream: Any, stream_id: int, header: Mapping[str, Any] | None) -> None:
    """pyxdf's ``_jitter_removal`` for one stream: same stamps, segments, effective rate.

    pyxdf's own rules (``_detect_breaks``, ``_find_segment_indices`` and, where it has
    it, ``_stream_can_drop_samples``) pick the segments; only the fit of each segment is
    ours (:func:`_fit_line`): 40 bytes a sample above the stamps where pyxdf's costs
    about 80, which was the peak of the whole index pass.
    """
    assert _SYNC is not None
    detect_breaks, find_segments = _SYNC[4], _SYNC[5]
    stream.effective_srate = 0
    stamps = stream.time_stamps
    total = len(stamps)
    if total == 0:
        return
    if stream.srate == 0:
        stream.segments.append((0, total - 1))
        return
    if _CAN_DROP is not None and _CAN_DROP(header):
        stream.segments.append((0, total - 1))
        if total > 1 and (duration := stamps[-1] - stamps[0]) > 0:
            stream.effective_srate = (total - 1) / duration
        return
    segments, starts, stops = find_segments(detect_breaks(stream, *_JITTER_ARGS))
    stream.segments.extend(segments)
    for first, last in segments:
        _fit_line(stamps, first, last + 1)
    counts = (stops + 1) - starts
    if np.any(counts > 1):
        # Weighted as pyxdf weighs it (numpy reductions, same order, same floats).
        stream.effective_srate = np.sum(counts - 1) / np.sum(stamps[stops] - stamps[starts])
    if np.abs(stream.srate - stream.effective_srate) / stream.srate > 0.1:
        _pyxdf.logger.warning(  # pyxdf's note, on pyxdf's logger, as load_xdf gives it
            "Stream %d: Calculated effective sampling rate %.4f Hz is different "
            "from specified rate %.4f Hz.",
            stream_id,
            stream.effective_srate,
            stream.srate,
        )


@functools.cache
def _dejitter_agrees() -> bool:
    """Whether :func:`_dejitter` gives pyxdf's ``_jitter_removal`` result, checked once.

    A canary against a pyxdf release that fits differently: a small stream with jitter,
    a gap and a lone sample goes through both (about a millisecond).
    """
    assert _SYNC is not None
    stream_data, xml2dict, jitter_removal = _SYNC[0], _SYNC[1], _SYNC[6]
    xml = (
        "<info><channel_count>1</channel_count><nominal_srate>100</nominal_srate>"
        "<channel_format>float32</channel_format></info>"
    )
    header = xml2dict(ET.fromstring(xml))
    rng = np.random.default_rng(1)
    stamps = 7.5 + np.arange(1200) / 100 + rng.normal(0, 1e-3, 1200)
    stamps[600:] += 5.0  # a break: two segments
    stamps[-1] += 5.0  # and a lone last sample
    ours, theirs = stream_data(header), stream_data(header)
    ours.time_stamps, theirs.time_stamps = stamps.copy(), stamps.copy()
    try:
        _dejitter(ours, 1, header)
        jitter_removal({1: theirs}, *_JITTER_ARGS, stream_headers={1: header})
    except Exception:  # a pyxdf whose helpers take other arguments: load_xdf, not a crash
        return False
    return bool(
        ours.time_stamps.tobytes() == theirs.time_stamps.tobytes()
        and ours.segments == theirs.segments
        and float(ours.effective_srate) == float(theirs.effective_srate)
    )


def index_stream(path: Path, xdf_id: int, options: Mapping[str, bool]) -> StreamIndex:
    """One pass over ``path``: stream ``xdf_id``'s chunks, stamps, offsets; then pyxdf's sync.

    Raises:
        Unsupported: the stream or file needs ``load_xdf`` (see the module docstring).
    """
    if _SYNC is None:
        raise Unsupported("this pyxdf has no clock sync functions to reuse")
    stream_data, xml2dict, truncate_offsets, clock_sync = _SYNC[:4]
    if path.suffix.lower() != ".xdf":
        raise Unsupported("compressed files cannot be read chunk by chunk")
    header: dict[str, Any] | None = None
    temp: Any = None
    chunks: list[_SampleChunk] = []
    # One growing buffer, not a list of pieces joined at the end (pieces + joined copy).
    stamps = array.array("d")
    with path.open("rb") as handle:
        if handle.read(len(_MAGIC)) != _MAGIC:
            raise Unsupported("no XDF signature")
        while (length := _varlen(handle)) is not None:
            tag = struct.unpack("<H", _read(handle, 2))[0]
            content = length - 2
            if tag not in _STREAM_TAGS:
                handle.seek(content, 1)
                continue
            stream_id = struct.unpack("<I", _read(handle, 4))[0]
            content -= 4
            if stream_id != xdf_id:
                handle.seek(content, 1)
                continue
            if tag == _TAG_HEADER:
                header = xml2dict(ET.fromstring(_read(handle, content).decode("utf-8", "replace")))
                # A repeated header starts the stream afresh, as in load_xdf.
                temp, chunks, stamps = stream_data(header), [], array.array("d")
                if temp.fmt not in _FORMATS:
                    raise Unsupported(f"{temp.fmt} samples are decoded by pyxdf")
                value_dtype = np.dtype(_FORMATS[temp.fmt])
            elif tag == _TAG_SAMPLES:
                if temp is None:
                    raise Unsupported("samples before the stream header")
                start = handle.tell()
                count = _varlen(handle)
                if count is None:
                    raise Unsupported("cut short")
                offset = handle.tell()
                size = content - (offset - start)
                data = _read(handle, size)
                extra = size - count * (1 + value_dtype.itemsize * temp.nchns)
                if extra < 0 or extra % 8 or extra // 8 > count:
                    raise Unsupported(f"Samples chunk at byte {start} has an odd length")
                first = extra == 8 and count > 1 and data[0] != 0
                chunk = _SampleChunk(offset, size, count, extra // 8, first)
                chunk_stamps = _decode(data, count, chunk.stamped, value_dtype, temp.nchns)[0]
                chunk_stamps = np.array(chunk_stamps, dtype=np.float64)  # contiguous, writable
                temp.last_timestamp = _fill_stamps(chunk_stamps, temp.last_timestamp, temp.tdiff)
                chunks.append(chunk)
                stamps.frombytes(chunk_stamps.data.cast("B"))
            elif tag == _TAG_CLOCK:
                clock = _read(handle, content)
                if temp is None or len(clock) < 16:
                    raise Unsupported("odd ClockOffset chunk")
                temp.clock_times.append(struct.unpack_from("<d", clock, 0)[0])
                temp.clock_values.append(struct.unpack_from("<d", clock, 8)[0])
            else:  # footer
                raw = _read(handle, content)
                if header is None:
                    raise Unsupported("footer before the stream header")
                header["footer"] = xml2dict(ET.fromstring(raw))
    if temp is None:
        raise Unsupported(f"no stream {xdf_id}")
    # A writable view: clock sync and dejitter then work in place on these 8 bytes a sample.
    temp.time_stamps = np.frombuffer(stamps, dtype=np.float64) if stamps else np.zeros(0)
    total = len(temp.time_stamps)
    # Only its length matters to pyxdf's sync (it may cut a pylsl#67 extra sample).
    temp.time_series = range(total)
    streams, headers = {xdf_id: temp}, {xdf_id: header}
    if options.get("synchronize_clocks"):
        streams = truncate_offsets(streams, headers)
        streams = clock_sync(streams, options.get("handle_clock_resets", True), *_RESET_ARGS)
    if options.get("dejitter_timestamps"):
        if not _dejitter_agrees():
            raise Unsupported("this pyxdf dejitters differently from our copy of its fit")
        _dejitter(streams[xdf_id], xdf_id, header)
    result = streams[xdf_id]
    samples = len(result.time_series)
    return StreamIndex(
        path=path,
        value_dtype=value_dtype,
        channels=temp.nchns,
        chunks=chunks,
        timestamps=np.ascontiguousarray(result.time_stamps[:samples], dtype=np.float64),
        samples=samples,
    )
