"""The reader thread that owns one inlet: connect, pull, hand chunks to the loop."""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ...channel import Channel
from ...errors import DatamuxError, DeviceError, DeviceLost, device_failure
from ...model import numpy_dtype
from ..base import Chunk
from .liblsl import LSL_DTYPES, PROCESSING_FLAGS, LostError, LslTimeout, pylsl
from .options import (
    CONNECT_STEP_S,
    CONNECT_TIMEOUT_S,
    JOIN_TIMEOUT_S,
    LOSS_CHECK_S,
    MAX_PENDING_CHUNKS,
    MAX_STRING_PULL_ROWS,
    PULL_TIMEOUT_S,
)
from .outlets import _Known, _Outlet

if TYPE_CHECKING:  # the driver imports this module
    from .driver import LslDriver


class _Lost(Exception):
    """The inlet's outlet is gone (raised inside a reader thread)."""


class _Stopped(Exception):
    """The reader was stopped (by its source or the driver): not the outlet's fault."""


def _stopped() -> DeviceError:
    return DeviceError("LSL driver closed")


class _InletReader(threading.Thread):
    """Owns one inlet: connects, pulls chunks, hands them to the event loop.

    Why a dedicated thread rather than ``asyncio.to_thread`` per pull: a pull blocks up
    to :data:`PULL_TIMEOUT_S`, and many open streams would each pin a worker of the
    loop's shared default executor (which replay and the catalog use too). One thread
    per inlet also keeps every liblsl call on one inlet in one thread, so the inlet is
    destroyed by the thread that uses it, never while a pull is running.

    Sends on ``channel`` the outlet it connected to, then chunks; it always closes the
    channel as it ends: with DeviceLost (the outlet is gone) or DeviceError (failed,
    or stopped: only the driver stops a reader under a running source). A chunk is sent only
    with a credit, given back as the loop takes it: the thread waits, and liblsl keeps
    buffering, rather than the channel dropping samples.
    """

    def __init__(
        self,
        known: _Known,
        candidates: Sequence[_Outlet],
        driver: LslDriver,
        channel: Channel[Any],
        rows: int,
        period_s: float,
    ) -> None:
        super().__init__(name=f"lsl-{known.stream.id}", daemon=True)
        self.known = known
        self.candidates = list(candidates)
        self.driver = driver
        self.channel = channel
        self.rows = rows
        self.period_s = period_s
        self.credits = threading.Semaphore(MAX_PENDING_CHUNKS)
        self._stopping = threading.Event()

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        inlet = None
        try:
            inlet, outlet = self._connect()
            self.channel.send(outlet)
            self._pump(inlet, outlet)
            self.channel.close(_stopped())  # the pump returns only when stopped
        except _Stopped:
            self.channel.close(_stopped())
        except _Lost as exc:
            self.channel.close(DeviceLost(str(exc)))
        except Exception as exc:
            if not isinstance(exc, DatamuxError):
                reason = f"{type(exc).__name__}: {exc}"
                exc = device_failure(f"{self.known.label()} failed: {reason}", exc, lost=False)
            self.channel.close(exc)
        finally:
            if inlet is not None:
                with contextlib.suppress(Exception):
                    inlet.close_stream()
            del inlet  # destroyed here, in the only thread that ever used it
            self.driver.unregister_reader(self)

    def _connect(self) -> tuple[Any, _Outlet]:
        expected = self.known.outlet.layout
        reasons = []
        for outlet in self.candidates:
            if outlet.layout != expected:
                reasons.append(
                    f"{outlet.uid} has {outlet.channel_count} channels of format "
                    f"{outlet.channel_format}, expected {expected[0]} of {expected[1]}"
                )
                continue
            inlet = None
            try:
                inlet = pylsl.StreamInlet(
                    outlet.info,
                    max_buflen=max(1, math.ceil(self.driver.options.max_buffered_s)),
                    recover=False,  # we want LostError, and to report the outage ourselves
                    processing_flags=PROCESSING_FLAGS,
                )
                self._until_connected(inlet.open_stream)
                # The first correction takes a few round trips: take it now, so the
                # first pull is not delayed and a dead outlet fails here.
                self._until_connected(inlet.time_correction)
                return inlet, outlet
            except _Stopped:
                del inlet  # a stop says nothing about the outlet: it stays listed
                raise
            except (_Lost, RuntimeError) as exc:  # pylsl's errors are RuntimeErrors
                self.driver.mark_suspect(outlet.uid)
                reasons.append(f"{outlet.uid}: {exc or type(exc).__name__}")
                del inlet
            if self._stopping.is_set():
                raise _Stopped
        detail = "; ".join(reasons) or "not on the network"
        raise _Lost(f"{self.known.label()}: {detail}")

    def _until_connected(self, step: Callable[..., Any]) -> None:
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while True:
            if self._stopping.is_set():
                raise _Stopped
            try:
                step(timeout=CONNECT_STEP_S)
                return
            except LslTimeout:
                if time.monotonic() >= deadline:
                    raise _Lost(f"no answer within {CONNECT_TIMEOUT_S:g} s") from None

    def _pump(self, inlet: Any, outlet: _Outlet) -> None:
        if outlet.channel_format == pylsl.cf_string:
            full, pull = min(self.rows, MAX_STRING_PULL_ROWS), self._string_pull(inlet)
        else:
            full, pull = self.rows, self._numeric_pull(inlet, outlet)
        checked = time.monotonic()
        while not self._stopping.is_set():
            try:
                chunk = pull()
            except LostError:
                self.driver.mark_suspect(outlet.uid)
                raise _Lost(f"{self.known.label()} vanished (connection lost)") from None
            now = time.monotonic()
            if chunk is None:
                # Silence is normal for markers; a vanished host never closes the
                # connection, so ask the resolver whether the outlet still answers.
                if now - checked >= LOSS_CHECK_S:
                    checked = now
                    if not self.driver.is_listed(outlet.uid):
                        raise _Lost(f"{self.known.label()} no longer answers on the network")
                continue
            checked = now
            if not self._take_credit():
                return
            self.channel.send(chunk)
            # One hand-off per source period: what arrives meanwhile waits in liblsl and
            # comes with the next pull (a pull returns as soon as one sample is there).
            # A full pull means a backlog: pull again at once.
            if len(chunk[0]) < full:
                rest = now + self.period_s - time.monotonic()
                if rest > 0 and self._stopping.wait(rest):
                    return

    def _take_credit(self) -> bool:
        """Wait until the loop has room; meanwhile liblsl keeps buffering. False: stop."""
        while not self.credits.acquire(timeout=PULL_TIMEOUT_S):
            if self._stopping.is_set():
                return False
        return True

    def _numeric_pull(self, inlet: Any, outlet: _Outlet) -> Callable[[], Chunk | None]:
        dtype = numpy_dtype(LSL_DTYPES[outlet.channel_format])
        buffer = np.empty((self.rows, outlet.channel_count), dtype=dtype)

        def pull() -> Chunk | None:
            # min_samples=1: wait for the first sample only, then take what is there.
            values, timestamps = inlet.pull_chunk(
                timeout=PULL_TIMEOUT_S, max_samples=self.rows, dest_obj=buffer,
                min_samples=1, as_numpy=True,
            )  # fmt: skip
            n = len(timestamps)
            if n == 0:
                return None
            # Copies: the buffer is reused, and the timestamp array is rows long.
            return np.array(timestamps, dtype=np.float64), values[:n].copy()

        return pull

    def _string_pull(self, inlet: Any) -> Callable[[], Chunk | None]:
        rows = min(self.rows, MAX_STRING_PULL_ROWS)

        def pull() -> Chunk | None:
            raw, timestamps = inlet.pull_chunk(
                timeout=PULL_TIMEOUT_S, max_samples=rows, min_samples=1, as_numpy=True
            )
            if len(timestamps) == 0:
                return None
            # Raw bytes as sent; a device that sends invalid UTF-8 gets U+FFFD, not a crash.
            text = np.char.decode(raw.astype(np.bytes_), "utf-8", errors="replace")
            return np.asarray(timestamps, dtype=np.float64), text

        return pull


async def _join(reader: _InletReader) -> None:
    """Wait (at most JOIN_TIMEOUT_S) for a stopped reader thread to end.

    A cancellation during the wait is held back until the thread has ended, then
    re-raised: a stopped task must leave no thread behind, and Task.stop cancels
    repeatedly while it waits. The wait is short: a reader notices the stop within one
    pull timeout.
    """
    joining = asyncio.ensure_future(asyncio.to_thread(reader.join, JOIN_TIMEOUT_S))
    cancelled = False
    while not joining.done():
        try:
            await asyncio.shield(joining)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
