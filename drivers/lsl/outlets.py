"""What the resolver says about an outlet: its identity, layout and channel labels."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

from ...model import Field, Stream, seconds_index
from .liblsl import LSL_DTYPES, pylsl
from .options import INFO_TIMEOUT_S, safe_id


@dataclass(frozen=True)
class _Outlet:
    """One outlet as the resolver reports it (core fields only, no description)."""

    info: Any  # pylsl.StreamInfo, kept to open an inlet
    uid: str
    name: str
    type: str
    source_id: str
    hostname: str
    channel_count: int
    channel_format: int
    rate: float
    created_at: float

    @classmethod
    def read(cls, info: Any) -> _Outlet:
        return cls(
            info=info,
            uid=info.uid(),
            name=info.name(),
            type=info.type(),
            source_id=info.source_id(),
            hostname=info.hostname(),
            channel_count=info.channel_count(),
            channel_format=info.channel_format(),
            rate=float(info.nominal_srate()),
            created_at=float(info.created_at()),
        )

    @property
    def key(self) -> str:
        """What identifies the device across outlet restarts (source_id, else the uid)."""
        return f"sid:{self.source_id}" if self.source_id else f"uid:{self.uid}"

    @property
    def node_id(self) -> str:
        return safe_id(self.hostname, prefix="lsl-", default="unknown-host")

    @property
    def layout(self) -> tuple[int, int]:
        return self.channel_count, self.channel_format


@dataclass(frozen=True)
class _Description:
    """Channel labels and units from an outlet's full description."""

    labels: tuple[str, ...]
    units: tuple[str, ...]
    labelled: bool  # False: the labels are the ch0.. fallback


def describe_channels(xml: str, channel_count: int) -> _Description:
    """Labels and units from ``desc/channels/channel/{label,unit}`` of a stream's XML.

    Labels fall back to ``ch0..`` unless there is exactly one non-empty, unique label per
    channel; units are kept per channel when their count matches, else left empty. Never
    raises on odd XML.

    Why ElementTree on ``as_xml()`` and not ``desc()`` traversal: one call into liblsl
    instead of several per channel, and a malformed tree is a ParseError we can catch.
    """
    fallback = tuple(f"ch{i}" for i in range(channel_count))
    empty = ("",) * channel_count
    try:
        root = ET.fromstring(xml)
    except (ET.ParseError, ValueError):
        return _Description(fallback, empty, labelled=False)
    channels = root.findall("./desc/channels/channel")
    if len(channels) != channel_count:
        return _Description(fallback, empty, labelled=False)
    labels = tuple((ch.findtext("label") or "").strip() for ch in channels)
    units = tuple((ch.findtext("unit") or "").strip() for ch in channels)
    labelled = all(labels) and len(set(labels)) == channel_count
    return _Description(labels if labelled else fallback, units, labelled)


def _fetch_description(outlet: _Outlet) -> _Description:
    """The outlet's labels and units (blocking: opens a short-lived inlet)."""
    inlet = pylsl.StreamInlet(outlet.info, max_buflen=1, recover=False)
    try:
        full = inlet.info(timeout=INFO_TIMEOUT_S)
        return describe_channels(full.as_xml(), outlet.channel_count)
    finally:
        del inlet  # disconnects now, not at garbage collection


def _build_stream(
    outlet: _Outlet, node_id: str, stream_id: str, description: _Description
) -> Stream:
    dtype = LSL_DTYPES[outlet.channel_format]
    fields = {
        label: Field(id=label, name=label, dtype=dtype, unit=unit)
        for label, unit in zip(description.labels, description.units, strict=True)
    }
    units = set(description.units)
    kind = f"{outlet.type} " if outlet.type else ""
    return Stream(
        id=stream_id,
        name=outlet.name,
        description=f"LSL {kind}outlet {outlet.name!r} on {outlet.hostname}",
        unit=units.pop() if len(units) == 1 else "",
        frequency=outlet.rate,
        fields=fields,
        index=seconds_index(),
        node_id=node_id,
        attrs={
            "mode": "lsl",
            "type": outlet.type,
            "source_id": outlet.source_id,
            "uid": outlet.uid,
            "hostname": outlet.hostname,
        },
    )


@dataclass(frozen=True)
class _Known:
    """A stream that was listed: its metadata and how to find its outlet again."""

    stream: Stream
    outlet: _Outlet  # the outlet it was last seen as

    def matches(self, other: _Outlet) -> bool:
        """Whether ``other`` is (a restart of) this stream's device."""
        mine = self.outlet
        if mine.source_id:
            return other.source_id == mine.source_id
        if other.uid == mine.uid:
            return True
        # No source_id: a restarted app on the same host with the same stream.
        return (not other.source_id and other.name == mine.name
                and other.hostname == mine.hostname and other.type == mine.type)  # fmt: skip

    def label(self) -> str:
        mine = self.outlet
        who = f"source_id {mine.source_id!r}" if mine.source_id else f"uid {mine.uid}"
        return f"LSL outlet {mine.name!r} ({who})"
