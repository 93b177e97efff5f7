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
from collections.abc import AsyncIterator, Callable, Iterator

import numpy as np

from ..errors import DatamuxError, InvalidRequest, NotFound
from ..framing import Framing
from ..model import Stream
from .base import Chunk, Source
from .formats import format_for_path
from .recordings import SELF_DESCRIBING_EXTENSIONS, Recording, select_recording

__all__ = [
    "SELF_DESCRIBING_EXTENSIONS",
    "Recording",
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
    return batch


async def _blocks_in_thread(make_blocks: Callable[[], Iterator[Chunk]]) -> AsyncIterator[Chunk]:
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
            blocks.close()
        else:
            pending.add_done_callback(lambda _: blocks.close())


def frame_bounds(
    timestamps: np.ndarray, max_samples: int, max_span: float, tolerance: float = 0.0
) -> Iterator[tuple[int, int]]:
    """Cut a block into frames of at most ``max_samples`` samples spanning < ``max_span``.

    ``tolerance`` (half a sample period for regular streams) keeps float rounding of the
    timestamps from deciding whether a sample exactly ``max_span`` later joins the frame:
    at 100 Hz and 50 ms, every frame holds 5 samples. One search per frame, never per
    sample. ``max_span`` <= 0 cuts by count only.
    """
    n = len(timestamps)
    start = 0
    while start < n:
        stop = min(start + max_samples, n)
        if max_span > 0:
            end = timestamps[start] + max_span - tolerance
            limit = int(np.searchsorted(timestamps, end, side="right"))
            stop = max(start + 1, min(stop, limit))
        yield start, stop
        start = stop


class FrameCutter:
    """Cuts consecutive blocks into frames (see :func:`frame_bounds`).

    A block's last frame may go on in the next blocks, so its pieces are held back until
    a later block completes it or :meth:`flush`; they are joined once, so only the frame
    that straddles blocks is copied, and only once.
    """

    def __init__(self, max_samples: int, max_span: float, tolerance: float) -> None:
        self.max_samples, self.max_span, self.tolerance = max_samples, max_span, tolerance
        self._pieces: list[Chunk] = []  # the unfinished frame, in pieces
        self._held = 0  # samples in those pieces

    def _take_held(self) -> Chunk:
        pieces, self._pieces, self._held = self._pieces, [], 0
        if len(pieces) == 1:
            return pieces[0]
        return np.concatenate([p[0] for p in pieces]), np.concatenate([p[1] for p in pieces])

    def feed(self, timestamps: np.ndarray, values: np.ndarray) -> list[Chunk]:
        """The frames completed by one more block."""
        frames: list[Chunk] = []
        if self._pieces:
            take = self.max_samples - self._held
            if self.max_span > 0:
                end = self._pieces[0][0][0] + self.max_span - self.tolerance
                take = min(take, int(np.searchsorted(timestamps, end, side="right")))
            self._pieces.append((timestamps[:take], values[:take]))
            self._held += len(timestamps[:take])
            timestamps, values = timestamps[take:], values[take:]
            if len(timestamps) == 0 and self._held < self.max_samples:
                return frames  # the whole block fit: the frame may still go on
            frames.append(self._take_held())
        if len(timestamps) == 0:
            return frames
        bounds = list(frame_bounds(timestamps, self.max_samples, self.max_span, self.tolerance))
        start, stop = bounds[-1]
        if stop - start < self.max_samples:
            self._pieces, self._held = [(timestamps[start:], values[start:])], stop - start
            bounds.pop()
        frames.extend((timestamps[a:b], values[a:b]) for a, b in bounds)
        return frames

    def flush(self) -> Chunk | None:
        """The held frame, at the end of the data."""
        return self._take_held() if self._pieces else None


class ReplaySource(Source):
    """Frames of a recording, released on an absolute schedule.

    Args:
        stream: the stream's metadata.
        make_blocks: returns a fresh iterator of blocks (called once per pass).
        speed: 1.0 is real time, 2.0 twice as fast, 0 as fast as possible.
        framing: frame size and latency limits.
        loop: start again at the end (guided simulation); timestamps then move on
            by the length of the recording each pass.
        relative_ts: shift timestamps so that the first sample is at 0 (upstream's
            ``use_relative_ts``); otherwise they are the recording's own.
        strict_time: release each frame when its timestamp is due (an absolute
            schedule); ``False`` paces by sample count at the nominal ``frequency``
            instead, ignoring gaps in the timestamps (upstream's ``strict_time``;
            irregular streams have no nominal rate and keep the timestamp schedule).
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
    ) -> None:
        super().__init__(stream)
        if not isinstance(speed, int | float) or isinstance(speed, bool) or speed < 0:
            raise InvalidRequest(f"speed must be a number >= 0, not {speed!r}")
        self.make_blocks = make_blocks
        self.speed = float(speed)
        self.framing = framing
        self.loop = loop
        self.relative_ts = relative_ts
        self.strict_time = strict_time
        self._released = 0  # samples released so far (pacing by count)
        #: The loop time at which the first sample was due (set on the first frame).
        self.started_at: float | None = None

    async def _sleep_until(self, due: float) -> None:
        """Sleep until loop time ``due``, on time.

        asyncio wakes up to 1 ms late (epoll rounds timeouts up to whole milliseconds),
        so sleep until just before ``due``, then yield to the loop until it is reached:
        other tasks keep running, at the cost of up to ``margin`` of busy time per frame.
        """
        clock = asyncio.get_running_loop().time
        margin = min(PACING_MARGIN_S, 0.1 * self.framing.max_latency_s)
        delay = due - clock() - margin
        if delay > 0:
            await asyncio.sleep(delay)
        while clock() < due:
            await asyncio.sleep(0)

    async def chunks(self) -> AsyncIterator[Chunk]:
        clock = asyncio.get_running_loop().time
        span = self.framing.max_latency_s * self.speed
        tolerance = 0.5 / self.stream.frequency if self.stream.frequency > 0 else 0.0
        first_ts: float | None = None
        origin = 0.0  # subtracted from every timestamp (relative_ts)
        offset = 0.0  # added to timestamps on each loop pass
        while True:
            cutter = FrameCutter(self.framing.max_samples, span, tolerance)
            pass_first: float | None = None
            last_ts: float | None = None
            pass_samples = 0
            blocks = _blocks_in_thread(self.make_blocks)
            async with contextlib.aclosing(blocks):
                while True:
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
                    if offset:
                        timestamps = timestamps + offset
                    if first_ts is None:
                        first_ts = float(timestamps[0])
                        self.started_at = clock()
                        if self.relative_ts:
                            origin, first_ts = first_ts, 0.0
                    if origin:
                        timestamps = timestamps - origin
                    if pass_first is None:
                        pass_first = float(timestamps[0])
                    last_ts = float(timestamps[-1])
                    pass_samples += len(timestamps)
                    for frame in cutter.feed(timestamps, values):
                        await self._release(frame, first_ts)
                        yield frame
            if (tail := cutter.flush()) is not None and first_ts is not None:
                await self._release(tail, first_ts)
                yield tail
            if not self.loop or last_ts is None or pass_first is None:
                return
            # The next pass continues the timeline one sample period after this one. An
            # irregular stream has no period: use its mean spacing, and never less than
            # _MIN_LOOP_GAP_S, so timestamps never repeat and a one-sample file cannot spin.
            length = last_ts - pass_first
            if self.stream.frequency > 0:
                period = 1.0 / self.stream.frequency
            else:
                period = length / max(pass_samples - 1, 1) if pass_samples > 1 else 1.0
            offset += length + max(period, _MIN_LOOP_GAP_S)

    async def _release(self, frame: Chunk, first_ts: float) -> None:
        """Wait until the frame's last sample is due; at speed 0, just let others run.

        At speed 0 nothing else would suspend between frames of a batch of blocks (an
        unbounded sink never blocks), so one full-speed replay could hold the loop for
        a whole batch and make paced tasks late.
        """
        if not self.strict_time and self.stream.frequency > 0:
            position = (self._released + len(frame[0]) - 1) / self.stream.frequency
        else:
            position = float(frame[0][-1]) - first_ts
        self._released += len(frame[0])
        if self.speed > 0 and self.started_at is not None:
            await self._sleep_until(self.started_at + position / self.speed)
        else:
            await asyncio.sleep(0)
