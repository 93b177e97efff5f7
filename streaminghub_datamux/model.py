"""The data model: collections, streams, nodes, frames and task acknowledgements.

Metadata objects (:class:`Collection`, :class:`Stream`, :class:`Node`, :class:`Field`)
follow DFDS, the upstream StreamingHub metadata format, and convert to and from plain
dicts so they can travel as JSON or CBOR. :class:`Frame` is the unit of data: a chunk of
samples as numpy arrays, never a Python object per sample.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "Collection",
    "Field",
    "Frame",
    "Group",
    "Node",
    "Stream",
    "StreamAck",
    "StreamError",
    "StreamStatus",
    "numpy_dtype",
    "seconds_index",
]

# DFDS dtype names, plus the numpy spellings people write by hand.
_DFDS_DTYPES = {
    "f16": "float16",
    "f32": "float32",
    "f64": "float64",
    "i8": "int8",
    "i16": "int16",
    "i32": "int32",
    "i64": "int64",
    "u8": "uint8",
    "u16": "uint16",
    "u32": "uint32",
    "u64": "uint64",
    "bool": "bool",
    "str": "str",
    "string": "str",
    "utf8": "str",
}


def numpy_dtype(name: str) -> np.dtype:
    """Map a DFDS dtype name (``f32``, ``i16``, ``str``...) or a numpy name to a dtype.

    Raises:
        ValueError: the name is not a numeric, boolean or string type.
    """
    canonical = _DFDS_DTYPES.get(name.lower(), name)
    if canonical == "str":
        return np.dtype(np.str_)
    try:
        dtype = np.dtype(canonical)
    except TypeError as exc:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(_DFDS_DTYPES)}") from exc
    if dtype.kind not in "biuf":
        raise ValueError(f"dtype {name!r} is not numeric, bool or str")
    return dtype


def _dtype_name(dtype: np.dtype) -> str:
    return "str" if dtype.kind == "U" else dtype.name


@dataclass(frozen=True)
class Field:
    """One column of a stream: a channel (in ``fields``) or a time index (in ``index``)."""

    id: str
    name: str = ""
    description: str = ""
    dtype: str = "f32"
    unit: str = ""

    @classmethod
    def from_dict(cls, id: str, data: Mapping[str, Any]) -> Field:
        """A field from its metadata entry (the inverse of :meth:`to_dict`)."""
        return cls(
            id=id,
            name=str(data.get("name", id)),
            description=str(data.get("description", "")),
            dtype=str(data.get("dtype", "f32")),
            unit=str(data.get("unit", "")),
        )

    def to_dict(self) -> dict[str, Any]:
        """The field as a metadata entry (JSON-safe)."""
        out: dict[str, Any] = {"name": self.name, "description": self.description}
        out["dtype"] = self.dtype
        if self.unit:
            out["unit"] = self.unit
        return out


@dataclass(frozen=True)
class Stream:
    """A stream of samples: metadata shared by recorded and live streams.

    ``frequency`` is the nominal rate in Hz; 0 means irregular (use the timestamps).
    ``node_id`` is set for live streams, ``collection_id`` for recorded ones.
    """

    id: str
    name: str = ""
    description: str = ""
    unit: str = ""
    frequency: float = 0.0
    fields: Mapping[str, Field] = field(default_factory=dict)
    index: Mapping[str, Field] = field(default_factory=dict)
    node_id: str | None = None
    collection_id: str | None = None
    attrs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def channels(self) -> list[str]:
        """Channel ids, in column order of :attr:`Frame.values`."""
        return list(self.fields)

    @property
    def dtype(self) -> np.dtype:
        """The dtype of :attr:`Frame.values`: the common type of all fields."""
        dtypes = [numpy_dtype(f.dtype) for f in self.fields.values()]
        if not dtypes:
            return np.dtype("float64")
        if any(d.kind == "U" for d in dtypes):
            return np.dtype(np.str_)
        return np.result_type(*dtypes)

    @classmethod
    def from_dict(cls, id: str, data: Mapping[str, Any], **overrides: Any) -> Stream:
        """A stream from its metadata entry; ``overrides`` replace fields."""
        fields = data.get("fields") or {}
        index = data.get("index") or {}
        values: dict[str, Any] = dict(
            id=id,
            name=str(data.get("name", id)),
            description=str(data.get("description", "")),
            unit=str(data.get("unit", "")),
            frequency=float(data.get("frequency", 0) or 0),
            fields={k: Field.from_dict(k, v) for k, v in fields.items()},
            index={k: Field.from_dict(k, v) for k, v in index.items()},
            node_id=data.get("node_id"),
            collection_id=data.get("collection_id"),
            attrs=dict(data.get("attrs") or {}),
        )
        values.update(overrides)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The stream as a metadata entry (JSON-safe; the id is the entry's key)."""
        out: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "unit": self.unit,
            "frequency": self.frequency,
            "fields": {k: f.to_dict() for k, f in self.fields.items()},
            "index": {k: f.to_dict() for k, f in self.index.items()},
        }
        if self.node_id is not None:
            out["node_id"] = self.node_id
        if self.collection_id is not None:
            out["collection_id"] = self.collection_id
        if self.attrs:
            out["attrs"] = dict(self.attrs)
        return out


@dataclass(frozen=True)
class Group:
    """A DFDS group: one attribute that selects recordings (subject, session...)."""

    id: str
    description: str = ""
    values: tuple[str, ...] = ()


@dataclass(frozen=True)
class Collection:
    """A DFDS collection: recorded streams, the groups that select recordings, a pattern."""

    id: str
    name: str = ""
    description: str = ""
    keywords: tuple[str, ...] = ()
    authors: tuple[Mapping[str, Any], ...] = ()
    streams: Mapping[str, Stream] = field(default_factory=dict)
    groups: Mapping[str, Group] = field(default_factory=dict)
    pattern: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Collection:
        """The inverse of :meth:`to_dict` (how collections travel over MQTT)."""
        groups = data.get("groups") or {}
        return cls(
            id=str(data["id"]),
            name=str(data.get("name", "")),
            description=str(data.get("description", "")),
            keywords=tuple(str(k) for k in data.get("keywords") or ()),
            authors=tuple(dict(a) for a in data.get("authors") or ()),
            streams={k: Stream.from_dict(k, v) for k, v in (data.get("streams") or {}).items()},
            groups={
                k: Group(
                    id=k,
                    description=str(g.get("description", "")),
                    values=tuple(str(v) for v in g.get("values") or ()),
                )
                for k, g in groups.items()
            },
            pattern=str(data.get("pattern", "")),
        )

    def to_dict(self) -> dict[str, Any]:
        """The collection as its metadata file holds it (JSON-safe)."""
        return {
            "id": self.id,
            "name": self.name,
            "description": self.description,
            "keywords": list(self.keywords),
            "authors": [dict(a) for a in self.authors],
            "streams": {k: s.to_dict() for k, s in self.streams.items()},
            "groups": {
                k: {"description": g.description, "values": list(g.values)}
                for k, g in self.groups.items()
            },
            "pattern": self.pattern,
        }


@dataclass(frozen=True)
class Node:
    """A live source of streams: a device, an LSL host, a simulated device."""

    id: str
    name: str = ""
    description: str = ""
    device: Mapping[str, Any] = field(default_factory=dict)
    kind: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Node:
        """The inverse of :meth:`to_dict`."""
        return cls(
            id=str(data["id"]),
            name=str(data.get("name", "")),
            description=str(data.get("description", "")),
            device=dict(data.get("device") or {}),
            kind=str(data.get("kind", "")),
        )

    def to_dict(self) -> dict[str, Any]:
        """The node as it travels on the wire (JSON-safe)."""
        return {
            "id": self.id,
            "name": self.name,
            "description": self.description,
            "device": dict(self.device),
            "kind": self.kind,
        }


@dataclass(frozen=True)
class StreamAck:
    """The answer to a replay or proxy request: ``randseq`` is the task id."""

    status: bool
    randseq: str | None = None


@dataclass(eq=False, slots=True)
class Frame:
    """A chunk of samples from one stream.

    Attributes:
        stream_id: the stream's id.
        seq: the frame's number within its task, from 0; a gap means data was lost.
        timestamps: float64 array, shape (n,), seconds.
        values: array of shape (n, len(channels)) in the stream's dtype.
        channels: channel ids, one per column of ``values``.
        attrs: the attributes of the recording or live stream (echoed from the request).
    """

    stream_id: str
    seq: int
    timestamps: np.ndarray
    values: np.ndarray
    channels: list[str]
    attrs: Mapping[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.timestamps)

    def samples(self) -> Iterator[dict[str, dict[str, Any]]]:
        """Yield upstream-style per-sample dicts: ``{"index": {"t": ...}, "value": {...}}``.

        For code written against the old DataMux; slow by design (one dict per sample).
        """
        for t, row in zip(self.timestamps.tolist(), self.values.tolist(), strict=True):
            yield {"index": {"t": t}, "value": dict(zip(self.channels, row, strict=True))}


@dataclass(frozen=True)
class StreamError:
    """Put on a sink when a task fails; END_OF_STREAM follows it."""

    stream_id: str
    code: str
    reason: str


@dataclass(frozen=True)
class StreamStatus:
    """Put on a sink when a live source changes state (device lost, back again).

    The task stays alive through these; ``status`` is ``"disconnected"`` or
    ``"reconnected"`` (live sources), ``"dropped"`` (data lost), or for a steered replay
    ``"paused"``, ``"resumed"``, ``"seek"``, ``"loop"`` or ``"speed"``
    (docs/replay-control.md); ``reason`` says why, ``data`` holds the numbers
    (``position``, ``pass``, ``speed``) for code that reacts to them.
    """

    stream_id: str
    status: str
    reason: str = ""
    data: Mapping[str, Any] = field(default_factory=dict)


def seconds_index() -> dict[str, Field]:
    """The index of live streams: one column ``t``, float64 seconds."""
    return {"t": Field(id="t", name="t", dtype="f64", unit="s")}


def dtype_name(dtype: np.dtype) -> str:
    """The DFDS name for a numpy dtype (``str`` for unicode)."""
    return _dtype_name(dtype)
