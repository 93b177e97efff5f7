"""Read upstream DFDS HDF5 recordings (``h5://``) in slices: memory stays flat.

As upstream writes them: one ``data.h5`` per collection, one dataset per recording,
named by the pattern's template (``S1_task_1back_center``). A dataset is a structured
array with one field per column, the columns of every stream of the collection; a
stream reads its index and field columns by name. Needs h5py (``[hdf5]`` extra).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import h5py

from ..errors import DataError, InvalidRequest
from ..model import Stream
from .base import Chunk
from .formats import RecordingFormat
from .tables import ColumnPicker

__all__ = ["Hdf5Format"]


def _open(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"not a readable HDF5 file: {exc}", file=str(path)) from exc


class Hdf5Format(RecordingFormat):
    """Upstream's ``h5://`` collections: every recording a dataset of ``data.h5``."""

    name = "h5"
    extensions = (".h5", ".hdf5")
    container = "data.h5"

    def datasets(self, path: Path) -> list[str]:
        """Every dataset in the file, by its path inside it (``"S1_task"``, ``"a/b"``)."""
        names: list[str] = []
        with _open(path) as handle:
            handle.visititems(
                lambda name, item: names.append(name) if isinstance(item, h5py.Dataset) else None
            )
        return sorted(names)

    def blocks(self, path: Path, stream: Stream, block_bytes: int) -> Iterator[Chunk]:
        raise InvalidRequest(f"{path}: an HDF5 recording is a dataset; name it in the pattern")

    def dataset_blocks(
        self, path: Path, dataset: str, stream: Stream, block_bytes: int
    ) -> Iterator[Chunk]:
        """Blocks of about ``block_bytes`` of the stream's columns, read slice by slice."""
        with _open(path) as handle:
            item = handle.get(dataset)
            if not isinstance(item, h5py.Dataset):
                raise DataError(f"no dataset {dataset!r}", file=str(path))
            names = item.dtype.names
            if names is None or item.ndim != 1:
                raise DataError(
                    f"dataset {dataset!r} must be a 1-D structured array (one field per "
                    f"column), not {item.dtype} of shape {item.shape}",
                    file=str(path),
                )
            picker = ColumnPicker(stream, names, f"{path}:{dataset}")
            view = item.fields(picker.columns)
            row_bytes = sum(item.dtype[c].itemsize for c in picker.columns)
            rows = max(1, block_bytes // max(row_bytes, 1))
            total = item.shape[0]
            for start in range(0, total, rows):
                try:
                    table = view[start : start + rows]
                except OSError as exc:
                    raise DataError(
                        f"dataset {dataset!r}, rows {start}..: {exc}", file=str(path)
                    ) from exc
                if len(picker.columns) == 1:  # h5py returns a plain array for one field
                    yield picker.chunk({picker.columns[0]: table})
                else:
                    yield picker.chunk({c: table[c] for c in picker.columns})
