"""Read EDF, EDF+, BDF and BDF+ recordings (pyedflib) as self-describing streams.

Mapping rules:

* Signals are grouped by sample rate: the signals of one rate form one stream, channels
  in file order. With one rate the stream is ``signals``; with several each is
  ``signals_<rate>hz``, the rate written in full with ``p`` for the point
  (256 Hz -> ``signals_256hz``, 0.5 Hz -> ``signals_0p5hz``).
* Each signal is a field: its id is the label made safe (characters outside
  ``[A-Za-z0-9_.-]`` become ``_``) and unique (``Fp1``, ``Fp1_2``...); its name is the
  label as written; its unit is the physical dimension; its dtype is ``f64`` (physical
  values, see :data:`SIGNAL_DTYPE`).
* EDF+/BDF+ annotations, when the file has any, form the irregular stream
  ``annotations``: one ``str`` channel ``text`` per onset, in onset order. Annotation
  durations are dropped (a marker stream is one array of strings). The annotation
  signals themselves ("EDF Annotations") never appear among the signal streams.
* Stream attrs: ``format`` (``edf`` or ``bdf``), ``startdate`` (the header's start, ISO
  8601, no time zone) and, when not empty, ``patient`` and ``recording`` (the header's
  identification lines; for EDF+ the known subfields joined by spaces, "X" left out).

Time base: EDF stores a local clock reading with no time zone, so the start is read as
UTC. Sample ``i`` of a stream at ``rate`` Hz is at ``start + i / rate`` seconds since the
Unix epoch; an annotation is at ``start + onset``. The start includes the EDF+ sub-second
offset. pyedflib refuses EDF+D (discontinuous) files, so they are a DataError.

Memory stays flat: values are read a block at a time with one ``readSignal`` call per
channel (physical values from edflib's C code), never one Python step per sample.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyedflib

from ..errors import DataError
from ..model import Field, Stream
from .base import Chunk
from .formats import RecordingFormat

__all__ = ["ANNOTATIONS", "SIGNAL_DTYPE", "EdfFormat"]

#: Physical values are float64. edflib computes them in double precision as
#: ``bitvalue * (offset + digital)`` with an arbitrary real ``bitvalue``; float32 would round
#: them to 24 bits, which for BDF's 24-bit samples is as coarse as the ADC step itself, so
#: neighbouring levels could merge. float64 keeps exactly what edflib returns.
SIGNAL_DTYPE = "f64"
#: The id of the annotation stream of EDF+/BDF+ files.
ANNOTATIONS = "annotations"

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
# edflib counts time in units of 100 ns (sub-second start, annotation onsets).
_TIME_UNITS_PER_S = 10_000_000
_BDF_TYPES = {pyedflib.FILETYPE_BDF, pyedflib.FILETYPE_BDFPLUS}
_PLUS_TYPES = {pyedflib.FILETYPE_EDFPLUS, pyedflib.FILETYPE_BDFPLUS}
_PATIENT_FIELDS = ("patientcode", "sex", "birthdate", "patientname", "patient_additional")
_RECORDING_FIELDS = ("admincode", "technician", "equipment", "recording_additional")


def _text(raw: bytes | str) -> str:
    """A header string: UTF-8, else Latin-1 (old files), trailing padding removed."""
    # Decoded here, not by pyedflib's getters: they warnings.warn() on non-UTF-8 text, and
    # silencing warnings is process-global, so not safe in replay's worker threads.
    if isinstance(raw, str):
        return raw.strip()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return text.strip()


def _open(path: Path) -> pyedflib.EdfReader:
    """Open ``path`` for reading; a missing, truncated or foreign file is a DataError."""
    try:
        return pyedflib.EdfReader(str(path))
    except OSError as exc:
        # pyedflib's message starts with the file name, which DataError adds already.
        message = str(exc).removeprefix(f"{path}: ")
        raise DataError(f"not a readable EDF/BDF file: {message}", file=str(path)) from exc


def _field_ids(labels: list[str]) -> list[str]:
    """Field ids for signal labels, in file order: unique, and valid ids.

    Valid means ``[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}``, like every id here (ids end up in
    MQTT topics and file names).
    """
    ids: list[str] = []
    taken: set[str] = set()
    for number, label in enumerate(labels):
        base = _UNSAFE.sub("_", label).lstrip(".-")[:60] or f"ch{number}"
        candidate, suffix = base, 2
        while candidate in taken:
            candidate, suffix = f"{base}_{suffix}", suffix + 1
        taken.add(candidate)
        ids.append(candidate)
    return ids


def _rate_decimal(rate: float) -> str:
    """The shortest decimal that reads back as ``rate`` (256.0 -> "256", 0.5 -> "0.5")."""
    return np.format_float_positional(rate, trim="-")


def _rate_text(rate: float) -> str:
    """A rate as an id part: distinct rates give distinct ids, ``p`` for the point."""
    return _rate_decimal(rate).replace(".", "p")


def _signal_groups(reader: pyedflib.EdfReader) -> dict[str, list[int]]:
    """Stream id -> signal numbers, one stream per sample rate, rates in file order."""
    by_rate: dict[float, list[int]] = {}
    for chn in range(reader.signals_in_file):
        by_rate.setdefault(float(reader.samplefrequency(chn)), []).append(chn)
    if len(by_rate) == 1:
        return {"signals": next(iter(by_rate.values()))}
    return {f"signals_{_rate_text(rate)}hz": chns for rate, chns in by_rate.items()}


def _start(reader: pyedflib.EdfReader) -> datetime:
    """The header's start as a naive datetime (EDF has no zone), to the microsecond."""
    # Not getStartdatetime(): it scales the 100 ns sub-second count as if it were ns.
    subsecond = int(getattr(reader, "starttime_subsecond", 0) or 0)
    return datetime(
        reader.startdate_year,
        reader.startdate_month,
        reader.startdate_day,
        reader.starttime_hour,
        reader.starttime_minute,
        reader.starttime_second,
        subsecond // 10,
    )


def _start_epoch(reader: pyedflib.EdfReader) -> float:
    """The start in Unix seconds, the header's clock read as UTC."""
    start = _start(reader).replace(microsecond=0, tzinfo=UTC)
    subsecond = int(getattr(reader, "starttime_subsecond", 0) or 0)
    return start.timestamp() + subsecond / _TIME_UNITS_PER_S


def _identification(reader: pyedflib.EdfReader, raw: str, subfields: tuple[str, ...]) -> str:
    """An identification line: EDF's raw line, else EDF+'s subfields (edflib splits them)."""
    line = _text(getattr(reader, raw, b""))
    if line:
        return line
    parts = (_text(getattr(reader, name, b"")) for name in subfields)
    # EDF+ writes "X" for an unknown subfield: leave those out.
    return " ".join(part for part in parts if part and part != "X")


def _attrs(reader: pyedflib.EdfReader) -> dict[str, str]:
    attrs = {"format": "bdf" if reader.filetype in _BDF_TYPES else "edf"}
    patient = _identification(reader, "patient", _PATIENT_FIELDS)
    recording = _identification(reader, "recording", _RECORDING_FIELDS)
    if patient:
        attrs["patient"] = patient
    if recording:
        attrs["recording"] = recording
    attrs["startdate"] = _start(reader).isoformat()
    return attrs


def _time_index() -> dict[str, Field]:
    return {
        "t": Field(
            "t",
            name="time",
            description="seconds since the Unix epoch (EDF start time read as UTC)",
            dtype="f64",
            unit="s",
        )
    }


def _signal_ids(reader: pyedflib.EdfReader) -> list[str]:
    """The field id of every signal, in file order (ids are unique across the file)."""
    return _field_ids([_text(reader.signal_label(c)) for c in range(reader.signals_in_file)])


def _signal_stream(
    reader: pyedflib.EdfReader,
    stream_id: str,
    chns: list[int],
    ids: list[str],
    attrs: dict[str, str],
) -> Stream:
    fields = {
        ids[c]: Field(
            ids[c],
            name=_text(reader.signal_label(c)),
            description=_text(reader.transducer(c)),
            dtype=SIGNAL_DTYPE,
            unit=_text(reader.physical_dimension(c)),
        )
        for c in chns
    }
    units = {f.unit for f in fields.values()}
    rate = float(reader.samplefrequency(chns[0]))
    return Stream(
        id=stream_id,
        name=f"Signals at {_rate_decimal(rate)} Hz",
        description=f"{len(chns)} signal(s) sampled at {_rate_decimal(rate)} Hz",
        unit=units.pop() if len(units) == 1 else "",
        frequency=rate,
        fields=fields,
        index=_time_index(),
        attrs=attrs,
    )


def _annotation_stream(attrs: dict[str, str]) -> Stream:
    return Stream(
        id=ANNOTATIONS,
        name="Annotations",
        description="EDF+/BDF+ annotations at their onsets (durations are not kept)",
        frequency=0.0,
        fields={"text": Field("text", name="text", dtype="str")},
        index=_time_index(),
        attrs=attrs,
    )


def _annotations(reader: pyedflib.EdfReader, start: float) -> tuple[np.ndarray, np.ndarray]:
    """``(times (n,), texts (n, 1))`` of every annotation, in onset order."""
    # read_annotation() gives raw rows [onset in 100 ns, duration, text bytes]; its
    # wrapper readAnnotations() would warn on non-UTF-8 text (see _text).
    rows = reader.read_annotation()
    onsets = np.array([float(row[0]) for row in rows], dtype=np.float64)
    texts = np.array([_text(row[2]) for row in rows], dtype=np.str_)
    order = np.argsort(onsets, kind="stable")
    times = start + onsets[order] / _TIME_UNITS_PER_S
    return times, texts[order].reshape(-1, 1)


class EdfFormat(RecordingFormat):
    """EDF, EDF+, BDF and BDF+ recordings: signal streams by rate, plus annotations."""

    name = "edf"
    extensions = (".edf", ".bdf")
    self_describing = True

    def describe(self, path: Path) -> dict[str, Stream]:
        """The streams of one file: ``signals`` (or one per rate) and ``annotations``.

        Raises:
            DataError: the file is missing, truncated or not EDF/BDF.
        """
        reader = _open(path)
        try:
            attrs, ids = _attrs(reader), _signal_ids(reader)
            streams = {
                stream_id: _signal_stream(reader, stream_id, chns, ids, attrs)
                for stream_id, chns in _signal_groups(reader).items()
            }
            if reader.filetype in _PLUS_TYPES and reader.annotations_in_file > 0:
                streams[ANNOTATIONS] = _annotation_stream(attrs)
        finally:
            reader.close()
        return streams

    def blocks(self, path: Path, stream: Stream, block_bytes: int) -> Iterator[Chunk]:
        """Yield ``(timestamps, values)`` blocks of ``stream`` (see the module docstring).

        Raises:
            DataError: the file cannot be read, or has no such stream or channel.
        """
        reader = _open(path)
        try:
            if stream.id == ANNOTATIONS:
                yield from self._annotation_blocks(reader, block_bytes)
            else:
                yield from self._signal_blocks(path, reader, stream, block_bytes)
        finally:
            # Also runs when the consumer stops early (generator close or collection).
            reader.close()

    def sample_count(self, path: Path, stream: Stream) -> int | None:
        """Samples of ``stream`` in the file, from the header (for progress)."""
        reader = _open(path)
        try:
            if stream.id == ANNOTATIONS:
                return int(reader.annotations_in_file)
            return int(reader.samples_in_file(self._channels(path, reader, stream)[0]))
        finally:
            reader.close()

    @staticmethod
    def _channels(path: Path, reader: pyedflib.EdfReader, stream: Stream) -> list[int]:
        """The signal numbers of ``stream``'s fields, in field order."""
        groups = _signal_groups(reader)
        if stream.id not in groups:
            raise DataError(
                f"no stream {stream.id!r} in the file; it has {sorted(groups)}", file=str(path)
            )
        ids = _signal_ids(reader)
        position = {ids[c]: c for c in groups[stream.id]}
        wanted = list(stream.fields) or list(position)
        missing = [f for f in wanted if f not in position]
        if missing:
            raise DataError(
                f"stream {stream.id!r} has no channels {missing}; it has {list(position)}",
                file=str(path),
            )
        return [position[f] for f in wanted]

    @staticmethod
    def _signal_blocks(
        path: Path, reader: pyedflib.EdfReader, stream: Stream, block_bytes: int
    ) -> Iterator[Chunk]:
        chns = EdfFormat._channels(path, reader, stream)
        rate = float(reader.samplefrequency(chns[0]))
        total = int(reader.samples_in_file(chns[0]))
        start = _start_epoch(reader)
        dtype = stream.dtype  # f64 as described; a hand-written f32 is honoured
        # Bytes per row as read: one float64 per channel plus the timestamp.
        rows = max(1, block_bytes // (8 * (len(chns) + 1)))
        for first in range(0, total, rows):
            # Never ask past the end: pyedflib would print a complaint to stdout.
            n = min(rows, total - first)
            values = np.empty((n, len(chns)), dtype=dtype)
            try:
                for column, chn in enumerate(chns):
                    values[:, column] = reader.readSignal(chn, first, n)
            except OSError as exc:  # the file changed or broke under us
                raise DataError(
                    f"cannot read samples {first}..{first + n}: {exc}", file=str(path)
                ) from exc
            timestamps = start + np.arange(first, first + n, dtype=np.float64) / rate
            yield timestamps, values

    @staticmethod
    def _annotation_blocks(reader: pyedflib.EdfReader, block_bytes: int) -> Iterator[Chunk]:
        # edflib holds every annotation in memory already; we only cut them into blocks.
        times, texts = _annotations(reader, _start_epoch(reader))
        row_bytes = 8 + max(texts.dtype.itemsize, 1)
        rows = max(1, block_bytes // row_bytes)
        for first in range(0, len(times), rows):
            yield times[first : first + rows], texts[first : first + rows]
