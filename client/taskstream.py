"""The client's end of one remote task: order, check and deliver what the agent sends.

Frames arrive on the task's data topic and control messages on its ctrl topic. A
:class:`TaskStream` drops duplicates (QoS 1 resends), reports gaps in ``seq`` as lost
frames, keeps at most :data:`INBOX_FRAMES` frames for a consumer that falls behind, and
makes sure the sink's last item is END_OF_STREAM, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from ..channel import Channel, put_when_room
from ..model import Frame, StreamError, StreamStatus
from ..protocol import status_data
from ..util import END_OF_STREAM

__all__ = ["INBOX_FRAMES", "SEQ_WINDOW", "TaskStream"]

log = logging.getLogger(__name__)

# After an "end" message, frames still on their way get this long to arrive.
END_GRACE_S = 0.5
# Frames held for a sink that is not being read; past this the oldest are dropped.
INBOX_FRAMES = 1024
# How far behind the newest frame a frame still counts as a QoS 1 resend. Resends are
# at most the unacknowledged window (mqttio.MAX_OUTSTANDING, 64) behind.
SEQ_WINDOW = 256


def _frame_samples(item: Any) -> int | None:
    return len(item) if isinstance(item, Frame) else None


class TaskStream:
    """The client's end of one remote task: orders, checks and delivers its items."""

    def __init__(
        self,
        agent: str,
        task_id: str,
        sink: asyncio.Queue[Any],
        on_end: Callable[[TaskStream], None],
    ) -> None:
        self.agent = agent
        self.task_id = task_id
        self.sink = sink
        self.on_end = on_end
        self.stream_id = ""
        self.next_seq = 0
        # Frames give way past INBOX_FRAMES (counted in samples); other items never do.
        self.inbox: Channel[Any] = Channel(INBOX_FRAMES, size=_frame_samples)
        self.restamp: Callable[[Frame], None] | None = None
        self.held: deque[tuple[int, StreamStatus]] = deque()  # (seq of the frame after it, item)
        self.frame_arrived = asyncio.Event()
        self.ended = asyncio.Event()  # END_OF_STREAM is on the sink
        self.finishing: asyncio.Task[None] | None = None
        self.agent_lost: asyncio.TimerHandle | None = None
        self.closing = False  # the last items are queued
        self.delivery = asyncio.get_running_loop().create_task(self._deliver())

    # -- items from the agent ------------------------------------------------------------

    def on_frame(self, frame: Frame) -> None:
        """A frame from the data topic: duplicates dropped, gaps reported.

        Only a frame at most :data:`SEQ_WINDOW` behind counts as a resend. A frame
        further behind means the sequence went back (a frame far ahead was forged, or
        came from another run): it is taken, with a status saying so, so that one bad
        ``seq`` can never silence the frames after it.
        """
        if self.closing:
            return
        behind = self.next_seq - frame.seq
        if 0 < behind <= SEQ_WINDOW:
            return  # a QoS 1 resend after a reconnect
        self.stream_id = frame.stream_id
        if self.restamp is not None:
            self.restamp(frame)  # onto the client's clock (clock="client")
        self._release_held(frame.seq)
        if behind > 0:
            reason = (
                f"seq went back from {self.next_seq - 1} to {frame.seq}: the frame(s) "
                "ahead were not of this stream; going on from here"
            )
            log.warning("task %s: %s", self.task_id, reason)
            self.put(StreamStatus(frame.stream_id, "dropped", reason))
        elif frame.seq > self.next_seq:
            lost = frame.seq - self.next_seq
            reason = f"{lost} frames lost in transit (seq {self.next_seq} to {frame.seq - 1})"
            log.warning("task %s: %s", self.task_id, reason)
            self.put(StreamStatus(frame.stream_id, "dropped", reason))
        self.next_seq = frame.seq + 1
        self.put(frame)
        self.frame_arrived.set()

    def on_ctrl(self, message: Mapping[str, Any]) -> None:
        """A control message: status and error items go on the sink; "end" finishes."""
        kind = message.get("kind")
        stream_id = str(message.get("stream_id", self.stream_id))
        if kind == "status":
            status, reason = str(message.get("status", "")), str(message.get("reason", ""))
            item = StreamStatus(stream_id, status, reason, status_data(message.get("data")))
            seq = message.get("seq")
            waiting = isinstance(seq, int) and not isinstance(seq, bool) and seq > self.next_seq
            if waiting and isinstance(seq, int) and len(self.held) < INBOX_FRAMES:
                # Frames before it are still on their way (another topic): wait for them.
                self.held.append((seq, item))
            else:
                self.put(item)
        elif kind == "error":
            code, reason = str(message.get("code", "internal")), str(message.get("reason", ""))
            self.put(StreamError(stream_id, code, reason))
        elif kind == "end" and self.finishing is None:
            frames = message.get("frames")
            total = frames if isinstance(frames, int) else self.next_seq
            self.finishing = asyncio.get_running_loop().create_task(self._finish(total))

    def _release_held(self, seq: int) -> None:
        """Put the status items that belong before frame ``seq``."""
        while self.held and self.held[0][0] <= seq:
            self.put(self.held.popleft()[1])

    async def _finish(self, total: int) -> None:
        # Data and control travel on two topics: let late frames land before the end.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(END_GRACE_S):
                while self.next_seq < total:
                    self.frame_arrived.clear()
                    await self.frame_arrived.wait()
        if self.next_seq < total:
            lost = total - self.next_seq
            reason = f"{lost} frames lost in transit (seq {self.next_seq} to {total - 1})"
            self.put(StreamStatus(self.stream_id, "dropped", reason))
        self.end()

    def end(self, error: StreamError | None = None) -> None:
        """Put the last items (an optional error, then END_OF_STREAM) and let go."""
        if self.agent_lost is not None:
            self.agent_lost.cancel()
        if self.closing:
            return
        self._release_held(1 << 62)
        if error is not None:
            self.put(error)
        self.put(END_OF_STREAM)
        self.closing = True
        self.on_end(self)

    def put(self, item: Any) -> None:
        """Queue an item for the sink (the oldest frame gives way past INBOX_FRAMES)."""
        if self.closing:
            return
        self.inbox.send(item)

    async def _deliver(self) -> None:
        reported = 0  # inbox drops already told to the consumer
        while True:
            item = await self.inbox.receive()
            if (newly := self.inbox.dropped - reported) > 0:
                # The consumer is not keeping up: one status says how much was dropped
                # since it last took an item.
                reported += newly
                reason = f"{newly} samples dropped (consumer too slow)"
                log.warning("task %s: %s", self.task_id, reason)
                await self._to_sink(StreamStatus(self.stream_id, "dropped", reason))
            await self._to_sink(item)
            if item is END_OF_STREAM:
                self.ended.set()
                return

    async def _to_sink(self, item: Any) -> None:
        # An unbounded sink still holds at most INBOX_FRAMES items; past that they wait
        # in the inbox, where the oldest frames give way.
        await put_when_room(self.sink, item, INBOX_FRAMES)
