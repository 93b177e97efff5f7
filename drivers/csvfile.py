"""Read DFDS CSV recordings in blocks: memory stays flat whatever the file size.

A recording file has a header row naming its columns; a stream reads its index column
(timestamps) and its field columns. Each block is parsed by numpy's C parser in one call,
so there is no Python work per sample.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from ..model import Stream
from .base import Chunk
from .formats import RecordingFormat

__all__ = ["CsvFormat", "CsvStreamReader"]

# Seconds per unit of a declared index column.
_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


class CsvStreamReader:
    """Blocks of ``(timestamps[s], values)`` for one stream of one CSV recording.

    Args:
        path: the recording file.
        stream: the stream's metadata: ``fields`` name the value columns, the first
            ``index`` entry names the time column (its ``unit`` is s, ms, us or ns).
        block_bytes: how much text to parse per block.
    """

    def __init__(self, path: Path, stream: Stream, block_bytes: int = 4 << 20) -> None:
        self.path = path
        self.stream = stream
        self.block_bytes = block_bytes
        self.dtype = stream.dtype
        self._parse_dtype = np.str_ if self.dtype.kind == "U" else np.float64

    def _columns(self, header: str) -> tuple[int | None, list[int]]:
        names = [name.strip().strip('"') for name in header.rstrip("\r\n").split(",")]
        position = {name: i for i, name in enumerate(names)}
        missing = [f for f in self.stream.fields if f not in position]
        if missing:
            raise DataError(
                f"columns {missing} of stream {self.stream.id!r} are not in the header {names}",
                file=str(self.path),
                line=1,
            )
        index_id = next(iter(self.stream.index), None)
        index_col = position.get(index_id) if index_id is not None else None
        if index_col is None and self.stream.frequency <= 0:
            raise DataError(
                f"stream {self.stream.id!r} has no index column and no frequency to "
                "synthesise timestamps from",
                file=str(self.path),
                line=1,
            )
        return index_col, [position[f] for f in self.stream.fields]

    def _time_scale(self, timestamps: np.ndarray) -> float:
        """Seconds per index unit: declared, else inferred from the nominal rate."""
        index_field = next(iter(self.stream.index.values()), None)
        if index_field is not None and index_field.unit:
            if index_field.unit not in _TIME_UNITS:
                raise DataError(
                    f"index unit {index_field.unit!r} is not one of {sorted(_TIME_UNITS)}",
                    file=str(self.path),
                )
            return _TIME_UNITS[index_field.unit]
        if self.stream.frequency > 0 and len(timestamps) > 1:
            step = float(np.median(np.diff(timestamps)))
            if step > 0:
                # Undeclared unit: pick the one that makes the spacing match the rate.
                expected = 1.0 / self.stream.frequency
                return min(_TIME_UNITS.values(), key=lambda s: abs(math.log(step * s / expected)))
        return 1.0

    def _loadtxt(self, source: Any, usecols: list[int]) -> np.ndarray:
        return np.loadtxt(
            source,
            delimiter=",",
            usecols=usecols,
            dtype=self._parse_dtype,
            ndmin=2,
            comments=None,
            encoding="utf-8",
        )

    def _parse(
        self, text: bytes, first_line: int, usecols: list[int]
    ) -> tuple[np.ndarray, DataError | None]:
        """Parse a block; on a bad line, the rows before it and the error naming it."""
        # Bytes, not str: numpy parses a byte stream about 3x faster, and a StringIO
        # would hold the block as 4-byte characters.
        try:
            return self._loadtxt(io.BytesIO(text), usecols), None
        except ValueError as exc:
            block_error = exc
        # Slow path, errors only: find the exact bad line so the message can name it.
        lines = text.splitlines(keepends=True)
        for offset, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                self._loadtxt(io.BytesIO(line), usecols)
            except ValueError as exc:
                error = DataError(str(exc), file=str(self.path), line=first_line + offset)
                if not any(ln.strip() for ln in lines[:offset]):
                    return np.empty((0, len(usecols)), dtype=self._parse_dtype), error
                return self._loadtxt(io.BytesIO(b"".join(lines[:offset])), usecols), error
        error = DataError(str(block_error), file=str(self.path), line=first_line)
        return np.empty((0, len(usecols)), dtype=self._parse_dtype), error

    def blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(timestamps float64 (n,), values (n, channels))`` blocks in file order.

        Raises:
            DataError: the file cannot be opened, a column is missing or a line is bad.
                Blocks before the bad line have already been yielded.
        """
        try:
            handle = self.path.open("rb")
        except OSError as exc:
            raise DataError(f"cannot open: {exc.strerror}", file=str(self.path)) from exc
        with handle:
            header = handle.readline().decode("utf-8", errors="replace")
            if not header.strip():
                return
            index_col, value_cols = self._columns(header)
            usecols = value_cols if index_col is None else [index_col, *value_cols]
            line_no, row_no, scale, rest = 2, 0, None, b""
            while True:
                raw = handle.read(self.block_bytes)
                buffer = rest + raw
                if not raw:
                    text, rest = buffer, b""
                else:
                    cut = buffer.rfind(b"\n") + 1
                    text, rest = buffer[:cut], buffer[cut:]
                if text.strip():
                    table, error = self._parse(text, line_no, usecols)
                    n = len(table)
                    if index_col is None:
                        timestamps = np.arange(row_no, row_no + n) / self.stream.frequency
                        values = table
                    else:
                        raw_ts = table[:, 0].astype(np.float64)
                        if scale is None:
                            scale = self._time_scale(raw_ts)
                        timestamps = raw_ts * scale if scale != 1.0 else raw_ts
                        values = table[:, 1:]
                    if values.dtype != self.dtype:
                        values = values.astype(self.dtype)
                    if n:
                        yield np.ascontiguousarray(timestamps), np.ascontiguousarray(values)
                    if error is not None:
                        raise error
                    row_no += n
                    line_no += text.count(b"\n")
                if not raw:
                    return


class CsvFormat(RecordingFormat):
    """DFDS CSV recordings: a header row, then one row per sample."""

    name = "csv"
    extensions = (".csv",)

    def blocks(self, path: Path, stream: Stream, block_bytes: int) -> Iterator[Chunk]:
        return CsvStreamReader(path, stream, block_bytes).blocks()

    def sample_count(self, path: Path, stream: Stream) -> int | None:
        """Rows after the header (a newline count: quoted multi-line markers count more)."""
        with path.open("rb") as handle:
            newlines = sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))
        return max(newlines - 1, 0)
