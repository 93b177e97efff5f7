"""A live serial stream: chunks from its device's shared reader, through a channel."""

from __future__ import annotations

from collections.abc import AsyncGenerator

from ...channel import Channel
from ...errors import device_failure
from ...model import Stream
from ..base import Chunk, Source
from .parsers import ParseStats
from .reader import _Ended, _PortReader

# Chunks waiting for a source's consumer; past this the oldest are dropped and counted.
MAX_QUEUED_CHUNKS = 512
# -- sources and the driver ----------------------------------------------------------


class SerialSource(Source):
    """A live serial stream: chunks from the device's shared reader.

    Bad input is counted in :attr:`stats` (shared by every source of the device and kept
    across reopens); :attr:`bad`, :attr:`missing` and :attr:`resyncs` are shortcuts.
    """

    paced = False

    def __init__(self, stream: Stream, reader: _PortReader, period_s: float) -> None:
        super().__init__(stream)
        self._reader = reader
        self.period_s = period_s  # how often it wants chunks (Framing.source_period_s)
        self._channel = self._new_channel()
        self._attached = False

    def _new_channel(self) -> Channel[Chunk]:
        return Channel(MAX_QUEUED_CHUNKS, size=lambda chunk: len(chunk[0]), on_drop=self._count)

    def _count(self, samples: int) -> None:
        # Source.dropped: this source's consumer fell behind (oldest chunks went first).
        self.stats.dropped += samples
        self.dropped += samples

    @property
    def stats(self) -> ParseStats:
        return self._reader.stats

    @property
    def bad(self) -> int:
        """Lines or packets rejected so far."""
        return self.stats.bad

    @property
    def missing(self) -> int:
        """key=value: channel values missing from good lines so far (NaN)."""
        return self.stats.missing

    @property
    def resyncs(self) -> int:
        """binary: times bytes were skipped to find the next packet."""
        return self.stats.resyncs

    async def open(self) -> None:
        """Attach to the device's reader, opening the port. DeviceLost if it is absent."""
        if self._attached:
            return
        self._channel = self._new_channel()  # bound to this loop
        await self._reader.attach(self)
        self._attached = True

    async def aclose(self) -> None:
        """Detach; the last source of a device stops its reader and closes the port."""
        if not self._attached:
            return
        self._attached = False
        await self._reader.detach(self)
        self._channel.close()

    def post(self, chunk: Chunk) -> None:
        """From the reader thread: hand a chunk to this source's loop."""
        self._channel.send(chunk)

    def end(self, ending: _Ended | None) -> None:
        """From the reader thread: no more chunks; with a reason, the source raises."""
        if ending is None:
            self._channel.close()
            return
        self._channel.close(device_failure(ending.reason, ending.cause, lost=ending.lost))

    async def chunks(self) -> AsyncGenerator[Chunk, None]:
        """Yield chunks as the device sends them; DeviceLost when it vanishes."""
        if not self._attached:
            await self.open()
        async for chunk in self._channel:
            yield chunk
