"""Load DFDS collection metadata: ``<id>.collection.json`` files in ``meta_dir``.

Files written for upstream StreamingHub load unchanged, including references of the form
``{"@ref": "relative/file.json#/json/pointer"}`` to other local files (never URLs).
Every problem raises :class:`~streaminghub_datamux.errors.MetadataError` naming the file,
the JSON path and what is wrong.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import MetadataError
from .model import Collection, Field, Group, Stream, numpy_dtype

__all__ = ["COLLECTION_SUFFIX", "load_collection", "scan_collections"]

log = logging.getLogger(__name__)

COLLECTION_SUFFIX = ".collection.json"
#: Formats whose files carry their own stream metadata (no hand-written streams needed).
#: Here, not in drivers/formats.py, so that the core never imports the drivers.
SELF_DESCRIBING = frozenset({"xdf", "edf", "bdf"})
_MAX_REF_DEPTH = 16
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_PATTERN = re.compile(r"^(?P<scheme>[a-z0-9]+)://(?P<template>.+)$")


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise MetadataError(f"cannot read: {exc.strerror}", file=str(path)) from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise MetadataError(
            f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})", file=str(path)
        ) from exc


def _follow_pointer(document: Any, pointer: str, file: Path) -> Any:
    """Resolve an RFC 6901 JSON pointer such as ``/outputs/bvp``."""
    node = document
    if pointer in ("", "/"):
        return node
    for raw in pointer.lstrip("/").split("/"):
        part = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise MetadataError(f"reference points to nothing at {pointer!r}", file=str(file))
    return node


def _resolve_refs(node: Any, file: Path, path: str, root: Path, depth: int = 0) -> Any:
    """Replace every ``{"@ref": ...}`` object with what it points to, recursively."""
    if isinstance(node, list):
        return [_resolve_refs(v, file, f"{path}/{i}", root, depth) for i, v in enumerate(node)]
    if not isinstance(node, dict):
        return node
    if "@ref" not in node:
        return {k: _resolve_refs(v, file, f"{path}/{k}", root, depth) for k, v in node.items()}
    ref = node["@ref"]
    if not isinstance(ref, str) or not ref:
        raise MetadataError("@ref must be a non-empty string", file=str(file), path=path)
    if _URL.match(ref):
        raise MetadataError(
            f"@ref {ref!r} is a URL; only local files are allowed", file=str(file), path=path
        )
    if depth >= _MAX_REF_DEPTH:
        raise MetadataError(
            f"@ref chain deeper than {_MAX_REF_DEPTH} (a cycle?)", file=str(file), path=path
        )
    target_name, _, pointer = ref.partition("#")
    target = (file.parent / target_name).resolve() if target_name else file
    if not target.is_relative_to(root):
        # Metadata is served to remote clients: it may not pull in files from elsewhere.
        raise MetadataError(
            f"@ref {ref!r} points outside {root}; keep referenced files beside the collection",
            file=str(file),
            path=path,
        )
    if not target.is_file():
        raise MetadataError(f"@ref {ref!r}: no file {target}", file=str(file), path=path)
    resolved = _follow_pointer(_read_json(target), pointer, target)
    return _resolve_refs(resolved, target, f"{target.name}#{pointer}", root, depth + 1)


def _expect(value: Any, kind: type | tuple[type, ...], file: Path, path: str, what: str) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise MetadataError(
            f"expected {what}, found {type(value).__name__}", file=str(file), path=path
        )
    return value


def _parse_fields(raw: Any, file: Path, path: str, required: bool) -> dict[str, Field]:
    raw = _expect(raw if raw is not None else {}, dict, file, path, "an object of fields")
    if required and not raw:
        raise MetadataError("a stream needs at least one field", file=str(file), path=path)
    fields = {}
    for field_id, spec in raw.items():
        spec = _expect(spec, dict, file, f"{path}/{field_id}", "a field object")
        dtype = spec.get("dtype", "f32")
        try:
            numpy_dtype(str(dtype))
        except ValueError as exc:
            raise MetadataError(str(exc), file=str(file), path=f"{path}/{field_id}/dtype") from exc
        fields[field_id] = Field.from_dict(field_id, spec)
    return fields


def _parse_stream(stream_id: str, raw: Any, collection_id: str, file: Path) -> Stream:
    path = f"/streams/{stream_id}"
    raw = _expect(raw, dict, file, path, "a stream object")
    frequency = raw.get("frequency", 0)
    if not isinstance(frequency, int | float) or isinstance(frequency, bool) or frequency < 0:
        raise MetadataError(
            f"frequency must be a number >= 0 (0 = irregular), not {frequency!r}",
            file=str(file),
            path=f"{path}/frequency",
        )
    fields = _parse_fields(raw.get("fields"), file, f"{path}/fields", required=True)
    index = _parse_fields(raw.get("index"), file, f"{path}/index", required=False)
    return Stream.from_dict(stream_id, raw, fields=fields, index=index, collection_id=collection_id)


def _parse_collection(collection_id: str, raw: Any, file: Path) -> Collection:
    raw = _expect(raw, dict, file, "/", "a JSON object")
    pattern = raw.get("pattern", "")
    # XDF/EDF/BDF files describe their own streams: "streams" may then be left out.
    described_by_files = isinstance(pattern, str) and pattern.split("://")[0] in SELF_DESCRIBING
    streams_raw = raw.get("streams", {} if described_by_files else None)
    streams_raw = _expect(streams_raw, dict, file, "/streams", "an object of streams")
    if not streams_raw and not described_by_files:
        raise MetadataError(
            "a collection needs at least one stream", file=str(file), path="/streams"
        )
    streams = {sid: _parse_stream(sid, s, collection_id, file) for sid, s in streams_raw.items()}

    groups = {}
    for gid, g in _expect(raw.get("groups", {}), dict, file, "/groups", "an object").items():
        g = _expect(g, dict, file, f"/groups/{gid}", "a group object")
        values = _expect(g.get("values", []), list, file, f"/groups/{gid}/values", "a list")
        groups[gid] = Group(gid, str(g.get("description", "")), tuple(str(v) for v in values))

    if pattern:
        _expect(pattern, str, file, "/pattern", "a string")
        if not _PATTERN.match(pattern):
            raise MetadataError(
                f"pattern {pattern!r} must look like 'csv://{{subject}}/{{session}}'",
                file=str(file),
                path="/pattern",
            )
    authors = _expect(raw.get("authors", []), list, file, "/authors", "a list")
    keywords = _expect(raw.get("keywords", []), list, file, "/keywords", "a list")
    return Collection(
        id=collection_id,
        name=str(raw.get("name", collection_id)),
        description=str(raw.get("description", "")),
        keywords=tuple(str(k) for k in keywords),
        authors=tuple(a for a in authors if isinstance(a, Mapping)),
        streams=streams,
        groups=groups,
        pattern=pattern,
    )


def load_collection(path: Path) -> Collection:
    """Load one ``<id>.collection.json`` file.

    Raises:
        MetadataError: the file cannot be read, is not JSON, or is not a valid collection.
    """
    if not path.name.endswith(COLLECTION_SUFFIX):
        raise MetadataError(f"collection files end with {COLLECTION_SUFFIX}", file=str(path))
    collection_id = path.name[: -len(COLLECTION_SUFFIX)]
    raw = _resolve_refs(_read_json(path), path, "", path.parent.resolve())
    return _parse_collection(collection_id, raw, path)


def scan_collections(meta_dir: Path) -> tuple[dict[str, Collection], dict[str, MetadataError]]:
    """Load every collection in ``meta_dir``.

    Returns:
        The collections that loaded, and the error of each one that did not, both by id,
        so one broken file neither hides the others nor goes unreported.
    """
    collections: dict[str, Collection] = {}
    problems: dict[str, MetadataError] = {}
    if not meta_dir.is_dir():
        return collections, problems
    for path in sorted(meta_dir.glob(f"*{COLLECTION_SUFFIX}")):
        collection_id = path.name[: -len(COLLECTION_SUFFIX)]
        try:
            collections[collection_id] = load_collection(path)
        except MetadataError as exc:
            log.warning("skipping collection %s: %s", collection_id, exc)
            problems[collection_id] = exc
    return collections, problems


def split_pattern(pattern: str) -> tuple[str, str]:
    """``"csv://{subject}/{session}"`` -> ``("csv", "{subject}/{session}")``."""
    match = _PATTERN.match(pattern)
    if not match:
        raise MetadataError(f"bad pattern {pattern!r}")
    return match["scheme"], match["template"]
