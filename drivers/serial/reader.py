"""One reader thread per open port: read, parse, stamp, and hand chunks to every source."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import serial

from ...errors import DeviceError, DeviceLost
from ...sampleclock import SampleClock
from ..base import Chunk
from .options import DeviceSpec
from .parsers import ParseStats, make_parser

if TYPE_CHECKING:  # the source imports this module
    from .source import SerialSource

log = logging.getLogger(__name__)

# A blocking read returns after this long without data, so a stop is noticed even where
# cancel_read() is not available (non-POSIX ports, URL handlers).
READ_TIMEOUT_S = 0.1
# A regular stream's reads are batched for the source period of its sources' framing
# (half the latency budget; the shortest when several share the port), at most this
# long: a 1 kHz device then costs ~100 reads and chunks a second instead of 1000, and
# a low-latency task still gets its samples every 1 ms.
MAX_BATCH_S = 0.01
JOIN_TIMEOUT_S = 2.0
WARN_EVERY_S = 10.0
# -- the reader ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Ended:
    """End of chunks with a reason; each source raises its own exception from it."""

    reason: str
    lost: bool  # DeviceLost (retried by the task) or DeviceError (ends the task)
    cause: BaseException | None = None  # pyserial's error, kept as each one's cause


class _Warner:
    """Rate-limited WARNING about bad input, so a noisy device cannot flood the log."""

    def __init__(self, node_id: str, stats: ParseStats) -> None:
        self.node_id = node_id
        self.stats = stats
        self._last_time = -math.inf
        self._last_count = stats.problems()

    def check(self) -> None:
        count = self.stats.problems()
        now = time.monotonic()
        if count == self._last_count or now - self._last_time < WARN_EVERY_S:
            return
        s = self.stats
        log.warning(
            "serial device %s: %d new problems (so far %d bad lines/packets, %d missing "
            "values, %d resyncs, %d samples dropped); last bad input: %r",
            self.node_id, count - self._last_count, s.bad, s.missing, s.resyncs, s.dropped,
            s.last_bad,
        )  # fmt: skip
        self._last_time, self._last_count = now, count


def _open_port(spec: DeviceSpec) -> serial.SerialBase:
    """Open the port (blocking). Raises DeviceLost if it is not there (yet)."""
    try:
        return serial.serial_for_url(
            spec.port,
            baudrate=spec.baudrate,
            timeout=READ_TIMEOUT_S,
            # POSIX: an flock, so another process cannot open the port and split the
            # byte stream with us (pyserial ignores it for URL handlers).
            **({"exclusive": True} if os.name == "posix" else {}),
        )
    except (serial.SerialException, OSError) as exc:
        hint = ""
        if getattr(exc, "errno", None) == errno.EACCES:
            hint = " (permission denied: add the user to the port's group, e.g. dialout)"
        raise DeviceLost(f"port {spec.port} not available: {exc}{hint}") from exc
    except ValueError as exc:  # an unknown URL scheme or setting: retrying cannot help
        raise DeviceError(f"port {spec.port} cannot be opened: {exc}") from exc


async def _open_port_async(spec: DeviceSpec) -> serial.SerialBase:
    """Open the port in a thread; if the caller is cancelled meanwhile, close it after."""
    opening = asyncio.ensure_future(asyncio.to_thread(_open_port, spec))
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:
        # The thread cannot be stopped mid-open: let it finish, then release the port.
        opening.add_done_callback(_close_opened)
        raise


def _close_opened(opening: asyncio.Future[serial.SerialBase]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        with contextlib.suppress(Exception):
            opening.result().close()


class _PortReader:
    """The one reader of a device's port, shared by every source open on it.

    The port is opened when the first source attaches and closed when the last detaches
    (or the device is lost, or the driver closes). The thread owns the port while it
    runs; the event loop only attaches, detaches and asks it to stop.
    """

    def __init__(self, spec: DeviceSpec, stats: ParseStats) -> None:
        self.spec = spec
        self.stats = stats
        self._guard = threading.Lock()  # the fields below, between loop and thread
        self._subscribers: list[SerialSource] = []
        self._port: serial.SerialBase | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._locks: dict[asyncio.AbstractEventLoop, asyncio.Lock] = {}
        # Irregular streams are read as soon as bytes come: their arrival is their time.
        self._batch_s = 0.0  # set from the subscribers' periods (read by the thread)

    def _set_batch(self) -> None:
        """Batch reads for the shortest period any subscriber wants (guard held)."""
        periods = [source.period_s for source in self._subscribers]
        self._batch_s = min(periods) if periods and self.spec.rate > 0 else 0.0

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _lock(self) -> asyncio.Lock:
        # Attach and detach take turns on the loop; one lock per loop, as locks bind to one.
        loop = asyncio.get_running_loop()
        if loop not in self._locks:
            self._locks = {loop: asyncio.Lock()}
        return self._locks[loop]

    async def attach(self, source: SerialSource) -> None:
        """Start delivering to ``source``; open the port first if no one has it open."""
        async with self._lock():
            with self._guard:
                if self._port is not None and not self._stop.is_set():
                    self._subscribers.append(source)
                    self._set_batch()
                    return
            await self._join()  # a reader that is ending still holds the port
            if self.running:
                # It did not stop in time: opening the port again would give two readers
                # one byte stream. The task retries later, when the old one has ended.
                raise DeviceLost(f"the previous reader of {self.spec.port} has not stopped yet")
            port = await _open_port_async(self.spec)
            stop = threading.Event()  # each reader has its own: an old one cannot clear it
            with self._guard:
                self._subscribers.append(source)
                self._set_batch()
                self._port = port
                self._stop = stop
                self._thread = threading.Thread(
                    target=self._run,
                    args=(port, stop),
                    name=f"serial-{self.spec.id}",
                    daemon=True,
                )
                self._thread.start()

    async def detach(self, source: SerialSource) -> None:
        """Stop delivering to ``source``; the last one out stops the reader."""
        async with self._lock():
            with self._guard:
                if source in self._subscribers:
                    self._subscribers.remove(source)
                    self._set_batch()
                if self._subscribers:
                    return
                self._request_stop()
            await self._join()

    async def halt(self) -> None:
        """Stop the reader whoever is attached (they get the end of their chunks)."""
        async with self._lock():
            with self._guard:
                self._request_stop()
            await self._join()

    def _request_stop(self) -> None:
        # Called with the guard held, so the port cannot be closed under us.
        self._stop.set()
        if self._port is not None and hasattr(self._port, "cancel_read"):
            with contextlib.suppress(Exception):  # a port that is failing anyway
                self._port.cancel_read()  # wake a blocked read now, not at its timeout

    async def _join(self) -> None:
        thread = self._thread
        if thread is None:
            return
        await asyncio.to_thread(thread.join, JOIN_TIMEOUT_S)
        if thread.is_alive():
            log.error("serial reader of %s did not stop in %.1f s", self.spec.id, JOIN_TIMEOUT_S)
        else:
            self._thread = None

    def _publish(self, chunk: Chunk) -> None:
        with self._guard:
            subscribers = list(self._subscribers)
        for i, source in enumerate(subscribers):
            # Every consumer gets arrays of its own: frames are theirs to modify.
            source.post(chunk if i == 0 else (chunk[0].copy(), chunk[1].copy()))

    def _run(self, port: serial.SerialBase, stop: threading.Event) -> None:
        """The reader thread: read, parse, stamp, publish, until stopped or lost."""
        spec = self.spec
        ending: _Ended | None = None
        warner = _Warner(spec.id, self.stats)
        try:
            parser = make_parser(spec.format, spec.channel_names, spec.dtype, self.stats)
            clock = SampleClock(spec.rate, spec.format.counter_bits)
            if spec.start:
                port.write(spec.start)
            while not stop.is_set():
                data = port.read(max(1, port.in_waiting))
                if not data:
                    continue
                batch = self._batch_s
                if batch and stop.wait(batch):
                    break
                waiting = port.in_waiting
                if waiting:
                    data += port.read(waiting)
                arrival = time.time()
                values, counters = parser.feed(data)
                if len(values):
                    self._publish((clock.stamp(len(values), arrival, counters), values))
                warner.check()
        except (serial.SerialException, OSError) as exc:
            if not stop.is_set():
                ending = _Ended(f"port {spec.port} lost: {exc}", lost=True, cause=exc)
        except Exception as exc:  # a bug here, not the device: end the tasks, loudly
            log.exception("serial reader of %s failed", spec.id)
            ending = _Ended(f"serial reader of {spec.id} failed: {exc!r}", lost=False, cause=exc)
        finally:
            self._finish(port, stop, ending)
            warner.check()

    def _finish(
        self, port: serial.SerialBase, stop: threading.Event, ending: _Ended | None
    ) -> None:
        if self.spec.stop and ending is None:
            with contextlib.suppress(Exception):  # best effort: the device may be gone
                port.write(self.spec.stop)
                port.flush()
        subscribers: list[SerialSource] = []
        with self._guard:
            stop.set()  # a stopped reader is not reused: the next attach reopens
            if self._port is port:  # only the current reader's state is ours to end
                subscribers, self._subscribers = self._subscribers, []
                self._port = None
            with contextlib.suppress(Exception):
                port.close()
        for source in subscribers:
            source.end(ending)
