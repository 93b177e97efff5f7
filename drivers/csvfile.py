"""Read DFDS CSV recordings in blocks: memory stays flat whatever the file size.

A recording file has a header row naming its columns; a stream reads its index column
(timestamps) and its field columns. Each block is parsed in one call, so there is no
Python work per sample: by pandas' C parser when the ``fast-csv`` extra is installed
(about 5x faster, and it releases the GIL, so the event loop keeps running while worker
threads parse), else by numpy's. Both give the same values bit for bit and the same
errors: a block pandas refuses is parsed again by numpy (see :mod:`.csvfast`), and bad
lines are worded by :func:`bad_line_message` either way.
"""

from __future__ import annotations

import io
import os
import re
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..errors import DataError
from ..model import Stream
from . import csvfast
from .base import Chunk
from .formats import RecordingFormat
from .tables import seconds_per_unit, to_seconds

__all__ = ["CsvFormat", "CsvStreamReader", "bad_line_message", "to_seconds"]

_NUMPY_POSITION = re.compile(r" at row \d+, column \d+\.?")
# The fast parser releases the GIL, so it can take bigger blocks without stalling the
# event loop; per-call overhead makes small blocks about 1.5x slower with it.
_FAST_BLOCK_FACTOR = 4
_ENGINES = ("auto", "numpy", "pandas")
# Threads parsing blocks side by side with the fast parser (it releases the GIL).
PARSE_THREADS = min(2, os.cpu_count() or 1)


def _count_lines(text: bytes) -> int:
    """Lines in ``text``; numpy counts 3x faster than ``bytes.count`` and releases the GIL."""
    newlines = int(np.count_nonzero(np.frombuffer(text, np.uint8) == 10))
    return newlines + (not text.endswith(b"\n"))


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
        block_bytes: how much text numpy parses per block (pandas parses 4x that).
        engine: ``"auto"`` (pandas when installed, else numpy), ``"numpy"`` or
            ``"pandas"``. pandas only parses float streams; marker (text) and integer
            streams always use numpy, whose rules for them pandas does not follow
            exactly (it accepts "1.0" as an integer, for one).
    """

    def __init__(
        self, path: Path, stream: Stream, block_bytes: int = 4 << 20, *, engine: str = "auto"
    ) -> None:
        if engine not in _ENGINES:
            raise ValueError(f"engine must be one of {_ENGINES}, not {engine!r}")
        if block_bytes == 0:  # read(0) gives nothing: the file would seem empty
            raise ValueError("block_bytes must be > 0 (or < 0 for the whole file at once)")
        self.path = path
        self.stream = stream
        self.block_bytes = block_bytes
        self.dtype = stream.dtype
        self._markers = self.dtype.kind == "U"
        if self._markers:
            # Quoted fields may hold newlines: never cut such a file into blocks.
            self.block_bytes = -1
        self._fast = self.dtype.kind == "f" and (
            engine == "pandas" or (engine == "auto" and csvfast.available())
        )
        if self._fast:
            if not csvfast.available():
                raise ValueError("engine='pandas' needs pandas >= 3 (the fast-csv extra)")
            self.block_bytes = block_bytes * _FAST_BLOCK_FACTOR

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
            columns: list[tuple[str, Any]] = [("t", "f8")] if has_index else []
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
        """``(raw index column or None, values (n, channels))`` of a parsed table, each
        C-contiguous and the values in the stream's dtype."""
        names = table.dtype.names
        if names is None:
            values = table[:, 1:] if has_index else table
            # One copy at most: cast and make contiguous together.
            values = np.asarray(values, dtype=self.dtype, order="C")
            return (np.ascontiguousarray(table[:, 0], np.float64) if has_index else None), values
        value_names = names[1:] if has_index else names
        values = np.empty((len(table), len(value_names)), dtype=self.dtype)
        for column, name in enumerate(value_names):
            values[:, column] = table[name]
        return (table["t"].astype(np.float64) if has_index else None), values

    def _read_block(
        self, text: bytes, first_line: int, usecols: list[int], n_lines: int, has_index: bool
    ) -> tuple[np.ndarray | None, np.ndarray, DataError | None]:
        """``(raw index column or None, values, error or None)`` of one block."""
        if self._fast:
            width = self._fast_width
            columns = csvfast.parse_floats(text, usecols, n_lines, width)
            if columns is not None and (width is not None or self._widths_match(text, n_lines)):
                return *self._from_columns(columns, has_index), None
        # numpy's parse: every block the fast parser refuses, and the exact bad line.
        table, error = self._parse(text, first_line, usecols, n_lines)
        if table is None:
            return None, np.empty((0, len(self.stream.fields)), self.dtype), error
        return *self._split(table, has_index), error

    def _parse(
        self, text: bytes, first_line: int, usecols: list[int], n_lines: int
    ) -> tuple[np.ndarray | None, DataError | None]:
        """Parse a block of ``n_lines`` lines; on a bad line, the rows before it and the error."""
        table: np.ndarray | None = None
        block_error: ValueError | None = None
        # Bytes, not str: numpy parses a byte stream about 3x faster, and a StringIO
        # would hold the block as 4-byte characters.
        try:
            table = self._loadtxt(io.BytesIO(text), usecols)
        except ValueError as exc:
            block_error = exc
        if table is not None:
            return self._check_widths(text, first_line, usecols, table)
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

    def _from_columns(
        self, columns: list[np.ndarray], has_index: bool
    ) -> tuple[np.ndarray | None, np.ndarray]:
        """``(raw index column or None, values (n, channels))`` from float64 columns: each
        column is cast straight into its place, one pass, no 2-D float64 table between."""
        fields = columns[1:] if has_index else columns
        values = np.empty((len(columns[0]), len(fields)), dtype=self.dtype)
        for position, column in enumerate(fields):
            values[:, position] = column
        return (columns[0] if has_index else None), values

    def _widths_match(self, text: bytes, rows: int) -> bool:
        """Whether every one of the ``rows`` lines has the header's number of cells.

        Both parsers skip columns they are not asked for (and pandas pads short rows),
        so a shifted row would pass unseen: the commas are counted.
        """
        commas = int(np.count_nonzero(np.frombuffer(text, np.uint8) == 44))
        return commas == (len(self._header) - 1) * rows

    def _check_widths(
        self, text: bytes, first_line: int, usecols: list[int], table: np.ndarray
    ) -> tuple[np.ndarray | None, DataError | None]:
        """Both parsers skip columns they are not asked for, so a row with too many cells
        (a shifted row) would pass unseen: count the commas, and on a mismatch find the
        line. Marker streams are left out (quoted text may hold commas)."""
        if self._markers or self._widths_match(text, len(table)):
            return table, None
        lines = text.splitlines()
        for offset, line in enumerate(lines):
            cells = line.count(b",") + 1
            if line.strip() and cells != len(self._header):
                error = DataError(
                    f"expected {len(self._header)} columns, got {cells}",
                    file=str(self.path),
                    line=first_line + offset,
                )
                if not any(ln.strip() for ln in lines[:offset]):
                    return None, error
                return self._loadtxt(io.BytesIO(b"\n".join(lines[:offset])), usecols), error
        return table, None

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
                # Not an empty recording (that has its header): a file cut short or
                # never written. Zero frames and success would hide it.
                raise DataError(
                    "the file is empty: no header row (a recording has a header naming "
                    "its columns, then one row per sample)",
                    file=str(self.path),
                    line=1,
                )
            index_col, value_cols = self._columns(header)
            self._index_col = index_col
            usecols = value_cols if index_col is None else [index_col, *value_cols]
            self._parse_dtype = self._table_dtype(usecols, index_col is not None)
            # Reading every column, pandas checks each line's width itself.
            width = len(self._header)
            self._fast_width = width if sorted(set(usecols)) == list(range(width)) else None
            row_no, scale = 0, None
            has_index = index_col is not None
            for raw_ts, values, error in self._parsed(self._texts(handle), usecols, has_index):
                n = len(values)
                if n:
                    if raw_ts is None:
                        timestamps = np.arange(row_no, row_no + n) / self.stream.frequency
                    else:
                        if scale is None:
                            scale = self._time_scale(raw_ts)
                        timestamps = to_seconds(raw_ts, scale)
                    yield timestamps, values
                if error is not None:
                    raise error
                row_no += n

    def _texts(self, handle: BinaryIO) -> Iterator[tuple[bytes, int, int]]:
        """``(text, first line number, line count)`` of each block of whole lines."""
        line_no = 2
        for text in self._whole_lines(handle):
            if not text.isspace():
                lines = _count_lines(text)
                yield text, line_no, lines
                line_no += lines

    def _whole_lines(self, handle: BinaryIO) -> Iterator[bytes]:
        """The rest of the file in blocks of about ``block_bytes`` that end with a line.

        Each block ends at its last newline and the file is sought back to just after it,
        so the next read starts a line: no joining of a partial line with the next read,
        which cost more than the read itself. ``block_bytes < 0``: all of it in one block.
        """
        while True:
            text = handle.read(self.block_bytes)
            if not text:
                return
            while self.block_bytes >= 0 and not text.endswith(b"\n"):
                cut = text.rfind(b"\n") + 1
                if cut:
                    handle.seek(cut - len(text), io.SEEK_CUR)
                    text = text[:cut]
                    break
                more = handle.read(self.block_bytes)  # a line longer than a block
                if not more:
                    break  # the last line, without a newline
                text += more
            yield text

    def _parsed(
        self, texts: Iterator[tuple[bytes, int, int]], usecols: list[int], has_index: bool
    ) -> Iterator[tuple[np.ndarray | None, np.ndarray, DataError | None]]:
        """:meth:`_read_block` of each block, in order; in parallel with the fast parser."""
        if not self._fast or PARSE_THREADS < 2:
            for text, first_line, lines in texts:
                yield self._read_block(text, first_line, usecols, lines, has_index)
            return
        # pandas releases the GIL, so blocks parse side by side on several cores; at most
        # PARSE_THREADS blocks are in flight, so memory stays a few blocks.
        with ThreadPoolExecutor(PARSE_THREADS, thread_name_prefix="csv-parse") as pool:
            pending: deque[Future[tuple[np.ndarray | None, np.ndarray, DataError | None]]]
            pending = deque()
            try:
                for text, first_line, lines in texts:
                    args = (text, first_line, usecols, lines, has_index)
                    pending.append(pool.submit(self._read_block, *args))
                    if len(pending) >= PARSE_THREADS:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:
                for future in pending:
                    future.cancel()


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
