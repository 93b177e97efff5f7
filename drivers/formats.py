"""Recording file formats: how replay reads a file, and what streams a file holds.

Each format is a :class:`RecordingFormat` registered by name (the scheme of a DFDS
pattern, ``csv://...``) and by file extension. Formats whose files describe themselves
(XDF, EDF, BDF) implement :meth:`RecordingFormat.describe`, which lets a plain folder of
such files be a collection with no hand-written metadata.

Container formats (HDF5) keep every recording of a collection in one file, one dataset
each: they name that file (:attr:`RecordingFormat.container`), list its datasets
(:meth:`RecordingFormat.datasets`) and read one of them
(:meth:`RecordingFormat.dataset_blocks`).

Optional readers (pyxdf, pyedflib, h5py, pyarrow) are imported only when their format is
used; a missing one is an error naming the extra to install.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from importlib import import_module
from pathlib import Path

from ..dfds import SELF_DESCRIBING
from ..errors import InvalidRequest
from ..model import Stream
from .base import Chunk

__all__ = [
    "FORMAT_MODULES",
    "SELF_DESCRIBING",
    "RecordingFormat",
    "container_of",
    "extensions_of",
    "format_for_path",
    "get_format",
]


class RecordingFormat(abc.ABC):
    """One file format: read blocks of one stream; optionally describe a file's streams."""

    #: The pattern scheme ("csv") and the default extension (".csv").
    name: str = ""
    #: Every file extension of the format, lower case, with the dot.
    extensions: tuple[str, ...] = ()
    #: True when files carry their own stream metadata (describe() works).
    self_describing: bool = False
    #: For container formats: the one file per collection that holds every recording.
    container: str | None = None
    #: Blocks of at least this many bytes, whatever replay asks for. For readers that
    #: copy each block out of the file anyway (XDF): a replay frame that lies inside one
    #: block leaves as a view of it, while a frame across two blocks is joined, a copy.
    min_block_bytes: int = 0

    def datasets(self, path: Path) -> list[str]:
        """The names of the recordings (datasets) in a container file.

        Raises:
            DataError: the file cannot be read.
        """
        raise InvalidRequest(f"{self.name} files hold one recording each, not datasets")

    def dataset_blocks(
        self, path: Path, dataset: str, stream: Stream, block_bytes: int
    ) -> Iterator[Chunk]:
        """As :meth:`blocks`, for one dataset of a container file."""
        raise InvalidRequest(f"{self.name} files hold one recording each, not datasets")

    def describe(self, path: Path) -> dict[str, Stream]:
        """The streams in ``path`` by id, with metadata read from the file.

        Raises:
            DataError: the file cannot be read (naming the file and what is wrong).
        """
        raise InvalidRequest(f"{self.name} files need a DFDS metadata file to describe them")

    def sample_count(self, path: Path, stream: Stream) -> int | None:
        """How many samples of ``stream`` the file holds, if cheap to tell (for progress)."""
        return None

    @abc.abstractmethod
    def blocks(self, path: Path, stream: Stream, block_bytes: int) -> Iterator[Chunk]:
        """Yield ``(timestamps float64 (n,) seconds, values (n, channels))`` in time order.

        ``stream`` is the stream's metadata (from a collection file or :meth:`describe`);
        ``block_bytes`` is a hint for how much to read at a time.

        Raises:
            DataError: the file is broken (blocks before the problem were yielded).
        """


# name -> "module:class"; imported on first use so optional readers stay optional.
FORMAT_MODULES: dict[str, str] = {
    "csv": "streaminghub_datamux.drivers.csvfile:CsvFormat",
    "xdf": "streaminghub_datamux.drivers.xdf:XdfFormat",
    "edf": "streaminghub_datamux.drivers.edf:EdfFormat",
    "bdf": "streaminghub_datamux.drivers.edf:EdfFormat",
    "h5": "streaminghub_datamux.drivers.hdf5:Hdf5Format",
    "parquet": "streaminghub_datamux.drivers.parquet:ParquetFormat",
}
#: The pip extra that installs each optional reader, where it differs from the name.
EXTRAS = {"h5": "hdf5"}
#: Container formats: the file, in the recordings folder, that holds every recording.
CONTAINERS = {"h5": "data.h5"}
_EXTENSIONS = {
    ".csv": "csv",
    ".xdf": "xdf",
    ".xdfz": "xdf",
    ".edf": "edf",
    ".bdf": "bdf",
    ".parquet": "parquet",
    ".h5": "h5",
    ".hdf5": "h5",
}
_loaded: dict[str, RecordingFormat] = {}


def get_format(name: str) -> RecordingFormat:
    """The format registered under ``name``.

    Raises:
        InvalidRequest: no such format, or its optional reader is not installed.
    """
    if name not in FORMAT_MODULES:
        raise InvalidRequest(
            f"format {name!r} is not supported (supported: {sorted(FORMAT_MODULES)})"
        )
    if name not in _loaded:
        module_name, _, class_name = FORMAT_MODULES[name].partition(":")
        try:
            module = import_module(module_name)
        except ImportError as exc:
            raise InvalidRequest(
                f"reading {name} files needs an optional package: {exc.msg}. "
                f"Install it with: pip install 'streaminghub-datamux[{EXTRAS.get(name, name)}]'"
            ) from exc
        _loaded[name] = getattr(module, class_name)()
    return _loaded[name]


def format_name_of(path: Path) -> str | None:
    """The format name of a file, by its extension (None when not a recording)."""
    return _EXTENSIONS.get(path.suffix.lower())


def format_for_path(path: Path) -> RecordingFormat:
    """The format of a recording file, by its extension.

    Raises:
        InvalidRequest: not a known recording extension, or its reader is not installed.
    """
    name = format_name_of(path)
    if name is None:
        raise InvalidRequest(f"{path.name}: not a recording file ({', '.join(_EXTENSIONS)})")
    return get_format(name)


def extensions_of(name: str) -> tuple[str, ...]:
    """Every extension of a format name, e.g. ``("xdf",)`` -> ``(".xdf", ".xdfz")``."""
    return tuple(ext for ext, fmt in _EXTENSIONS.items() if fmt == name)


def container_of(name: str) -> str | None:
    """The file that holds every recording, for a container format (``h5`` -> ``data.h5``)."""
    return CONTAINERS.get(name)
