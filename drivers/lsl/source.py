"""One LSL stream proxied through a reader thread (a live source)."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any

from ...channel import Channel
from ...errors import DeviceLost
from ...framing import Framing
from ..base import Chunk, Source
from .options import MAX_PENDING_CHUNKS, MAX_PULL_PERIOD_S, MAX_PULL_ROWS, MIN_PULL_ROWS
from .outlets import _Known, _Outlet
from .reader import _InletReader, _join

if TYPE_CHECKING:  # the driver imports this module
    from .driver import LslDriver


class LslSource(Source):
    """One LSL stream, proxied through an inlet in a reader thread (live, not paced)."""

    paced = False

    def __init__(self, known: _Known, driver: LslDriver, framing: Framing) -> None:
        super().__init__(known.stream)
        self._known = known
        self._driver = driver
        # Pull as much as a frame holds (at least MIN_PULL_ROWS): fewer, larger pulls.
        self._rows = min(max(framing.max_samples, MIN_PULL_ROWS), MAX_PULL_ROWS)
        self.period_s = framing.source_period_s(MAX_PULL_PERIOD_S)
        self._reader: _InletReader | None = None
        self._channel: Channel[Any] | None = None
        self.outlet: _Outlet | None = None  # the outlet this source is connected to

    async def open(self) -> None:
        """Connect to the stream's outlet. Raises DeviceLost if none answers.

        Raises DeviceError once the driver is closed.
        """
        candidates = await self._driver.candidates(self._known)
        if not candidates:
            raise DeviceLost(f"{self._known.label()} is not on the network")
        # Made here, not in __init__: the API builds sources in a worker thread.
        # Chunks never overflow it: the reader sends only with a credit.
        self._channel = channel = Channel[Any](MAX_PENDING_CHUNKS + 1)
        reader = _InletReader(
            self._known, candidates, self._driver, channel, self._rows, self.period_s
        )
        self._driver.register_reader(reader)  # raises DeviceError once the driver is closed
        self._reader = reader
        reader.start()
        try:
            self.outlet = await channel.receive()
        except BaseException:
            # Lost, failed, stopped by the driver, or cancelled while connecting (the
            # thread notices a stop within one connect step).
            await self.aclose()
            raise

    async def aclose(self) -> None:
        """Stop the reader thread (it closes the inlet) and wait for it. Idempotent."""
        reader, self._reader = self._reader, None
        if reader is None:
            return
        reader.stop()
        await _join(reader)

    async def chunks(self) -> AsyncGenerator[Chunk, None]:
        """Yield chunks as the inlet delivers them; raise DeviceLost when the outlet goes."""
        if self._reader is None:
            await self.open()
        reader, channel = self._reader, self._channel
        assert reader is not None and channel is not None
        async for chunk in channel:
            reader.credits.release()
            yield chunk
