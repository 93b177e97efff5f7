"""Publishing one task: its frames on the data topic; status, errors and end on ctrl.

Frames are sized to fit one MQTT message (:meth:`TaskPublisher.fit_framing`): a broker
drops a client that publishes a packet over its limit, and QoS 1 would resend it after
every reconnect. A frame that still does not fit (strings vary in size) is dropped with
a status message saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..codec import encode, encode_frame
from ..framing import Framing
from ..model import Frame, Stream, StreamError, StreamStatus
from ..mqttio import MqttLink
from ..protocol import Topics, ctrl_end, ctrl_error, ctrl_status
from ..util import END_OF_STREAM, describe_error
from .counters import Counters
from .outbox import Outbox

if TYPE_CHECKING:
    from .remotetasks import RemoteTask

__all__ = ["FRAME_HEADER_BYTES", "TaskPublisher"]

log = logging.getLogger(__name__)

# Room for a frame's fields other than its arrays (task id, seq, dtype, tags, lengths).
FRAME_HEADER_BYTES = 512


@dataclass(eq=False, kw_only=True)
class TaskPublisher:
    """Turns what a task puts on its sink into messages on the task's topics.

    Args:
        agent_id: this agent, in the topics.
        topics: builds the topics.
        link: the broker connection (its maximum packet size).
        outbox: sends (and spools) the messages.
        counters: counts frames and samples.
        stop_task: stops a task whose publishing failed.
        max_frame_bytes: ``agent.max_frame_bytes``.
        clock_shift: the test hook DATAMUX_TEST_CLOCK_OFFSET, added to live timestamps.
    """

    agent_id: str
    topics: Topics
    link: MqttLink
    outbox: Outbox
    counters: Counters
    stop_task: Callable[[str], Awaitable[Any]]
    max_frame_bytes: int
    clock_shift: float = 0.0

    def fit_framing(self, stream: Stream, framing: Framing, attrs: Mapping[str, Any]) -> Framing:
        """``framing``, with frames capped to what one MQTT message may carry."""
        limit = self.max_frame_bytes
        if self.link.max_packet_size:
            limit = min(limit, self.link.max_packet_size)
        dtype = stream.dtype
        if dtype.kind == "U":
            return framing  # strings vary in size; checked when published
        header = FRAME_HEADER_BYTES + len(encode({"c": stream.channels, "a": dict(attrs)}, "cbor"))
        per_sample = 8 + len(stream.channels) * dtype.itemsize
        fitting = max(1, (limit - header) // per_sample)
        if framing.max_samples <= fitting:
            return framing
        return Framing(max_samples=fitting, max_latency_ms=framing.max_latency_ms)

    async def publish(self, remote: RemoteTask, sink: asyncio.Queue[Any]) -> None:
        """Publish what the task puts on ``sink`` until its END_OF_STREAM."""
        send = self.outbox.send
        # The owner is in the topic: the broker can let only that client read it.
        data = self.topics.task_data(self.agent_id, remote.owner, remote.id)
        ctrl = self.topics.task_ctrl(self.agent_id, remote.owner, remote.id)
        try:
            while True:
                item = await sink.get()
                if isinstance(item, Frame):
                    remote.next_seq = item.seq + 1
                    if self.clock_shift and remote.live:
                        item.timestamps = item.timestamps + self.clock_shift  # test hook
                    payload = encode_frame(item, remote.id, remote.codec)
                    if self._too_big(payload):
                        await send(
                            ctrl, encode(self._oversize(remote, item, payload), remote.codec)
                        )
                        continue
                    await send(data, payload, remote.qos)
                    remote.frames += 1
                    remote.samples += len(item)
                    self.counters.frames += 1
                    self.counters.samples += len(item)
                elif isinstance(item, StreamStatus):
                    status = ctrl_status(remote.id, item, remote.next_seq)
                    await send(ctrl, encode(status, remote.codec))
                elif isinstance(item, StreamError):
                    await send(ctrl, encode(ctrl_error(remote.id, item), remote.codec))
                elif item is END_OF_STREAM:
                    if remote.ended_by:
                        why = StreamError(remote.stream_id, "unavailable", remote.ended_by)
                        await send(ctrl, encode(ctrl_error(remote.id, why), remote.codec))
                    end = ctrl_end(remote.id, remote.frames, remote.samples)
                    await send(ctrl, encode(end, remote.codec))
                    return
        except Exception as exc:
            log.exception("publisher of task %s failed", remote.id)
            await self.stop_task(remote.id)
            # The consumer must still hear the end of its task.
            failure = StreamError(remote.stream_id, *describe_error(exc))
            with contextlib.suppress(Exception):
                await send(ctrl, encode(ctrl_error(remote.id, failure), "cbor"))
                end = ctrl_end(remote.id, remote.frames, remote.samples)
                await send(ctrl, encode(end, "cbor"))

    def _too_big(self, payload: bytes) -> bool:
        limit = self.link.max_packet_size
        return limit is not None and len(payload) > limit - FRAME_HEADER_BYTES

    def _oversize(self, remote: RemoteTask, frame: Frame, payload: bytes) -> dict[str, Any]:
        reason = (
            f"{len(frame)} samples dropped: a frame of {len(payload)} bytes exceeds the "
            f"broker's maximum packet size ({self.link.max_packet_size})"
        )
        log.warning("task %s: %s", remote.id, reason)
        return ctrl_status(remote.id, StreamStatus(frame.stream_id, "dropped", reason))
