"""Tasks: one subscription each, from a source to a sink, ending with END_OF_STREAM.

A task opens its source, turns chunks into frames and puts them on the sink. Whatever
happens, the sink's last item is END_OF_STREAM: after the data, after an error item
(:class:`StreamError`), or after :meth:`Task.stop`. Live sources that lose their device
are reopened with exponential backoff; the task reports each loss and return with a
:class:`StreamStatus` item and keeps going.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .channel import put_when_room
from .errors import DeviceLost
from .framing import Framer, Framing
from .model import Frame, StreamError, StreamStatus
from .util import END_OF_STREAM, describe_error

__all__ = ["Framer", "Task"]  # Framer lives in framing.py

log = logging.getLogger(__name__)

# An unbounded sink may hold this many frames before the task waits for the consumer:
# replay then slows to the consumer's pace and live sources drop their oldest samples,
# instead of memory growing without limit.
SINK_HIGH_WATER = 256
# Live samples buffered between a device and the framer, in frames' worth.
BUFFER_FRAMES = 16
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 5.0


class Task:
    """Runs one source into one sink until the source ends, fails or is stopped.

    Args:
        task_id: the id returned to the caller (``StreamAck.randseq``).
        open_source: makes a fresh (unopened) source; called again after a device loss.
        sink: where frames, status items, error items and END_OF_STREAM go.
        attrs: echoed on every frame.
        framing: frame limits for live sources.
        owner: who started the task (a client id for remote tasks).
        transform: applied to each frame; its result goes on the sink instead.
        control: a replay's :class:`ReplayControl`, for :meth:`API.control_task`.
    """

    def __init__(
        self,
        task_id: str,
        open_source: Callable[[], Any],
        sink: asyncio.Queue[Any],
        *,
        stream_id: str,
        channels: list[str],
        attrs: Mapping[str, Any],
        framing: Framing,
        owner: str = "",
        transform: Callable[[Frame], Any] | None = None,
        control: Any = None,
    ) -> None:
        self.id = task_id
        #: The replay's ReplayControl (None for live tasks): what control_task steers.
        self.control = control
        self.open_source = open_source
        self.sink = sink
        self.stream_id = stream_id
        self.channels = channels
        self.attrs = dict(attrs)
        self.framing = framing
        self.owner = owner
        self.transform = transform
        self.frames_sent = 0
        self.samples_sent = 0
        self.samples_dropped = 0
        self.started = time.time()
        self._runner: asyncio.Task[None] | None = None
        self._end_delivery: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, on_done: Callable[[Task], None] | None = None) -> None:
        self._runner = asyncio.create_task(self._run(), name=f"task-{self.id}")
        if on_done is not None:
            self._runner.add_done_callback(lambda _: on_done(self))

    @property
    def done(self) -> bool:
        return self._runner is not None and self._runner.done()

    async def stop(self, timeout: float = 1.0) -> None:
        """Stop the task; END_OF_STREAM is on the sink (or on its way) when this returns."""
        if self._runner is None:
            return
        self._runner.cancel()
        await asyncio.wait({self._runner}, timeout=timeout / 2)
        if not self._runner.done():
            # Library code can swallow a cancellation; cancel once more rather than hang.
            # (Not sooner: a second cancel would cut the source's cleanup short.)
            self._runner.cancel()
            await asyncio.wait({self._runner}, timeout=timeout / 2)
        if not self._runner.done():
            log.error("task %s did not stop within %.1f s", self.id, timeout)

    async def wait(self) -> None:
        if self._runner is not None:
            await asyncio.wait({self._runner})

    # -- the pipeline ------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._stream_with_retries()
        except asyncio.CancelledError:
            log.debug("task %s stopped", self.id)
        except Exception as exc:
            code, message = describe_error(exc)
            if code == "internal":
                log.exception("task %s failed", self.id)
            else:
                log.warning("task %s failed: %s", self.id, message)
            self._put_last(StreamError(self.stream_id, code, message))
        finally:
            self._put_last(END_OF_STREAM)

    async def _stream_with_retries(self) -> None:
        backoff = BACKOFF_FIRST_S
        lost = False
        while True:
            # Building a source may touch files (guided simulation): not on the loop.
            source = await asyncio.to_thread(self.open_source)
            try:
                async with source:
                    if lost:
                        await self._deliver(StreamStatus(self.stream_id, "reconnected"))
                        lost, backoff = False, BACKOFF_FIRST_S
                    if source.paced:
                        await self._pass_through(source)
                    else:
                        await self._frame_live(source)
                return
            except DeviceLost as exc:
                if not lost:
                    lost = True
                    log.warning("task %s: device lost: %s", self.id, exc)
                    await self._deliver(StreamStatus(self.stream_id, "disconnected", str(exc)))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _pass_through(self, source: Any) -> None:
        # aclosing: a stop or a failure closes the generator (and its file) at once.
        async with contextlib.aclosing(source.chunks()) as chunks:
            async for item in chunks:
                if isinstance(item, StreamStatus):  # a steered replay's jump or pause
                    await self._deliver(item)
                else:
                    await self._emit(*item)

    async def _frame_live(self, source: Any) -> None:
        """Frame a live source's chunks.

        The pump task takes each chunk and, when a frame is ready and the sink has room,
        emits it right there: a regular source's frames leave at its own chunk wakes.
        The loop below only wakes for what the pump cannot do: a frame falling due
        while the source is silent (a timer at the deadline, moved as frames leave,
        never firing while chunks come in time), a full sink, drops to report, the end.
        """
        loop = asyncio.get_running_loop()
        clock = loop.time
        capacity = self.framing.max_samples * BUFFER_FRAMES
        framer = Framer(self.framing, capacity, early=source.period_s)
        seen_drops = 0  # drops (framer's and source's) already reported
        wake = asyncio.Event()  # the loop below has something to do
        emitting = asyncio.Lock()  # one emitter at a time: frames keep their order
        timer: asyncio.TimerHandle | None = None
        ended = False
        failure: list[BaseException] = []

        def drops() -> int:
            return framer.dropped + source.dropped - seen_drops

        def arm() -> None:
            """A timer at the held frame's deadline (none when empty), moved as needed."""
            nonlocal timer
            deadline = framer.deadline()
            if timer is not None:
                if deadline is not None and timer.when() == deadline:
                    return
                timer.cancel()
                timer = None
            if deadline is not None:
                timer = loop.call_at(deadline, fire)

        def fire() -> None:
            nonlocal timer
            timer = None
            wake.set()

        async def flush(final: bool) -> None:
            nonlocal seen_drops
            async with emitting:
                if (lost := drops()) > 0:
                    seen_drops += lost
                    await self._report_drops(lost)
                while framer.ready(now := clock()) or (final and len(framer)):
                    await self._emit(*framer.pop(now))
            arm()

        async def pump() -> None:
            nonlocal ended
            try:
                async with contextlib.aclosing(source.chunks()) as chunks:
                    async for timestamps, values in chunks:
                        now = clock()
                        framer.push(timestamps, values, now)
                        if not (framer.ready(now) or drops() > 0):
                            arm()
                        elif emitting.locked() or drops() > 0 or self._sink_full():
                            wake.set()  # the loop below waits for room, never the pump
                        else:
                            await flush(False)  # no wait: the sink has room
            except Exception as exc:
                failure.append(exc)
            finally:
                ended = True
                wake.set()

        pumping = asyncio.create_task(pump(), name=f"pump-{self.id}")
        try:
            while True:
                await wake.wait()
                wake.clear()
                await flush(ended)
                if ended and not len(framer):
                    break
        finally:
            if timer is not None:
                timer.cancel()
            pumping.cancel()
            await asyncio.wait({pumping})
        if (lost := drops()) > 0:
            await self._report_drops(lost)
        if failure:
            raise failure[0]

    def _sink_full(self) -> bool:
        """Whether delivering now would wait for the consumer."""
        sink = self.sink
        if sink.maxsize > 0:
            return sink.full()
        return sink.qsize() >= SINK_HIGH_WATER

    async def _report_drops(self, newly: int) -> None:
        """Tell the consumer that samples were lost, so lost data is never silent."""
        self.samples_dropped += newly
        total = self.samples_dropped
        log.warning("task %s: the consumer is too slow; %d samples dropped", self.id, newly)
        reason = f"{newly} samples dropped (consumer too slow; {total} in all)"
        await self._deliver(StreamStatus(self.stream_id, "dropped", reason))

    async def _emit(self, timestamps: np.ndarray, values: np.ndarray) -> None:
        frame = Frame(
            stream_id=self.stream_id,
            seq=self.frames_sent,
            timestamps=timestamps,
            values=values,
            channels=self.channels,
            attrs=self.attrs,
        )
        await self._deliver(frame if self.transform is None else self.transform(frame))
        self.frames_sent += 1
        self.samples_sent += len(timestamps)

    async def _deliver(self, item: Any) -> None:
        await put_when_room(self.sink, item, SINK_HIGH_WATER)

    def _put_last(self, item: Any) -> None:
        """Put an item without waiting; a full sink gets it as soon as there is room."""
        if self._end_delivery is None:
            try:
                self.sink.put_nowait(item)
                return
            except asyncio.QueueFull:
                pass
        previous = self._end_delivery

        async def deliver_later() -> None:
            if previous is not None:
                await previous  # keep the error item ahead of END_OF_STREAM
            await self.sink.put(item)

        self._end_delivery = asyncio.get_running_loop().create_task(deliver_later())
