"""One stream of one BLE device, fed by notifications through the device's link."""

from __future__ import annotations

import asyncio
import logging
import math
import struct
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING

import numpy as np

from ...channel import Channel, ChannelClosed
from ...errors import DeviceLost
from ...sampleclock import CLOCK_MAX_LAG_S, SampleClock
from ..base import Chunk, Source
from .link import _Link
from .options import DeviceSpec, StreamSpec

if TYPE_CHECKING:  # the driver imports this module
    from .driver import BleDriver

log = logging.getLogger(__name__)

# How long a source waits for a notification before asking whether the link is alive:
# covers a backend that misses the disconnect event.
LIVENESS_CHECK_S = 1.0
# A stream with a rate continues its sample clock while the newest sample stays within
# max(CLOCK_SLACK_S, 2 / rate) of the notification's arrival (a steady SampleClock).
CLOCK_SLACK_S = CLOCK_MAX_LAG_S
# Chunks held between the notify callback and the task; past that the oldest are dropped
# (the task's own buffer is bounded too, so this only fills if the loop starves).
MAX_PENDING_CHUNKS = 1024
# -- sources -------------------------------------------------------------------------------


def _samples(chunk: Chunk) -> int:
    return len(chunk[0])


class BleSource(Source):
    """One stream of one BLE device, fed by notifications through a shared link.

    Timestamps are wall-clock seconds (``time.time()``) at the notification's arrival,
    spread backwards for several samples per notification (see :func:`rr_timestamps`
    and :class:`StructDecoder`), then clamped so they never go backwards.

    A stream with a rate keeps a steady :class:`SampleClock` instead: BLE
    delivers several notifications per connection event, so arrival times bunch up,
    and stamping each notification's last sample on arrival would give equal stamps.
    """

    paced = False

    def __init__(self, driver: BleDriver, device: DeviceSpec, spec: StreamSpec) -> None:
        super().__init__(spec.to_stream(device))
        self.device = device
        self.spec = spec
        self.malformed = 0  # notifications that did not decode
        self._driver = driver
        self._link: _Link | None = None
        self._channel: Channel[Chunk] = Channel(
            MAX_PENDING_CHUNKS, size=_samples, on_drop=self._count_dropped
        )
        self._last_t = -math.inf
        self._clock = SampleClock(spec.frequency, steady=True)
        self._generation: int | None = None  # the link's, when subscribed
        self._closed = False

    async def open(self) -> None:
        """Connect (or join the device's connection) and subscribe.

        Raises:
            DeviceLost: the device is not there or the connection failed.
            DeviceError: the device lacks the stream's characteristic.
        """
        link = self._driver.link(self.device.address)
        await link.acquire()
        self._link = link
        try:
            self._generation = await link.subscribe(self.spec.characteristic, self)
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        """Unsubscribe and leave the link (the last user disconnects). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._channel.close()
        link, self._link = self._link, None
        if link is None:
            return
        try:
            await link.unsubscribe(self.spec.characteristic, self)
        finally:
            link.release()

    # Called by the link, on the event loop.

    def deliver(self, data: bytes, arrival: float) -> None:
        try:
            timestamps, values = self.spec.decode(data, arrival)
        except (ValueError, struct.error) as exc:
            self.malformed += 1
            where = f"{self.device.id}/{self.spec.id}"
            log.debug("BLE %s: bad notification %s: %s", where, data.hex(), exc)
            return
        if len(timestamps) == 0:
            return
        if self.spec.frequency > 0:
            timestamps = self._clock.stamp(len(timestamps), arrival)
        # Arrival times jitter; a later notification must not stamp before an earlier one.
        timestamps = np.maximum.accumulate(np.maximum(timestamps, self._last_t))
        self._last_t = float(timestamps[-1])
        self._channel.send((timestamps, values))

    def _count_dropped(self, samples: int) -> None:
        self.dropped += samples  # the loop fell behind: oldest chunks went first

    def lost(self, reason: str) -> None:
        self._channel.close(DeviceLost(reason))

    async def chunks(self) -> AsyncGenerator[Chunk, None]:
        """Yield decoded notifications; raise DeviceLost when the device drops."""
        if self._link is None and not self._closed:
            await self.open()
        while not self._closed:
            try:
                async with asyncio.timeout(LIVENESS_CHECK_S):
                    item = await self._channel.receive()
            except ChannelClosed:
                return
            except TimeoutError:
                link = self._link
                if (
                    link is not None
                    and self._generation is not None
                    and not link.alive(self._generation)
                    and not self._channel.closed  # else check() just reported the loss
                ):
                    # A loss this source was not told about (a client gone without a
                    # disconnect event is told through check(), which closes the channel).
                    raise DeviceLost(f"BLE device {self.device.address}: connection lost") from None
                continue
            yield item
