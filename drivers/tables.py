"""Turn named columns (CSV, HDF5 fields, Parquet columns) into replay chunks.

One stream reads its index column (time) and its field columns by name from a table
that may hold the columns of every stream. Shared by every columnar format so that
"which column is time" and "what unit is it in" have one answer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..model import Stream
from .base import Chunk

__all__ = ["TIME_UNITS", "ColumnPicker", "seconds_per_unit", "to_seconds"]

# Seconds per unit of a declared index column.
TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_UNITS_PER_SECOND = {1e-3: 1e3, 1e-6: 1e6, 1e-9: 1e9}


def to_seconds(raw: np.ndarray, scale: float) -> np.ndarray:
    """Index values in seconds, ``scale`` being seconds per unit.

    Dividing by units per second, not multiplying by ``scale``: 1001 ms is then the
    float closest to 1.001 (1001 * 0.001 is 1.0010000000000001), so ``--rows`` and
    every consumer see the timestamps the file has.
    """
    if scale == 1.0:
        return raw
    per_second = _UNITS_PER_SECOND.get(scale)
    return raw / per_second if per_second is not None else raw * scale


def seconds_per_unit(stream: Stream, raw: np.ndarray, file: Path | str) -> float:
    """Seconds per index unit: the declared ``unit``, else inferred from the rate.

    Without a unit (upstream's collections declare none), the unit (s, ms, us or ns)
    that makes the median spacing of the first values match ``frequency`` is chosen,
    as upstream does from its first two values.

    Raises:
        DataError: a declared unit that is not a time unit.
    """
    index_field = next(iter(stream.index.values()), None)
    if index_field is not None and index_field.unit:
        if index_field.unit not in TIME_UNITS:
            raise DataError(
                f"index unit {index_field.unit!r} is not one of {sorted(TIME_UNITS)}",
                file=str(file),
            )
        return TIME_UNITS[index_field.unit]
    if stream.frequency > 0 and len(raw) > 1:
        step = float(np.median(np.diff(raw[:1024].astype(np.float64))))
        if step > 0:
            expected = 1.0 / stream.frequency
            return min(TIME_UNITS.values(), key=lambda s: abs(math.log(step * s / expected)))
    return 1.0


class ColumnPicker:
    """The columns one stream reads from a table, and how they become a chunk.

    Args:
        stream: the stream's metadata (``fields``, first ``index`` entry, ``frequency``).
        available: the table's column names.
        file: the file, for error messages.

    Raises:
        DataError: a field or the declared index is missing, or there is neither an
            index nor a frequency to make timestamps from.
    """

    def __init__(self, stream: Stream, available: Sequence[str], file: Path | str) -> None:
        self.stream, self.file = stream, str(file)
        missing = [f for f in stream.fields if f not in available]
        if missing:
            raise DataError(
                f"columns {missing} of stream {stream.id!r} are not in the file; it has "
                f"{list(available)}",
                file=self.file,
            )
        self.index = next(iter(stream.index), None)
        if self.index is not None and self.index not in available:
            raise DataError(
                f"index column {self.index!r} of stream {stream.id!r} is not in the file; "
                f"it has {list(available)}",
                file=self.file,
            )
        if self.index is None and stream.frequency <= 0:
            raise DataError(
                f"stream {stream.id!r} has no index column and no frequency to "
                "synthesise timestamps from",
                file=self.file,
            )
        self.fields = list(stream.fields)
        self.columns = ([self.index] if self.index else []) + self.fields
        self.dtype = stream.dtype
        self._scale: float | None = None
        self._rows = 0

    def chunk(self, columns: Mapping[str, np.ndarray]) -> Chunk:
        """``(timestamps float64 seconds, values (n, channels))`` from one slice."""
        n = len(columns[self.columns[0]])
        if self.index is None:
            timestamps = np.arange(self._rows, self._rows + n) / self.stream.frequency
        else:
            raw = np.asarray(columns[self.index])
            if self._scale is None:
                self._scale = seconds_per_unit(self.stream, raw, self.file)
            timestamps = to_seconds(raw.astype(np.float64), self._scale)
        if self.dtype.kind == "U":  # markers: the width comes from the longest text
            values = np.column_stack([np.asarray(columns[f], dtype=np.str_) for f in self.fields])
        else:
            values = np.empty((n, len(self.fields)), dtype=self.dtype)
            for column, name in enumerate(self.fields):
                values[:, column] = columns[name]
        self._rows += n
        return np.ascontiguousarray(timestamps), values
