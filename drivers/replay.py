"""Replay recorded DFDS collections: read recordings and release their frames on time.

Recordings are found by :mod:`.recordings` (from the collection's ``pattern``).

Replay knows the future, so it cuts frames itself (``paced`` source): each frame holds at
most ``max_samples`` samples spanning at most ``max_latency_ms`` of (scaled) recording
time, and is released when its last sample is due on an absolute schedule,
``start + (t_last - t_first) / speed``, so waiting errors never add up to drift.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DatamuxError, InvalidRequest, NotFound
from ..framing import FrameCutter, Framing
from ..model import Stream, StreamStatus
from .base import Chunk, Source
from .formats import format_for_path
from .recordings import SELF_DESCRIBING_EXTENSIONS, Recording, select_recording
from .replaycontrol import ReplayControl

if TYPE_CHECKING:
    from ..catalog import Catalog

__all__ = [
    "BLOCK_BYTES",
    "SELF_DESCRIBING_EXTENSIONS",
    "Recording",
    "ReplayOpener",
    "ReplaySource",
    "open_reader",
    "select_recording",
]

# Paced replay sleeps until this long before a frame is due, then yields to the event
# loop until it is (see ReplaySource._sleep_until); capped at 10% of max latency.
PACING_MARGIN_S = 0.0012
_MIN_LOOP_GAP_S = 1e-3


def open_reader(
    recording: Recording, stream: Stream, *, block_bytes: int = 4 << 20
) -> Callable[[], Iterator[Chunk]]:
    """A factory of block iterators for one stream of one recording."""
    path = recording.file_for(stream.id)
    if path is None:
        raise NotFound(f"recording {dict(recording.attrs)} has no file for stream {stream.id!r}")
    reader = format_for_path(path)
    block_bytes = max(block_bytes, reader.min_block_bytes)
    if recording.dataset is not None:
        dataset = recording.dataset
        return lambda: reader.dataset_blocks(path, dataset, stream, block_bytes)
    return lambda: reader.blocks(path, stream, block_bytes)


# Blocks fetched per hop to the worker thread: a hop costs about as much as framing a
# block, so in-memory and fast readers move several blocks per hop, up to this much data.
_BATCH_BYTES = 1 << 20
_BATCH_BLOCKS = 16


def _fill_batch(blocks: Iterator[Chunk], batch: list[Chunk]) -> None:
    """Append the next blocks to ``batch``, up to _BATCH_BYTES of them (none at the end)."""
    size = 0
    for block in blocks:
        batch.append(block)
        size += block[0].nbytes + block[1].nbytes
        if size >= _BATCH_BYTES or len(batch) >= _BATCH_BLOCKS:
            break


def _close(blocks: Iterator[Chunk]) -> None:
    """Close a generator reader (and its file) now; other iterators hold nothing to close."""
    close = getattr(blocks, "close", None)
    if close is not None:
        close()


async def _blocks_in_thread(
    make_blocks: Callable[[], Iterator[Chunk]],
) -> AsyncGenerator[Chunk, None]:
    """Read blocks in a worker thread, one batch of blocks ahead of the consumer.

    A reader error ends the batch it happens in: the blocks read before it are yielded
    first, then the error is raised.
    """
    blocks = make_blocks()
    failure: list[BaseException] = []

    def fetch() -> list[Chunk]:
        batch: list[Chunk] = []
        try:
            _fill_batch(blocks, batch)
        except Exception as exc:  # raised on the loop, after the blocks before it
            failure.append(exc)
        return batch

    pending = asyncio.ensure_future(asyncio.to_thread(fetch))
    try:
        while True:
            batch = await pending
            if not batch and not failure:
                return
            if batch and not failure:
                pending = asyncio.ensure_future(asyncio.to_thread(fetch))
            for block in batch:
                yield block
            if failure:
                raise failure[0]
    finally:
        # The read in flight cannot be interrupted; close the reader (its file) as soon
        # as that read is over, instead of whenever the garbage collector gets to it.
        if pending.done():
            _close(blocks)
        else:
            pending.add_done_callback(lambda _: _close(blocks))


class ReplaySource(Source):
    """Frames of a recording, released on an absolute schedule, steerable.

    Args:
        stream: the stream's metadata.
        make_blocks: returns a fresh iterator of blocks (called once per pass).
        speed: 1.0 is real time, 2.0 twice as fast, 0 as fast as possible.
        framing: frame size and latency limits.
        loop: start again at the end, forever (guided simulation); timestamps then move
            on by the length of the recording each pass, so the timeline never jumps.
        relative_ts: shift timestamps so that the first sample is at 0 (upstream's
            ``use_relative_ts``); otherwise they are the recording's own.
        strict_time: release each frame when its timestamp is due (an absolute
            schedule); ``False`` paces by sample count at the nominal ``frequency``
            instead, ignoring gaps in the timestamps (upstream's ``strict_time``;
            irregular streams have no nominal rate and keep the timestamp schedule).
        control: pause, seek, speed, loop and window of a replay task
            (drivers/replaycontrol.py); its loops replay the recorded timestamps and
            mark each jump with a status item.

    Besides frames, :meth:`chunks` yields the control's :class:`StreamStatus` items, in
    order with the frames.
    """

    paced = True

    def __init__(
        self,
        stream: Stream,
        make_blocks: Callable[[], Iterator[Chunk]],
        *,
        speed: float = 1.0,
        framing: Framing,
        loop: bool = False,
        relative_ts: bool = False,
        strict_time: bool = True,
        control: ReplayControl | None = None,
    ) -> None:
        super().__init__(stream)
        if control is None:
            control = ReplayControl(speed)
        self.control = control
        self.make_blocks = make_blocks
        self.framing = framing
        self.loop = loop
        self.relative_ts = relative_ts
        self.strict_time = strict_time
        #: The loop time at which the first sample was due (set on the first frame).
        self.started_at: float | None = None
        self._anchor: tuple[float, float] | None = None  # (loop time, position) pacing
        self._released: float | None = None  # the pacing position of the last release
        self._count = 0  # samples released so far (pacing by count)
        self._first_ts: float | None = None  # the recording's first timestamp
        self._origin = 0.0  # subtracted from every timestamp (relative_ts)
        self._last_raw: float | None = None  # the last timestamp read, as recorded
        self._offset = 0.0  # added to timestamps on each guided loop pass

    @property
    def speed(self) -> float:
        return self.control.speed

    def _span(self) -> float:
        """A frame's span in recording time: max latency of wall time at this speed."""
        return self.framing.max_latency_s * self.control.speed

    async def _sleep_until(self, due: float, version: int) -> bool:
        """Sleep until loop time ``due``, on time; False if the control changed first.

        asyncio wakes up to 1 ms late (epoll rounds timeouts up to whole milliseconds),
        so sleep until just before ``due``, then yield to the loop until it is reached:
        other tasks keep running, at the cost of up to ``margin`` of busy time per frame.
        """
        control = self.control
        clock = asyncio.get_running_loop().time
        margin = min(PACING_MARGIN_S, 0.1 * self.framing.max_latency_s)
        delay = due - clock() - margin
        if delay > 0:
            control.changed.clear()
            if control.version != version:
                return False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await control.changed.wait()
                    return False
        while clock() < due:
            if control.version != version:
                return False
            await asyncio.sleep(0)
        return control.version == version

    async def chunks(self) -> AsyncGenerator[Any, None]:
        control = self.control
        tolerance = 0.5 / self.stream.frequency if self.stream.frequency > 0 else 0.0
        target = control.start  # where this pass starts, seconds into the recording
        while True:
            cutter = FrameCutter(self.framing.max_samples, self._span(), tolerance)
            pass_first: float | None = None
            last_ts: float | None = None
            pass_samples = 0
            at_end = False
            blocks = _blocks_in_thread(self.make_blocks)
            async with contextlib.aclosing(blocks):
                while not at_end and control.seek_to is None:
                    try:
                        timestamps, values = await anext(blocks)
                    except StopAsyncIteration:
                        break
                    except DatamuxError:
                        if (tail := cutter.flush()) is not None:
                            yield tail  # every good sample before the failure
                        raise
                    if len(timestamps) == 0:
                        continue
                    if self._first_ts is None:
                        self._first_ts = float(timestamps[0])
                        self._origin = self._first_ts if self.relative_ts else 0.0
                    self._last_raw = float(timestamps[-1])
                    timestamps, values, at_end = self._window(timestamps, values, target)
                    if len(timestamps) == 0:
                        continue
                    if self._offset or self._origin:
                        timestamps = timestamps + (self._offset - self._origin)
                    if pass_first is None:
                        pass_first = float(timestamps[0])
                    last_ts = float(timestamps[-1])
                    pass_samples += len(timestamps)
                    cutter.max_span = self._span()
                    for frame in cutter.feed(timestamps, values):
                        async for item in self._paced(frame):
                            yield item
                        if control.seek_to is not None:
                            break
                if control.seek_to is None and (tail := cutter.flush()) is not None:
                    async for item in self._paced(tail):
                        yield item
            if control.seek_to is not None:
                target, control.seek_to = control.seek_to, None
                yield self._jump("seek", f"to {target:.3f} s", {"position": target})
                continue
            if self.loop and last_ts is not None and pass_first is not None:
                self._offset += _pass_length(self.stream, pass_first, last_ts, pass_samples)
                continue
            if last_ts is None and self._first_ts is not None and self._last_raw is not None:
                length = self._last_raw - self._first_ts
                raise InvalidRequest(
                    f"nothing to replay: the window starts {target:g} s into the recording, "
                    f"which is {length:.3f} s long; choose start (or seek) below that"
                )
            if last_ts is None or not control.another_pass():
                return
            target = control.start
            data = {"pass": control.pass_number, "position": target}
            yield self._jump("loop", f"pass {control.pass_number} from {target:.3f} s", data)

    def _window(
        self, timestamps: np.ndarray, values: np.ndarray, target: float
    ) -> tuple[np.ndarray, np.ndarray, bool]:
        """The part of a block inside [target, end); True once the end is reached."""
        assert self._first_ts is not None
        if target > 0:
            cut = int(np.searchsorted(timestamps, self._first_ts + target, side="left"))
            timestamps, values = timestamps[cut:], values[cut:]
        end = self.control.end
        if end is None:
            return timestamps, values, False
        cut = int(np.searchsorted(timestamps, self._first_ts + end, side="left"))
        return timestamps[:cut], values[:cut], cut < len(timestamps)

    def _jump(self, status: str, reason: str, data: dict[str, Any]) -> StreamStatus:
        """The status item of a jump; pacing starts afresh at the next frame."""
        self._anchor = None
        self._released = None
        self.control.position = float(data["position"])
        return StreamStatus(self.stream.id, status, reason, data)

    async def _paced(self, frame: Chunk) -> AsyncIterator[Any]:
        """Wait until the frame's last sample is due, then yield it; meanwhile yield the
        control's notices and hold still while paused. Returns without the frame when a
        seek comes first."""
        control = self.control
        clock = asyncio.get_running_loop().time
        first, last = self._positions(frame)
        while True:
            while control.notices:
                status, reason, data = control.notices.pop(0)
                if status in ("resumed", "speed"):
                    self._anchor = None  # pace from here, at the (new) speed
                yield StreamStatus(self.stream.id, status, reason, data)
            if control.seek_to is not None:
                return
            version = control.version
            if control.paused:
                control.changed.clear()
                if control.version == version:
                    await control.changed.wait()
                continue
            if control.speed == 0:
                # Nothing else suspends between the frames of a batch of blocks (an
                # unbounded sink never blocks): let paced tasks run.
                await asyncio.sleep(0)
                break
            if self._anchor is None:
                start = self._released if self._released is not None else first
                self._anchor = (clock(), start)
                if self.started_at is None:
                    self.started_at = self._anchor[0]
            loop_time, stamp = self._anchor
            if await self._sleep_until(loop_time + (last - stamp) / control.speed, version):
                break
        self._released = last
        self._count += len(frame[0])
        if self._first_ts is not None:
            stamp = float(frame[0][-1])
            control.position = stamp - self._offset + self._origin - self._first_ts
        yield frame

    def _positions(self, frame: Chunk) -> tuple[float, float]:
        """Where a frame's first and last samples are on the pacing schedule: their
        timestamps, or with ``strict_time=False`` their sample count at the nominal rate."""
        if not self.strict_time and self.stream.frequency > 0:
            rate = self.stream.frequency
            return self._count / rate, (self._count + len(frame[0]) - 1) / rate
        return float(frame[0][0]), float(frame[0][-1])


def _pass_length(stream: Stream, first: float, last: float, samples: int) -> float:
    """How far a guided loop moves the timeline on: the pass plus one sample period.

    An irregular stream has no period: use its mean spacing, and never less than
    _MIN_LOOP_GAP_S, so timestamps never repeat and a one-sample file cannot spin.
    """
    length = last - first
    if stream.frequency > 0:
        period = 1.0 / stream.frequency
    else:
        period = length / max(samples - 1, 1) if samples > 1 else 1.0
    return length + max(period, _MIN_LOOP_GAP_S)


# Replay parses this much text per block. numpy's parser holds the GIL while it runs,
# so small blocks keep every other task on the loop responsive (about 1 ms per block);
# throughput is the same from 64 KiB to 4 MiB (docs/performance.md).
BLOCK_BYTES = 256 << 10


class ReplayOpener:
    """Opens replays of a catalog's recordings.

    The API's replay tasks and guided simulation (drivers/guided.py) both replay through
    it, so a driver that replays recordings is handed this, never the API.

    Args:
        catalog: the collections and their recordings.
        block_bytes: read this much per block.
    """

    def __init__(self, catalog: Catalog, block_bytes: int = BLOCK_BYTES) -> None:
        self.catalog = catalog
        self.block_bytes = block_bytes

    def get_collection_stream(self, collection_id: str, stream_id: str) -> Stream:
        """One declared stream of a collection, by ids (NotFound names the known ones)."""
        return self.catalog.stream(self.catalog.get(collection_id), stream_id)

    def open_replay(
        self,
        collection_id: str,
        stream_id: str,
        attrs: Mapping[str, Any],
        *,
        speed: float,
        framing: Framing,
        loop: bool = False,
        relative_ts: bool = False,
        strict_time: bool = True,
        control: ReplayControl | None = None,
    ) -> ReplaySource:
        """A replay source for one stream of one recording (not yet opened).

        Raises:
            NotFound: unknown collection, stream, or no matching recording.
            InvalidRequest: attrs that are unknown or match several recordings.
        """
        stream, recording = self.catalog.resolve(collection_id, stream_id, attrs)
        return ReplaySource(
            stream,
            open_reader(recording, stream, block_bytes=self.block_bytes),
            speed=speed,
            framing=framing,
            loop=loop,
            relative_ts=relative_ts,
            strict_time=strict_time,
            control=control,
        )
