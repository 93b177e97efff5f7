"""Read Parquet recordings (``parquet://``) in batches, with flat memory.

As upstream writes them: one file per recording, named by the pattern's template plus
``.parquet``, holding the columns of every stream of the collection; a stream reads its
index and field columns by name. Only those columns are read, page by page through a
1 MiB buffer, so memory stays flat whatever the file and row-group sizes. Needs pyarrow
(``[parquet]`` extra).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import DataError
from ..model import Stream
from .base import Chunk
from .formats import RecordingFormat
from .tables import ColumnPicker

__all__ = ["ParquetFormat"]


# Read column chunks through a buffer of this size instead of whole: without it pyarrow
# loads a row group's column chunks at once, and its memory pool keeps growing with the
# file (bench/upstream.py measured 1.3 GB peak for a 1.1 GB file, 190 MB with it).
_READ_BUFFER_BYTES = 1 << 20


def _open(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path, buffer_size=_READ_BUFFER_BYTES, pre_buffer=False)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"not a readable Parquet file: {exc}", file=str(path)) from exc


def _column(batch: pa.RecordBatch, name: str, path: Path) -> np.ndarray:
    column = batch.column(name)
    if column.null_count:
        raise DataError(f"column {name!r} has empty (null) values", file=str(path))
    return column.to_numpy(zero_copy_only=False)


class ParquetFormat(RecordingFormat):
    """Upstream's ``parquet://`` collections: one Parquet file per recording."""

    name = "parquet"
    extensions = (".parquet",)

    def blocks(self, path: Path, stream: Stream, block_bytes: int) -> Iterator[Chunk]:
        handle = _open(path)
        try:
            picker = ColumnPicker(stream, handle.schema_arrow.names, path)
            row_bytes = 8 * len(picker.columns)
            rows = max(1, block_bytes // row_bytes)
            try:
                for batch in handle.iter_batches(batch_size=rows, columns=picker.columns):
                    yield picker.chunk({c: _column(batch, c, path) for c in picker.columns})
            except (OSError, pa.ArrowException) as exc:
                raise DataError(f"cannot read: {exc}", file=str(path)) from exc
        finally:
            handle.close()

    def sample_count(self, path: Path, stream: Stream) -> int | None:
        handle = _open(path)
        try:
            return int(handle.metadata.num_rows)
        finally:
            handle.close()
