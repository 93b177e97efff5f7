"""The catalog of collections: DFDS metadata files, plus folders of self-describing files.

A collection comes from ``<meta_dir>/<id>.collection.json``, or, with no metadata at all,
from a folder ``<data_dir>/<id>/`` holding XDF, EDF or BDF files. When a collection's
streams are not written out (a folder, or a metadata file whose pattern is ``xdf://``,
``edf://`` or ``bdf://`` without ``streams``), they are read from the files themselves.

Recordings are found by :mod:`.drivers.recordings`; the scan of a collection's folders
is cached until one of them changes (see :class:`ScanCache`), so listing a collection of
ten thousand recordings again costs a few ``stat`` calls, not a walk of the folders.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .checks import ID_PATTERN
from .dfds import COLLECTION_SUFFIX, load_collection, scan_collections
from .drivers.formats import SELF_DESCRIBING, format_for_path
from .drivers.recordings import (
    SELF_DESCRIBING_EXTENSIONS,
    Recording,
    Search,
    recording_folders,
    scan_folder,
    select_recording,
    target_of,
)
from .errors import DatamuxError, MetadataError, NotFound
from .model import Collection, Stream

__all__ = ["Catalog", "ScanCache"]

log = logging.getLogger(__name__)

_DESCRIBE_CACHE_SIZE = 512
_SCAN_CACHE_SIZE = 64
# A folder changed this recently may change again within the same mtime tick (coarse
# file system clocks): its scan is not cached, so a change is never missed.
_RACY_S = 2.0


def _with_attrs(stream: Stream, attrs: dict[str, Any]) -> Stream:
    """A copy of ``stream`` with other attrs: ``dataclasses.replace`` without its cost
    (it re-runs ``__init__``; listing 40,000 streams spent most of its time there)."""
    copy = object.__new__(Stream)
    copy.__dict__.update(stream.__dict__)
    copy.__dict__["attrs"] = attrs
    return copy


def _stamp(paths: list[Path]) -> tuple[tuple[int, int], ...] | None:
    """``(mtime_ns, size)`` of every folder walked and file read; None if one is gone."""
    try:
        return tuple((st.st_mtime_ns, st.st_size) for st in map(os.stat, paths))
    except OSError:
        return None


@dataclass(frozen=True)
class _Scan:
    stamp: tuple[tuple[int, int], ...]
    paths: list[Path]
    recordings: list[Recording]
    search: Search


class ScanCache:
    """The recordings of each collection, kept while none of the folders walked changes.

    Adding, removing or renaming a file changes the modification time of its folder, and
    every folder walked (plus ``data_dir``, where a collection's folder may appear) is in
    the stamp; container files (``data.h5``) are stamped by time and size.
    """

    def __init__(self, data_dir: Path, size: int = _SCAN_CACHE_SIZE) -> None:
        self.data_dir = data_dir
        self.size = size
        self._scans: OrderedDict[tuple[Any, ...], _Scan] = OrderedDict()
        # Listings run in worker threads, several at once on an agent: the dict is shared.
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def locate(self, collection: Collection) -> tuple[list[Recording], Search]:
        """Every recording of ``collection`` (maybe none), and where they were looked for."""
        key = (collection.id, collection.name, collection.pattern, tuple(collection.streams))
        with self._lock:
            cached = self._scans.get(key)
        if cached is not None and _stamp(cached.paths) == cached.stamp:
            with self._lock:
                if key in self._scans:
                    self._scans.move_to_end(key)
                self.hits += 1
            return cached.recordings, cached.search
        with self._lock:
            self.misses += 1
        started = time.time_ns()
        dirs: list[Path] = [self.data_dir]
        files: list[Path] = []
        search = Search(collection.id, target_of(collection))
        recordings: list[Recording] = []
        for folder in recording_folders(collection, self.data_dir):
            recordings, why = scan_folder(collection, folder, dirs, files)
            if recordings:
                break
            search.looked.append((folder, why))
        paths = dirs + files
        stamp = _stamp(paths)
        with self._lock:
            self._scans.pop(key, None)
            if stamp is not None and all(started - t > _RACY_S * 1e9 for t, _ in stamp):
                self._scans[key] = _Scan(stamp, paths, recordings, search)
                while len(self._scans) > self.size:
                    self._scans.popitem(last=False)
        return recordings, search


class Catalog:
    """Finds collections, their streams and recordings under ``data_dir`` and ``meta_dir``."""

    def __init__(self, data_dir: Path, meta_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.meta_dir = Path(meta_dir)
        self.scans = ScanCache(self.data_dir)
        # (path, mtime_ns, size) -> streams: describing an XDF file means parsing it.
        self._described: dict[tuple[str, int, int], dict[str, Stream]] = {}

    # -- listing ---------------------------------------------------------------------------

    def scan(self) -> tuple[dict[str, Collection], dict[str, DatamuxError]]:
        """Every collection by id (streams filled in), and the error of each broken one."""
        collections, problems = scan_collections(self.meta_dir)
        found: dict[str, Collection] = {}
        errors: dict[str, DatamuxError] = dict(problems)
        for collection_id, collection in collections.items():
            if not ID_PATTERN.fullmatch(collection_id):
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
            if not folder.is_dir() or folder.name in taken or not ID_PATTERN.fullmatch(folder.name):
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
        if isinstance(collection_id, str) and ID_PATTERN.fullmatch(collection_id):
            path = self.meta_dir / f"{collection_id}{COLLECTION_SUFFIX}"
            if path.is_file():
                return self._with_streams(load_collection(path))
            if collection_id in self._folder_ids(set(), only=collection_id):
                return self._with_streams(self._folder_collection(collection_id))
        known = sorted(
            name
            for name in (p.name[: -len(COLLECTION_SUFFIX)] for p in self._metadata_files())
            if ID_PATTERN.fullmatch(name)
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
        """Every recording of a collection.

        Raises:
            NotFound: none, naming every folder searched and the pattern.
        """
        recordings, search = self.scans.locate(collection)
        if not recordings:
            raise search.not_found()
        return recordings

    def recording_streams(self, collection: Collection) -> list[Stream]:
        """One stream per recording and stream it holds, as upstream DataMux lists them.

        Each is a copy of the collection's stream whose ``attrs`` hold the recording's
        attributes (and, with a ``{stream}`` placeholder, that file's stream), then
        upstream's ``collection`` (the collection's name), ``id`` (the stream id) and
        ``mode`` (``"replay"``) unless the recording has attributes of those names, then
        the stream's own attrs. Passed back to ``replay_collection_stream``, they select
        exactly that recording.

        Raises:
            NotFound: the collection has no recordings (naming the folders searched).
        """
        out: list[Stream] = []
        declared = list(collection.streams.items())
        described = not collection.pattern or collection.pattern.split("://")[0] in SELF_DESCRIBING
        for recording in self.recordings(collection):
            if described:  # each file says which streams it holds
                streams = self._streams_in(collection, recording)
            elif "*" in recording.files:
                streams = declared
            else:  # a file per stream
                streams = [(sid, s) for sid, s in declared if sid in recording.files]
            for stream_id, stream in streams:
                attrs: dict[str, Any] = dict(recording.attrs)
                if recording.stream_key is not None:
                    attrs[recording.stream_key] = stream_id
                attrs.setdefault("collection", collection.name)
                attrs.setdefault("id", stream_id)
                attrs.setdefault("mode", "replay")
                for key, value in stream.attrs.items():
                    attrs.setdefault(key, value)
                out.append(_with_attrs(stream, attrs))
        return out

    def _streams_in(self, collection: Collection, recording: Recording) -> list[tuple[str, Stream]]:
        """The streams of a self-describing file (XDF, EDF/BDF) that the collection has."""
        path = recording.file_for("*")
        if path is None:
            return []
        try:
            described = self.describe(path)
        except DatamuxError as exc:  # listed without streams; replaying it says why
            log.warning("collection %s: skipping %s: %s", collection.id, path, exc)
            return []
        return [
            (sid, replace(s, collection_id=collection.id))
            for sid, s in described.items()
            if sid in collection.streams
        ]

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
        recordings, _ = self.scans.locate(collection)
        for recording in recordings:
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
        self, collection_id: str, stream_id: str, attrs: Mapping[str, object]
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
