"""The catalog of collections: DFDS metadata files, plus folders of self-describing files.

A collection comes from ``<meta_dir>/<id>.collection.json``, or, with no metadata at all,
from a folder ``<data_dir>/<id>/`` holding XDF, EDF or BDF files. When a collection's
streams are not written out (a folder, or a metadata file whose pattern is ``xdf://``,
``edf://`` or ``bdf://`` without ``streams``), they are read from the files themselves.
"""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from pathlib import Path

from .dfds import COLLECTION_SUFFIX, load_collection, scan_collections
from .drivers.formats import format_for_path
from .drivers.replay import (
    SELF_DESCRIBING_EXTENSIONS,
    Recording,
    find_recordings,
    select_recording,
)
from .errors import DatamuxError, MetadataError, NotFound
from .model import Collection, Stream

__all__ = ["Catalog"]

log = logging.getLogger(__name__)

_FOLDER_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
_DESCRIBE_CACHE_SIZE = 512


class Catalog:
    """Finds collections, their streams and recordings under ``data_dir`` and ``meta_dir``."""

    def __init__(self, data_dir: Path, meta_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.meta_dir = Path(meta_dir)
        # (path, mtime_ns, size) -> streams: describing an XDF file means parsing it.
        self._described: dict[tuple[str, int, int], dict[str, Stream]] = {}

    # -- listing ---------------------------------------------------------------------------

    def scan(self) -> tuple[dict[str, Collection], dict[str, DatamuxError]]:
        """Every collection by id (streams filled in), and the error of each broken one."""
        collections, problems = scan_collections(self.meta_dir)
        found: dict[str, Collection] = {}
        errors: dict[str, DatamuxError] = dict(problems)
        for collection_id, collection in collections.items():
            if not _FOLDER_ID.fullmatch(collection_id):
                # Ids travel in requests and topics: a file name that is no plain id is
                # reported, not listed as something that cannot then be opened.
                errors[collection_id] = MetadataError(
                    "the file name must be <id>.collection.json with an id of letters, "
                    "digits, '_', '-' and '.' (at most 64); rename the file",
                    file=str(self.meta_dir / f"{collection_id}{COLLECTION_SUFFIX}"),
                )
                continue
            found[collection_id] = collection
        for collection_id in self._folder_ids(set(collections) | set(problems)):
            found[collection_id] = self._folder_collection(collection_id)
        for collection_id, collection in found.items():
            found[collection_id] = self._with_streams(collection)
        return found, errors

    def _folder_ids(self, taken: set[str], only: str | None = None) -> list[str]:
        """Folders of data_dir holding XDF/EDF/BDF files and no metadata file of their own."""
        if not self.data_dir.is_dir():
            return []
        folders = [self.data_dir / only] if only else sorted(self.data_dir.iterdir())
        ids = []
        for folder in folders:
            if not folder.is_dir() or folder.name in taken or not _FOLDER_ID.fullmatch(folder.name):
                continue
            if any(p.suffix.lower() in SELF_DESCRIBING_EXTENSIONS for p in folder.rglob("*")):
                ids.append(folder.name)
        return ids

    def get(self, collection_id: str) -> Collection:
        """One collection by id, loading only that collection.

        Raises:
            NotFound: no such collection.
            MetadataError: its metadata file is broken.
        """
        # Ids come from requests: check them before they get near a file name.
        if isinstance(collection_id, str) and _FOLDER_ID.fullmatch(collection_id):
            path = self.meta_dir / f"{collection_id}{COLLECTION_SUFFIX}"
            if path.is_file():
                return self._with_streams(load_collection(path))
            if collection_id in self._folder_ids(set(), only=collection_id):
                return self._with_streams(self._folder_collection(collection_id))
        known = sorted(
            name
            for name in (p.name[: -len(COLLECTION_SUFFIX)] for p in self._metadata_files())
            if _FOLDER_ID.fullmatch(name)
        )
        known += self._folder_ids(set(known))
        raise NotFound(
            f"no collection {collection_id!r} in {self.meta_dir} or {self.data_dir}; "
            f"collections: {known or 'none'}"
        )

    def _metadata_files(self) -> list[Path]:
        if not self.meta_dir.is_dir():
            return []
        return sorted(self.meta_dir.glob(f"*{COLLECTION_SUFFIX}"))

    def _folder_collection(self, collection_id: str) -> Collection:
        return Collection(
            id=collection_id,
            name=collection_id,
            description=f"recordings in {self.data_dir / collection_id}",
        )

    def _with_streams(self, collection: Collection) -> Collection:
        if collection.streams:
            return collection
        return replace(collection, streams=self._derive_streams(collection))

    def recordings(self, collection: Collection) -> list[Recording]:
        return find_recordings(collection, self.data_dir)

    # -- streams of self-describing files ---------------------------------------------------

    def describe(self, path: Path) -> dict[str, Stream]:
        """The streams in one XDF/EDF/BDF file (cached while the file is unchanged)."""
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        if key not in self._described:
            if len(self._described) >= _DESCRIBE_CACHE_SIZE:
                self._described.pop(next(iter(self._described)))
            self._described[key] = format_for_path(path).describe(path)
        return self._described[key]

    def _derive_streams(self, collection: Collection) -> dict[str, Stream]:
        """The union of the streams in every recording (first description wins)."""
        streams: dict[str, Stream] = {}
        for recording in self.recordings(collection):
            path = recording.file_for("*")
            if path is None:
                continue
            try:
                described = self.describe(path)
            except DatamuxError as exc:  # one broken file must not hide the others
                log.warning("collection %s: skipping %s: %s", collection.id, path, exc)
                continue
            for stream_id, stream in described.items():
                streams.setdefault(stream_id, replace(stream, collection_id=collection.id))
        return streams

    @staticmethod
    def stream(collection: Collection, stream_id: str) -> Stream:
        """One stream of a collection. Raises NotFound naming the streams there are."""
        if stream_id not in collection.streams:
            raise NotFound(
                f"collection {collection.id!r} has no stream {stream_id!r}; "
                f"streams: {sorted(collection.streams)}"
            )
        return collection.streams[stream_id]

    def resolve(
        self, collection_id: str, stream_id: str, attrs: dict[str, object]
    ) -> tuple[Stream, Recording]:
        """The stream's metadata as found in the one recording that ``attrs`` selects.

        Raises:
            NotFound: unknown collection, stream or recording.
            InvalidRequest: attrs that are unknown or match several recordings.
        """
        collection = self.get(collection_id)
        stream = self.stream(collection, stream_id)
        recording = select_recording(self.recordings(collection), attrs, collection_id)
        path = recording.file_for(stream_id)
        if path is not None and path.suffix.lower() in SELF_DESCRIBING_EXTENSIONS:
            # Each file numbers its own streams: read this stream's layout from this file.
            in_file = self.describe(path)
            if stream_id not in in_file:
                raise NotFound(
                    f"recording {dict(recording.attrs)} of {collection_id!r} has no stream "
                    f"{stream_id!r}; it has {sorted(in_file)}"
                )
            stream = replace(in_file[stream_id], collection_id=collection_id)
        return replace(stream, attrs={**stream.attrs, **recording.attrs}), recording
