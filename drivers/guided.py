"""Guided simulation: a recording posing as a live device.

A guided stream replays one stream of one recording at its native rate, looping, with
timestamps moved onto the wall clock, so a consumer cannot tell it from a device. It is
declared in a simulated node's config::

    "gaze": {"guided": {"collection": "n_back", "stream": "gaze", "attrs": {"subject": "1"}}}
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..checks import check_keys, config_number
from ..errors import ConfigError
from ..framing import Framing
from ..model import Stream
from .base import Chunk, Source
from .replay import ReplayOpener

__all__ = ["GuidedSource", "GuidedSpec", "RecordingProvider", "parse_guided"]

_GUIDED_KEYS = {"collection", "stream", "attrs", "chunk_ms"}


# Guided streams replay through the opener the API hands every driver (never the API).
# RecordingProvider was the name of what they need before it was one class.
RecordingProvider = ReplayOpener


@dataclass(frozen=True)
class GuidedSpec:
    """One guided stream, validated."""

    id: str
    collection: str
    stream: str
    attrs: Mapping[str, str] = field(default_factory=dict)
    chunk_ms: float = 10.0
    name: str = ""
    description: str = ""

    def to_stream(self, node_id: str, recorded: Stream) -> Stream:
        """The live stream's metadata: the recorded stream's channels, on this node."""
        attrs = {"mode": "simulate", "guided_by": f"{self.collection}/{self.stream}", **self.attrs}
        return Stream.from_dict(
            self.id,
            recorded.to_dict(),
            node_id=node_id,
            collection_id=None,
            attrs=attrs,
            name=self.name or recorded.name,
            description=self.description or recorded.description,
        )


def parse_guided(stream_id: str, data: Mapping[str, Any], path: str) -> GuidedSpec:
    """Validate ``{"guided": {...}, "name": ..., "description": ...}`` of one stream."""
    extra = set(data) - {"guided", "name", "description"}
    if extra:
        raise ConfigError(
            f"a guided stream takes its channels and rate from the recording; {sorted(extra)} "
            "do not apply",
            key=f"{path}.{sorted(extra)[0]}",
            fix="remove it, or drop 'guided' to declare a synthetic stream",
        )
    guided = check_keys(data["guided"], f"{path}.guided", _GUIDED_KEYS, "guided stream")
    for key in ("collection", "stream"):
        if not isinstance(guided.get(key), str) or not guided[key]:
            raise ConfigError(
                f"missing {key}",
                key=f"{path}.guided.{key}",
                fix=f'set the recorded {key} id, e.g. "{key}": "my_{key}"',
            )
    attrs = guided.get("attrs", {})
    if not isinstance(attrs, Mapping):
        raise ConfigError(
            "expected an object", key=f"{path}.guided.attrs", fix='e.g. "attrs": {"subject": "1"}'
        )
    return GuidedSpec(
        id=stream_id,
        collection=guided["collection"],
        stream=guided["stream"],
        attrs={str(k): str(v) for k, v in attrs.items()},
        chunk_ms=config_number(guided, "chunk_ms", f"{path}.guided", 10.0, positive=True),
        name=str(data.get("name", "")),
        description=str(data.get("description", "")),
    )


class GuidedSource(Source):
    """Replays a recording in device-sized chunks, looping, on the wall clock."""

    paced = False

    def __init__(self, stream: Stream, replay: Source) -> None:
        super().__init__(stream)
        self._replay = replay
        self._t0_wall = 0.0

    async def open(self) -> None:
        await self._replay.open()

    async def aclose(self) -> None:
        await self._replay.aclose()

    async def chunks(self) -> AsyncGenerator[Chunk, None]:
        loop = asyncio.get_running_loop()
        first: float | None = None
        async with contextlib.aclosing(self._replay.chunks()) as chunks:
            async for timestamps, values in chunks:
                if first is None:
                    first = float(timestamps[0])
                    # The wall time at which the first sample was due, not when the file
                    # was opened: loading the file must not look like latency.
                    started = getattr(self._replay, "started_at", None) or loop.time()
                    self._t0_wall = time.time() - (loop.time() - started)
                yield self._t0_wall + (timestamps - first), values


def device_framing(spec: GuidedSpec) -> Framing:
    """Chunks of ``chunk_ms``, as a device delivers them (the task frames them later)."""
    return Framing(max_samples=1 << 20, max_latency_ms=spec.chunk_ms)
