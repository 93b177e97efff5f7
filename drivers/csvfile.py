"""Read DFDS CSV recordings in blocks: memory stays flat whatever the file size.

A recording file has a header row naming its columns; a stream reads its index column
(timestamps) and its field columns. Each block is parsed by numpy's C parser in one call,
so there is no Python work per sample.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from ..model import Stream
from .base import Chunk
from .formats import RecordingFormat
from .tables import seconds_per_unit, to_seconds

__all__ = ["CsvFormat", "CsvStreamReader", "bad_line_message", "to_seconds"]

_NUMPY_POSITION = re.compile(r" at row \d+, column \d+\.?")


def bad_line_message(
    line: str, header: list[str], columns: dict[int, np.dtype], fallback: str = ""
) -> str:
    """Why one data line of a CSV file cannot be read, in the file's own terms.

    Every parser of the file (numpy's block parser, or a faster one) reports bad lines
    through this, so a user sees one wording: "expected 4 columns, got 2" or
    "could not convert 'abc' to float64 in column 3 (y)". Columns count from 1.

    Args:
        line: the text of the line, without its line ending.
        header: the column names of the header row.
        columns: position (0-based) -> dtype of each column that is read.
        fallback: the parser's own message, used when this line looks fine on its own.
    """
    cells = line.split(",")
    if len(cells) <= max(columns, default=-1):
        return f"expected {len(header)} columns, got {len(cells)}"
    for position, dtype in sorted(columns.items()):
        cell = cells[position].strip()
        if dtype.kind == "U":
            continue
        try:
            np.array([cell]).astype(dtype)
        except (ValueError, OverflowError):
            name = header[position] if position < len(header) else "?"
            return f"could not convert {cell!r} to {dtype.name} in column {position + 1} ({name})"
    return _NUMPY_POSITION.sub("", fallback).strip() or "cannot parse this line"


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
        self._markers = self.dtype.kind == "U"
        if self._markers:
            # Quoted fields may hold newlines: never cut such a file into blocks.
            self.block_bytes = -1

    def _column_dtype(self, column: int) -> np.dtype:
        """The dtype a read column is parsed as (timestamps: float64)."""
        return np.dtype(np.float64) if column == self._index_col else self.dtype

    def _columns(self, header: str) -> tuple[int | None, list[int]]:
        names = [name.strip().strip('"') for name in header.rstrip("\r\n").split(",")]
        self._header = names
        position = {name: i for i, name in enumerate(names)}
        missing = [f for f in self.stream.fields if f not in position]
        if missing:
            raise DataError(
                f"columns {missing} of stream {self.stream.id!r} are not in the header {names}",
                file=str(self.path),
                line=1,
            )
        index_id = next(iter(self.stream.index), None)
        if index_id is not None and index_id not in position:
            # A declared time column that is not there is a broken file, not a cue to
            # invent timestamps.
            raise DataError(
                f"index column {index_id!r} of stream {self.stream.id!r} is not in the "
                f"header {names}",
                file=str(self.path),
                line=1,
            )
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
        return seconds_per_unit(self.stream, timestamps, self.path)

    def _table_dtype(self, usecols: list[int], has_index: bool) -> np.dtype:
        if self._markers:
            return np.dtype(np.str_)
        if self.dtype.kind in "iub":
            # One typed column each, so int64 values above 2**53 are read exactly.
            n_values = len(usecols) - has_index
            columns = [("t", "f8")] if has_index else []
            columns += [(f"v{i}", self.dtype) for i in range(n_values)]
            return np.dtype(columns)
        return np.dtype(np.float64)

    def _loadtxt(self, source: Any, usecols: list[int]) -> np.ndarray:
        table = np.loadtxt(
            source,
            delimiter=",",
            usecols=usecols,
            dtype=self._parse_dtype,
            ndmin=1 if self._parse_dtype.names else 2,
            comments=None,
            encoding="utf-8",
            quotechar='"' if self._markers else None,
        )
        return table

    def _split(self, table: np.ndarray, has_index: bool) -> tuple[np.ndarray | None, np.ndarray]:
        """``(raw index column or None, values (n, channels))`` of a parsed table."""
        names = table.dtype.names
        if names is None:
            return (table[:, 0].astype(np.float64), table[:, 1:]) if has_index else (None, table)
        value_names = names[1:] if has_index else names
        values = np.empty((len(table), len(value_names)), dtype=self.dtype)
        for column, name in enumerate(value_names):
            values[:, column] = table[name]
        return (table["t"].astype(np.float64) if has_index else None), values

    def _parse(
        self, text: bytes, first_line: int, usecols: list[int]
    ) -> tuple[np.ndarray | None, DataError | None]:
        """Parse a block; on a bad line, the rows before it (or None) and the error."""
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
                message = bad_line_message(
                    line.decode("utf-8", errors="replace").rstrip("\r\n"),
                    self._header,
                    {col: self._column_dtype(col) for col in usecols},
                    str(exc),
                )
                error = DataError(message, file=str(self.path), line=first_line + offset)
                if not any(ln.strip() for ln in lines[:offset]):
                    return None, error
                return self._loadtxt(io.BytesIO(b"".join(lines[:offset])), usecols), error
        error = DataError(str(block_error), file=str(self.path), line=first_line)
        return None, error

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
            # utf-8-sig: spreadsheets often start the file with a byte-order mark.
            header = handle.readline().decode("utf-8-sig", errors="replace")
            if not header.strip():
                return
            index_col, value_cols = self._columns(header)
            self._index_col = index_col
            usecols = value_cols if index_col is None else [index_col, *value_cols]
            self._parse_dtype = self._table_dtype(usecols, index_col is not None)
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
                    n = 0 if table is None else len(table)
                    if n:
                        raw_ts, values = self._split(table, index_col is not None)
                        if raw_ts is None:
                            timestamps = np.arange(row_no, row_no + n) / self.stream.frequency
                        else:
                            if scale is None:
                                scale = self._time_scale(raw_ts)
                            timestamps = to_seconds(raw_ts, scale)
                        if values.dtype != self.dtype:
                            values = values.astype(self.dtype)
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
