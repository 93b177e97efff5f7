"""Find the recordings of a collection on disk, and pick one by its attributes.

A collection's ``pattern`` (``csv://S{subject}/task{task}``) says where its recordings
are. As upstream DataMux does, they are looked for under ``data_dir/<collection name>/``
(the JSON ``"name"``); as this project always did, under ``data_dir/<collection id>/``.
The name's folder wins when it holds recordings; otherwise the id's folder is used.

File formats (CSV, Parquet, XDF, EDF/BDF) match the template, plus the format's
extension, against every file below the folder. Container formats (HDF5) keep every
recording in one file, ``<folder>/data.h5``, and match the template against the names of
its datasets. Each ``{placeholder}`` becomes an attribute of the recording; ``{stream}``
(or upstream's ``{stream_name}``) says which stream a file holds instead.

When nothing is found, :meth:`Search.not_found` names every folder searched, the
pattern, and what was wrong with each folder.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..dfds import split_pattern
from ..errors import InvalidRequest, NotFound
from ..model import Collection
from .formats import SELF_DESCRIBING, container_of, extensions_of, get_format

__all__ = [
    "STREAM_PLACEHOLDERS",
    "Recording",
    "Search",
    "placeholders_of",
    "recording_folders",
    "scan_folder",
    "select_recording",
]

_PLACEHOLDER = re.compile(r"\{(\w+)\}")
#: Placeholders that name the stream a file holds (upstream's examples spell it
#: ``stream_name``); they select the file, not the recording.
STREAM_PLACEHOLDERS = ("stream", "stream_name")
SELF_DESCRIBING_EXTENSIONS = tuple(ext for name in SELF_DESCRIBING for ext in extensions_of(name))


@dataclass(frozen=True)
class Recording:
    """One recording of a collection: its attributes and where each stream's data is.

    Attributes:
        attrs: the values of the pattern's placeholders (``{"subject": "1"}``).
        files: stream id -> file; the key ``"*"`` when one file holds every stream.
        dataset: for container formats (HDF5), the dataset in that file.
        stream_key: the placeholder naming each file's stream (``stream``,
            ``stream_name``), if the pattern has one.
    """

    attrs: Mapping[str, str]
    files: Mapping[str, Path]
    dataset: str | None = None
    stream_key: str | None = None

    def file_for(self, stream_id: str) -> Path | None:
        return self.files.get(stream_id, self.files.get("*"))


@dataclass
class Search:
    """Where recordings were looked for, and what was found (for clear errors)."""

    collection_id: str
    target: str  # the pattern as matched, e.g. "csv://S{subject}/task{task}.csv"
    looked: list[tuple[Path, str]] = field(default_factory=list)  # (folder, what was wrong)

    def not_found(self) -> NotFound:
        places = "; ".join(f"{folder}/ ({why})" for folder, why in self.looked)
        return NotFound(
            f"collection {self.collection_id!r} has no recordings: looked in {places} "
            f"for {self.target}. Put the recordings there, or fix the collection's pattern"
        )


def placeholders_of(pattern: str) -> list[str]:
    """The placeholders of a pattern's template, in order, each once."""
    names: list[str] = []
    for match in _PLACEHOLDER.finditer(pattern.partition("://")[2]):
        if match[1] not in names:
            names.append(match[1])
    return names


def _safe_segment(name: str) -> bool:
    """A collection name may name a folder only if it stays a folder of data_dir."""
    return bool(name) and name not in (".", "..") and not re.search(r"[/\\\x00]", name)


def recording_folders(collection: Collection, data_dir: Path) -> list[Path]:
    """The folders that may hold a collection's recordings, in the order they win."""
    folders = []
    if collection.name != collection.id and _safe_segment(collection.name):
        folders.append(data_dir / collection.name)
    folders.append(data_dir / collection.id)
    return folders


def _template_regex(template: str, extensions: tuple[str, ...]) -> re.Pattern[str]:
    parts, seen = [], set()
    position = 0
    for match in _PLACEHOLDER.finditer(template):
        parts.append(re.escape(template[position : match.start()]))
        name = match[1]
        # A placeholder used twice must match the same text twice.
        parts.append(f"(?P={name})" if name in seen else f"(?P<{name}>[^/]+?)")
        seen.add(name)
        position = match.end()
    parts.append(re.escape(template[position:]))
    if extensions and not template.lower().endswith(extensions):
        parts.append("(?:" + "|".join(re.escape(ext) for ext in extensions) + ")")
    return re.compile("".join(parts), re.IGNORECASE)


def _files_under(root: Path, extensions: tuple[str, ...], dirs: list[Path]) -> list[Path]:
    """Files below ``root`` with one of ``extensions``; every folder walked goes to ``dirs``."""
    found: list[Path] = []
    for folder, _, names in os.walk(root):
        dirs.append(Path(folder))
        found.extend(Path(folder, n) for n in names if os.path.splitext(n)[1].lower() in extensions)
    return sorted(found)


def target_of(collection: Collection) -> str:
    """The pattern as it is matched (with the extension), for messages."""
    if not collection.pattern:
        return "files " + ", ".join(f"*{ext}" for ext in SELF_DESCRIBING_EXTENSIONS)
    scheme, template = split_pattern(collection.pattern)
    container = container_of(scheme)
    if container is not None:
        return f"{collection.pattern} (datasets in {container})"
    extensions = extensions_of(scheme)
    if extensions and not template.lower().endswith(extensions):
        return f"{collection.pattern}{extensions[0]}"
    return collection.pattern


def scan_folder(
    collection: Collection, root: Path, dirs: list[Path], files: list[Path]
) -> tuple[list[Recording], str]:
    """The recordings of ``collection`` in one folder, and what was wrong if none.

    Every folder walked is appended to ``dirs`` and every container file read to
    ``files``, so a cache can tell when the answer may have changed.
    """
    if not root.is_dir():
        return [], "no such folder"
    if not collection.pattern:
        paths = _files_under(root, SELF_DESCRIBING_EXTENSIONS, dirs)
        recordings = [
            Recording({"file": p.relative_to(root).with_suffix("").as_posix()}, {"*": p})
            for p in paths
        ]
        return recordings, "" if recordings else "no XDF, EDF or BDF file"
    scheme, template = split_pattern(collection.pattern)
    container = container_of(scheme)
    names = placeholders_of(collection.pattern)
    stream_key = next((n for n in STREAM_PLACEHOLDERS if n in names), None)
    if container is not None:
        dirs.append(root)
        path = root / container
        if not path.is_file():
            return [], f"no file {container}"
        files.append(path)
        regex = _template_regex(template, ())
        candidates = [(name, path) for name in get_format(scheme).datasets(path)]
    else:
        extensions = extensions_of(scheme)
        if not extensions:
            get_format(scheme)  # raises InvalidRequest naming the supported formats
        regex = _template_regex(template, extensions)
        candidates = [
            (p.relative_to(root).as_posix(), p) for p in _files_under(root, extensions, dirs)
        ]
    by_attrs: dict[tuple[tuple[str, str], ...], dict[str, Path]] = {}
    datasets: dict[tuple[tuple[str, str], ...], str] = {}
    for name, path in candidates:
        match = regex.fullmatch(name)
        if match is None:
            continue
        groups = match.groupdict()
        stream_id = groups.pop(stream_key, "*") if stream_key else "*"
        if stream_id != "*" and collection.streams and stream_id not in collection.streams:
            continue
        key = tuple((n, groups[n]) for n in names if n != stream_key)
        by_attrs.setdefault(key, {})[stream_id] = path
        if container is not None:
            datasets[key] = name
    recordings = [
        Recording(dict(key), files_of, datasets.get(key), stream_key)
        for key, files_of in sorted(by_attrs.items())
    ]
    return recordings, "" if recordings else "nothing matches"


def select_recording(
    recordings: Sequence[Recording], attrs: Mapping[str, Any], collection_id: str
) -> Recording:
    """The one recording whose attributes match ``attrs``.

    Only the pattern's placeholders select; other keys (upstream's ``id``, ``mode`` and
    ``collection``, or anything else) are ignored here and echoed on frames.

    Raises:
        NotFound: no recording matches.
        InvalidRequest: several recordings match.
    """
    known = {name for r in recordings for name in r.attrs}
    wanted = {str(k): str(v) for k, v in attrs.items() if str(k) in known}
    matches = [r for r in recordings if all(r.attrs.get(k) == v for k, v in wanted.items())]
    if not matches:
        examples = ", ".join(str(dict(r.attrs)) for r in recordings[:5])
        more = f" (and {len(recordings) - 5} more)" if len(recordings) > 5 else ""
        raise NotFound(
            f"no recording of {collection_id!r} matches {wanted}; recordings are selected "
            f"by {sorted(known)}{_typos(attrs, known)}: {examples}{more}"
        )
    if len(matches) > 1:
        examples = ", ".join(str(dict(r.attrs)) for r in matches[:5])
        raise InvalidRequest(
            f"{len(matches)} recordings of {collection_id!r} match {wanted}; add "
            f"attributes ({sorted(known)}) to pick one{_typos(attrs, known)}: {examples}"
        )
    return matches[0]


def _typos(attrs: Mapping[str, Any], known: set[str]) -> str:
    """Ignored keys that look like a misspelt placeholder ("subjet"): a selection that
    fails because of one should say so, not only that the key selected nothing."""
    hints = []
    for key in sorted(str(k) for k in attrs if str(k) not in known):
        close = difflib.get_close_matches(key, sorted(known), n=1)
        if close:
            hints.append(f"{key!r} is not an attribute: did you mean {close[0]!r}?")
    return f" ({'; '.join(hints)})" if hints else ""
