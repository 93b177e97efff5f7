"""The driver contract: what every source of samples implements.

A :class:`Driver` knows a family of live nodes (simulated devices, LSL outlets, serial
ports...). It lists them and opens one of their streams as a :class:`Source`. A source is
an async context manager whose :meth:`Source.chunks` yields ``(timestamps, values)``
numpy chunks: timestamps float64 of shape (n,), values of shape (n, channels).

Blocking I/O belongs in a thread (``asyncio.to_thread``); a source never blocks the
event loop.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncGenerator, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from ..framing import Chunk, Framing
from ..model import Field, Node, Stream, seconds_index

__all__ = ["Chunk", "Driver", "DriverStatus", "Source", "live_stream"]


def live_stream(
    stream_id: str,
    node_id: str,
    channels: Mapping[str, Any] | Iterable[str],
    *,
    dtype: str,
    attrs: Mapping[str, Any],
    name: str = "",
    description: str = "",
    unit: str = "",
    frequency: float = 0.0,
) -> Stream:
    """The public metadata of a device's stream, stamped in seconds.

    ``channels`` are channel ids, or ids mapped to specs whose ``name``, ``description``
    and ``unit`` (each optional; empty: the channel id, nothing, the stream's unit)
    describe the channel.
    """
    pairs = channels.items() if isinstance(channels, Mapping) else ((ch, None) for ch in channels)
    fields = {
        ch: Field(
            id=ch,
            name=getattr(spec, "name", "") or ch,
            description=getattr(spec, "description", ""),
            dtype=dtype,
            unit=getattr(spec, "unit", "") or unit,
        )
        for ch, spec in pairs
    }
    return Stream(
        id=stream_id,
        name=name or stream_id,
        description=description,
        unit=unit,
        frequency=frequency,
        fields=fields,
        index=seconds_index(),
        node_id=node_id,
        attrs=dict(attrs),
    )


class Source(abc.ABC):
    """One opened stream.

    ``paced`` says who cuts frames. A live source (False) yields chunks as the device
    delivers them and the task's framer groups them. A paced source (True) knows its
    future, cuts each frame itself and releases it on schedule; the task passes its
    chunks through unchanged.
    """

    paced: bool = False
    #: Samples the source itself had to drop (a full device buffer...); the task reports
    #: every increase to the consumer as a ``StreamStatus("dropped")``.
    dropped: int = 0
    #: How often a live source hands over a chunk while data flows, in seconds (0:
    #: unknown or irregular). The task's framer flushes a frame that would be due
    #: before the next chunk with this one, so regular sources cost no timer wake-ups.
    period_s: float = 0.0

    def __init__(self, stream: Stream) -> None:
        self.stream = stream

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Acquire the device or file. Raise DeviceLost if it is not there (yet)."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release everything :meth:`open` acquired. Safe to call twice."""

    @abc.abstractmethod
    def chunks(self) -> AsyncGenerator[Chunk, None]:
        """Yield chunks until the stream ends; raise DeviceLost when the device vanishes."""

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


@dataclass(frozen=True)
class DriverStatus:
    """How a driver is doing, for the birth and health messages and ``datamux status``.

    ``state`` is ``"ok"`` (serving), ``"degraded"`` (serving, but part of it fails: no
    BLE adapter, a configured serial port missing) or ``"unavailable"`` (cannot start; it
    is retried). ``reason`` says what failed and ``fix`` what to do about it.
    """

    name: str
    state: str = "ok"
    reason: str = ""
    fix: str = ""
    since: float = 0.0  # time.time() of the last change of state, 0 if unknown
    retry_in_s: float | None = None

    def to_dict(self) -> dict[str, object]:
        """What is known, for JSON: an ``ok`` driver is just its name and state."""
        out: dict[str, object] = {"name": self.name, "state": self.state}
        if self.reason:
            out["reason"] = self.reason
        if self.fix:
            out["fix"] = self.fix
        if self.since:
            out["since"] = self.since
        if self.retry_in_s is not None:
            out["retry_in_s"] = self.retry_in_s
        return out


class Driver(abc.ABC):
    """A family of live nodes: lists them and opens their streams."""

    #: The name the registry and configs use for this driver ("sim", "lsl", ...).
    name: str = ""

    @classmethod
    def from_config(cls, options: Mapping[str, Any], *, recordings: Any = None) -> Self:
        """Build the driver from its config section, ``drivers.<name>``.

        Raise ConfigError naming the key (``drivers.<name>.<key>``) on bad options.
        ``recordings`` opens replays of the collections (a :class:`.replay.ReplayOpener`),
        for drivers that replay them; drivers get that, never the API.
        """
        return cls()

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release what the driver holds (discovery threads, an adapter...)."""

    def status(self) -> DriverStatus:
        """How the driver is doing now (cheap: called with every health message)."""
        return DriverStatus(self.name)

    @abc.abstractmethod
    async def list_nodes(self) -> list[Node]:
        """The nodes this driver can see now."""

    @abc.abstractmethod
    async def list_streams(self, node_id: str) -> list[Stream]:
        """The streams of one node. Raise NotFound for an unknown node."""

    @abc.abstractmethod
    def open_stream(
        self, node_id: str, stream_id: str, attrs: Mapping[str, Any], framing: Framing
    ) -> Source:
        """A source for one stream (not yet opened). Raise NotFound for unknown ids."""
