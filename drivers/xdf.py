"""Read XDF recordings (Lab Streaming Layer, LabRecorder) as self-describing streams.

Mapping rules (see docs/datasets.md, "XDF"):

* Every stream of the file is a stream, samples or not. Its id is the stream's name made
  safe (characters outside ``[A-Za-z0-9_.-]`` become ``_``, at most 64 characters);
  streams whose names give the same id all get ``-<xdf stream id>`` appended. The name
  as written stays in :attr:`Stream.name`; ``attrs`` holds ``xdf_stream_id``, ``type``
  and ``source_id``.
* Each channel is a field: its id is the channel's ``label`` from
  ``desc/channels/channel``, else ``ch0``, ``ch1``... (no label; an odd one: longer than
  64 characters, or holding a comma, a double quote or a control character; or a channel
  list that does not match ``channel_count``), made unique with ``_2``, ``_3``...; its
  unit is the channel's ``unit``; its dtype follows ``channel_format``
  (:data:`CHANNEL_FORMATS`).
* ``nominal_srate`` is the frequency (0: irregular, e.g. markers); the index is ``t``,
  seconds on the recorder's clock.

Reading: :meth:`XdfFormat.describe` walks the chunk headers itself (stream headers are
parsed, sample data is skipped), so listing is cheap; pyxdf's ``resolve_streams`` would
be as cheap but drops ``desc``, where channel labels and units live. Descriptions are
cached per (path, mtime, size). :meth:`XdfFormat.blocks` streams numeric streams of
plain ``.xdf`` files chunk by chunk (:mod:`.xdfstream`: one indexing pass, then values
decoded a block at a time, with pyxdf's own clock sync and pyxdf's dejitter (its
segments, a leaner copy of its fit) on the timestamps, so the result is
``pyxdf.load_xdf`` with :data:`LOAD_OPTIONS`, bit for bit). String streams,
``.xdfz`` files, truncated files and anything the index pass cannot decode are loaded
whole with ``pyxdf.load_xdf``.

Memory: streamed, a replay holds the stream's timestamps (8 bytes a sample, plus 40 for
the least-squares dejitter fit while it runs, once, before the first frame) and one
block of values. Loaded whole, it holds all of the stream's samples. Only metadata is
cached, never samples, and indexing passes and loads run one at a time.

A file cut short after its stream headers (a crashed recorder) is still described; its
replay yields what pyxdf recovers, then raises DataError. Python warnings raised while
pyxdf loads are logged here; pyxdf's own notes go to the ``pyxdf`` logger.
"""

from __future__ import annotations

import functools
import gzip
import io
import logging
import math
import re
import struct
import threading
import warnings
import xml.etree.ElementTree as ET
import zlib
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO

import numpy as np
import pyxdf

from ..errors import DataError, DatamuxError
from ..model import Field, Stream
from .base import Chunk
from .formats import RecordingFormat
from .xdfstream import StreamIndex, Unsupported, index_stream

__all__ = ["CHANNEL_FORMATS", "LOAD_OPTIONS", "XdfFormat"]

log = logging.getLogger(__name__)

#: Options for ``pyxdf.load_xdf``: the XDF maintainers' own defaults, spelled out so a
#: change of pyxdf's defaults cannot silently change replayed timestamps.
#:
#: * ``synchronize_clocks``: map every stream onto the recorder's clock with the stream's
#:   ClockOffset chunks; without it, streams from different hosts cannot be compared.
#: * ``handle_clock_resets``: split the offset fit where a sender's clock was reset
#:   (host restart, hot swap); otherwise one line is fitted across the jump and every
#:   timestamp after it is wrong (clock_resets.xdf is the maintainers' example).
#: * ``dejitter_timestamps``: pyxdf's default, as in the reference MATLAB importer it
#:   follows. For streams with a nominal rate it replaces the network/OS jitter of LSL
#:   stamps by a straight line per gap-free segment; irregular streams (markers) and
#:   streams declaring ``can_drop_samples`` are left alone by pyxdf itself.
LOAD_OPTIONS: Mapping[str, bool] = MappingProxyType(
    {"synchronize_clocks": True, "handle_clock_resets": True, "dejitter_timestamps": True}
)

#: XDF ``channel_format`` -> DFDS dtype name.
CHANNEL_FORMATS: Mapping[str, str] = MappingProxyType(
    {
        "float32": "f32",
        "double64": "f64",
        "int8": "i8",
        "int16": "i16",
        "int32": "i32",
        "int64": "i64",
        "string": "str",
    }
)

# warnings.catch_warnings swaps process-global state; loads run in worker threads, so
# they take turns (pyxdf's parser is pure Python and holds the GIL anyway, and one load
# at a time also bounds memory, as each holds a whole stream).
_LOAD_LOCK = threading.Lock()

_MAGIC = b"XDF:"
_TAG_STREAM_HEADER, _TAG_SAMPLES = 2, 3
_STREAM_TAGS = frozenset({2, 3, 4, 6})  # chunks that start with a 4-byte stream id
_VARLEN = {1: "<B", 4: "<I", 8: "<Q"}
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_ID_MAX = 64
# A label that would break a CSV header or a log line is replaced by chN.
_ODD_LABEL = re.compile(r'[\x00-\x1f\x7f,"]')


class _Truncated(Exception):
    """The file ends inside a chunk."""


@dataclass(frozen=True)
class _Description:
    """What one pass over the chunk headers tells about a file."""

    streams: dict[str, Stream]  # by id, in file order
    counts: dict[int, int]  # xdf stream id -> samples in complete Samples chunks
    truncated_at: int | None  # offset of the chunk the file ends inside, if any


# -- chunk walking -----------------------------------------------------------------------


def _open(path: Path) -> BinaryIO:
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    if suffixes[-1:] == [".xdfz"] or suffixes == [".xdf", ".gz"]:
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return path.open("rb")


def _read_exact(handle: BinaryIO, size: int) -> bytes:
    data = handle.read(size)
    if len(data) < size:
        raise _Truncated
    return data


def _skip(handle: BinaryIO, size: int) -> None:
    """Skip ``size`` bytes; reading the last one proves the file is that long."""
    if size > 0:
        handle.seek(size - 1, io.SEEK_CUR)
        _read_exact(handle, 1)


def _varlen(handle: BinaryIO, path: Path, at: int) -> int | None:
    """An XDF variable-length integer; None at a clean end of file."""
    width = handle.read(1)
    if not width:
        return None
    fmt = _VARLEN.get(width[0])
    if fmt is None:
        raise DataError(f"corrupt chunk at byte {at}: bad length prefix {width[0]}", file=str(path))
    return struct.unpack(fmt, _read_exact(handle, struct.calcsize(fmt)))[0]


def _stream_header(handle: BinaryIO, path: Path, at: int, size: int) -> ET.Element:
    try:
        text = _read_exact(handle, size).decode("utf-8", "replace")
    except _Truncated:
        raise DataError(
            f"the file ends inside a stream header (byte {at})", file=str(path)
        ) from None
    try:
        return ET.fromstring(text)
    except ET.ParseError as exc:
        raise DataError(f"stream header at byte {at} is not XML: {exc}", file=str(path)) from exc


def _chunk(
    handle: BinaryIO, path: Path, at: int, headers: dict[int, ET.Element], counts: dict[int, int]
) -> bool:
    """Read one chunk's header (skipping sample data); False at the end of the file."""
    length = _varlen(handle, path, at)
    if length is None:
        return False
    tag = struct.unpack("<H", _read_exact(handle, 2))[0]
    content, stream_id = length - 2, -1
    if tag in _STREAM_TAGS:
        if content < 4:
            raise DataError(f"corrupt chunk at byte {at}: too short", file=str(path))
        stream_id = struct.unpack("<I", _read_exact(handle, 4))[0]
        content -= 4
    if tag == _TAG_STREAM_HEADER:
        headers[stream_id] = _stream_header(handle, path, at, content)
    elif tag == _TAG_SAMPLES:
        before = handle.tell()
        samples = _varlen(handle, path, at)
        if samples is None:
            raise _Truncated
        _skip(handle, content - (handle.tell() - before))
        counts[stream_id] = counts.get(stream_id, 0) + samples
    elif content < 0:
        raise DataError(f"corrupt chunk at byte {at}: too short", file=str(path))
    else:
        _skip(handle, content)
    return True


def _walk(path: Path) -> tuple[dict[int, ET.Element], dict[int, int], int | None]:
    """Stream headers and sample counts by xdf stream id, and where a truncated file ends."""
    headers: dict[int, ET.Element] = {}
    counts: dict[int, int] = {}
    with _open(path) as handle:
        if handle.read(len(_MAGIC)) != _MAGIC:
            raise DataError("not an XDF file (it does not start with 'XDF:')", file=str(path))
        at, chunks = handle.tell(), 0
        try:
            while _chunk(handle, path, at, headers, counts):
                at, chunks = handle.tell(), chunks + 1
        except (_Truncated, EOFError):  # EOFError: gzip stream cut short
            return headers, counts, at
    if not chunks:
        raise DataError("no chunks after the 'XDF:' signature (empty or cut short)", file=str(path))
    return headers, counts, None


# -- stream metadata ---------------------------------------------------------------------


def _text(element: ET.Element, path: str) -> str:
    found = element.find(path)
    return (found.text or "").strip() if found is not None else ""


def _number(info: ET.Element, tag: str, path: Path, xdf_id: int) -> float:
    raw = _text(info, tag)
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise DataError(f"stream {xdf_id}: {tag} {raw!r} is not a number >= 0", file=str(path))
    return value


def _unique(candidates: list[str]) -> list[str]:
    """Make ids unique in order: ``a``, ``a_2``, ``a_3``..."""
    taken: set[str] = set()
    out = []
    for base in candidates:
        candidate, n = base, 2
        while candidate in taken:
            candidate, n = f"{base}_{n}", n + 1
        taken.add(candidate)
        out.append(candidate)
    return out


def _fields(info: ET.Element, count: int, dtype: str) -> dict[str, Field]:
    """One field per channel, labels and units from ``desc/channels/channel``."""
    channels = info.findall("desc/channels/channel")
    if len(channels) != count:
        # Labels that cannot be matched to columns would be worse than none.
        channels = [ET.Element("channel") for _ in range(count)]
    labels = [_text(ch, "label") for ch in channels]
    plain = [
        label if label and len(label) <= _ID_MAX and not _ODD_LABEL.search(label) else f"ch{i}"
        for i, label in enumerate(labels)
    ]
    return {
        field_id: Field(
            field_id,
            name=label or field_id,
            description=_text(ch, "type"),
            dtype=dtype,
            unit=_text(ch, "unit"),
        )
        for field_id, label, ch in zip(_unique(plain), labels, channels, strict=True)
    }


def _stream(info: ET.Element, xdf_id: int, path: Path) -> Stream:
    """A stream from its header (its id is set later, once all names are known)."""
    fmt = _text(info, "channel_format")
    if fmt not in CHANNEL_FORMATS:
        raise DataError(
            f"stream {xdf_id}: channel_format {fmt!r} is not one of {sorted(CHANNEL_FORMATS)}",
            file=str(path),
        )
    count = _number(info, "channel_count", path, xdf_id)
    if count != int(count):
        raise DataError(f"stream {xdf_id}: channel_count {count} is not whole", file=str(path))
    return Stream(
        id="",
        name=_text(info, "name"),
        frequency=_number(info, "nominal_srate", path, xdf_id),
        fields=_fields(info, int(count), CHANNEL_FORMATS[fmt]),
        index={"t": Field("t", name="time", dtype="f64", unit="s")},
        attrs={
            "xdf_stream_id": xdf_id,
            "type": _text(info, "type"),
            "source_id": _text(info, "source_id"),
        },
    )


def _safe_id(name: str) -> str:
    safe = _UNSAFE.sub("_", name)[:_ID_MAX]
    if safe[:1] in (".", "-"):
        safe = "_" + safe[1:]
    return safe or "stream"


def _stream_ids(names: dict[int, str]) -> dict[int, str]:
    """Safe, unique stream ids; names that clash all get ``-<xdf stream id>``."""
    bases = {xdf_id: _safe_id(name) for xdf_id, name in names.items()}
    uses = Counter(bases.values())
    ids = {xdf_id: base for xdf_id, base in bases.items() if uses[base] == 1}
    taken = set(ids.values())
    for xdf_id, base in bases.items():
        if uses[base] > 1:
            suffix, n = f"-{xdf_id}", 2
            # Only a stream literally named "<other name>-<id>" can still collide.
            while (candidate := base[: _ID_MAX - len(suffix)] + suffix) in taken:
                suffix, n = f"-{xdf_id}_{n}", n + 1
            ids[xdf_id] = candidate
            taken.add(candidate)
    return {xdf_id: ids[xdf_id] for xdf_id in names}


@functools.lru_cache(maxsize=128)
def _cached_description(path: Path, mtime_ns: int, size: int) -> _Description:
    """The description of one version of a file (the key changes when the file does)."""
    try:
        headers, counts, truncated_at = _walk(path)
    except (OSError, zlib.error) as exc:
        raise DataError(f"cannot read: {exc}", file=str(path)) from exc
    streams = {xdf_id: _stream(info, xdf_id, path) for xdf_id, info in headers.items()}
    ids = _stream_ids({xdf_id: stream.name for xdf_id, stream in streams.items()})
    by_id = {ids[xdf_id]: replace(stream, id=ids[xdf_id]) for xdf_id, stream in streams.items()}
    if truncated_at is not None:
        log.warning("%s: the file ends inside the chunk at byte %d (cut short)", path, truncated_at)
    return _Description(by_id, counts, truncated_at)


def _description(path: Path) -> _Description:
    try:
        stat = path.stat()
    except OSError as exc:
        raise DataError(f"cannot open: {exc.strerror}", file=str(path)) from exc
    return _cached_description(path, stat.st_mtime_ns, stat.st_size)


# -- samples -----------------------------------------------------------------------------


def _find(path: Path, stream: Stream, description: _Description) -> Stream:
    """The file's own description of ``stream``: by ``xdf_stream_id``, else by id."""
    raw = stream.attrs.get("xdf_stream_id")
    if raw is None:
        found = description.streams.get(stream.id)
    else:
        found = next(
            (s for s in description.streams.values() if str(s.attrs["xdf_stream_id"]) == str(raw)),
            None,
        )
    if found is None:
        wanted = repr(stream.id) if raw is None else f"xdf_stream_id {raw}"
        raise DataError(
            f"no stream {wanted}; the file has {sorted(description.streams)}", file=str(path)
        )
    return found


def _load(path: Path, xdf_id: int) -> dict[str, Any]:
    """One stream as pyxdf gives it; its Python warnings are logged, not raised."""
    with _LOAD_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            loaded, _ = pyxdf.load_xdf(str(path), select_streams=[xdf_id], **LOAD_OPTIONS)
        except MemoryError:
            raise
        except Exception as exc:  # pyxdf raises bare Exception, OSError, ParseError, struct.error
            raise DataError(
                f"pyxdf cannot read it: {type(exc).__name__}: {exc}", file=str(path)
            ) from exc
    for warning in caught:
        log.warning(
            "%s: while loading stream %d: %s: %s",
            path,
            xdf_id,
            warning.category.__name__,
            warning.message,
        )
    if len(loaded) != 1:
        raise DataError(f"pyxdf found no stream {xdf_id}", file=str(path))
    return loaded[0]


def _index(path: Path, xdf_id: int) -> StreamIndex | None:
    """The stream indexed for chunk-by-chunk replay, or None where only load_xdf will do."""
    with _LOAD_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            index = index_stream(path, xdf_id, LOAD_OPTIONS)
        except Unsupported as exc:
            log.debug("%s: stream %d is loaded whole: %s", path, xdf_id, exc)
            return None
        except (OSError, ValueError, ET.ParseError, struct.error) as exc:
            log.debug("%s: stream %d is loaded whole: %s", path, xdf_id, exc)
            return None
    for warning in caught:
        log.warning(
            "%s: while indexing stream %d: %s: %s",
            path,
            xdf_id,
            warning.category.__name__,
            warning.message,
        )
    if len(index.timestamps) > 1 and np.any(index.timestamps[1:] < index.timestamps[:-1]):
        return None  # sorting needs every value at once (see _in_time_order)
    return index


def _columns(stream: Stream, found: Stream, path: Path) -> list[int] | None:
    """Columns to keep: None for all (same channels, or as many), else by channel id."""
    wanted, have = stream.channels, found.channels
    if not wanted or len(wanted) == len(have):
        return None
    missing = [c for c in wanted if c not in have]
    if missing:
        raise DataError(f"stream {stream.id!r} has no channels {missing}", file=str(path))
    return [have.index(c) for c in wanted]


def _arrays(loaded: dict[str, Any], dtype: np.dtype, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Timestamps float64 (n,) and values (n, channels) in ``dtype`` (no copy when it fits)."""
    timestamps = np.ascontiguousarray(loaded["time_stamps"], dtype=np.float64)
    channels = int(loaded["info"]["channel_count"][0])
    try:
        # Strings arrive as a list of lists; numbers as an array already in their dtype.
        values = np.asarray(loaded["time_series"], dtype=dtype).reshape(len(timestamps), channels)
    except (TypeError, ValueError) as exc:
        raise DataError(f"values do not convert to {dtype}: {exc}", file=str(path)) from exc
    return timestamps, np.ascontiguousarray(values)


def _in_time_order(
    timestamps: np.ndarray, values: np.ndarray, path: Path, xdf_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sort by time (stably) when clock synchronisation left samples out of order."""
    if len(timestamps) < 2 or not np.any(timestamps[1:] < timestamps[:-1]):
        return timestamps, values
    # pyxdf maps each clock segment separately and assumes stamps rise within it, so a
    # reset it places slightly off can leave a few samples behind their neighbours (not
    # the case in the maintainers' clock_resets.xdf). Stable: equal stamps keep file order.
    log.warning("%s: stream %d is out of time order after clock sync; sorted", path, xdf_id)
    order = np.argsort(timestamps, kind="stable")
    return timestamps[order], values[order]


def _split(timestamps: np.ndarray, values: np.ndarray, block_bytes: int) -> Iterator[Chunk]:
    """Views of about ``block_bytes`` each."""
    row_bytes = timestamps.itemsize + values.itemsize * max(values.shape[1], 1)
    rows = max(1, block_bytes // row_bytes)
    for start in range(0, len(timestamps), rows):
        yield timestamps[start : start + rows], values[start : start + rows]


class XdfFormat(RecordingFormat):
    """XDF recordings (``.xdf``; ``.xdfz`` gzip-compressed), read with pyxdf."""

    name = "xdf"
    extensions = (".xdf", ".xdfz")
    self_describing = True
    # Decoding copies the values into each block anyway, and copying 4 MiB holds the GIL
    # for about a millisecond; with smaller blocks nearly every throughput frame (655 KB
    # at 8 ch) spans two blocks and is copied again to join them.
    min_block_bytes = 4 << 20

    def describe(self, path: Path) -> dict[str, Stream]:
        """Every stream in the file, samples or not, by id in file order.

        A file cut short after its stream headers is described (with a warning logged);
        replaying it raises DataError after the samples that could be read.

        Raises:
            DataError: the file is missing, not XDF, or a stream header is broken.
        """
        return dict(_description(path).streams)

    def sample_count(self, path: Path, stream: Stream) -> int | None:
        """Samples of ``stream`` from the chunk headers (pyxdf may drop a pylsl#67 extra)."""
        try:
            description = _description(path)
            found = _find(path, stream, description)
        except DatamuxError:
            return None  # only a progress hint; replay reports the problem itself
        return description.counts.get(found.attrs["xdf_stream_id"], 0)

    def blocks(self, path: Path, stream: Stream, block_bytes: int) -> Iterator[Chunk]:
        """Yield the stream's samples in time order, clock offsets applied.

        Raises:
            DataError: the file is broken; a file cut short raises after its samples.
        """
        description = _description(path)
        found = _find(path, stream, description)
        xdf_id = found.attrs["xdf_stream_id"]
        columns = _columns(stream, found, path)
        if description.truncated_at is None:
            index = _index(path, xdf_id)
            if index is not None:
                yield from index.blocks(block_bytes, stream.dtype, columns)
                return
        loaded = _load(path, xdf_id)
        timestamps, values = _arrays(loaded, stream.dtype, path)
        if columns is not None:
            values = values[:, columns]
        timestamps, values = _in_time_order(timestamps, values, path, xdf_id)
        yield from _split(timestamps, values, block_bytes)
        if description.truncated_at is not None:
            raise DataError(
                f"the file ends inside the chunk at byte {description.truncated_at} (cut short): "
                f"the {len(timestamps)} samples before it were read, any after it are lost",
                file=str(path),
            )
