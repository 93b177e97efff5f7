"""Replay recorded DFDS collections: find recordings, read them, release frames on time.

Recordings are found from the collection's ``pattern``: ``csv://{subject}/{session}``
matches files ``<data_dir>/<collection id>/<subject>/<session>.csv``, and each
placeholder becomes an attribute of the recording. A ``{stream}`` placeholder puts each
stream in a file of its own; without it, one file holds the columns of all streams.

Replay knows the future, so it cuts frames itself (``paced`` source): each frame holds at
most ``max_samples`` samples spanning at most ``max_latency_ms`` of (scaled) recording
time, and is released when its last sample is due on an absolute schedule,
``start + (t_last - t_first) / speed``, so waiting errors never add up to drift.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..dfds import split_pattern
from ..errors import DatamuxError, InvalidRequest, NotFound
from ..framing import Framing
from ..model import Collection, Stream
from .base import Chunk, Source
from .formats import SELF_DESCRIBING, extensions_of, format_for_path, get_format

__all__ = ["Recording", "ReplaySource", "find_recordings", "open_reader", "select_recording"]

# Paced replay sleeps until this long before a frame is due, then yields to the event
# loop until it is (see ReplaySource._sleep_until); capped at 10% of max latency.
PACING_MARGIN_S = 0.0012
_MIN_LOOP_GAP_S = 1e-3
SELF_DESCRIBING_EXTENSIONS = tuple(ext for name in SELF_DESCRIBING for ext in extensions_of(name))
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class Recording:
    """One recording of a collection: its attributes and the file of each stream."""

    attrs: Mapping[str, str]
    files: Mapping[str, Path]  # stream id -> file; key "*" when one file holds every stream

    def file_for(self, stream_id: str) -> Path | None:
        return self.files.get(stream_id, self.files.get("*"))


def _template_regex(
    template: str, extensions: tuple[str, ...]
) -> tuple[re.Pattern[str], list[str]]:
    parts, names, seen = [], [], set()
    position = 0
    for match in _PLACEHOLDER.finditer(template):
        parts.append(re.escape(template[position : match.start()]))
        name = match[1]
        # A placeholder used twice must match the same text twice.
        parts.append(f"(?P={name})" if name in seen else f"(?P<{name}>[^/]+?)")
        if name not in seen:
            names.append(name)
            seen.add(name)
        position = match.end()
    parts.append(re.escape(template[position:]))
    if not template.lower().endswith(extensions):
        parts.append("(?:" + "|".join(re.escape(ext) for ext in extensions) + ")")
    return re.compile("".join(parts), re.IGNORECASE), names


def _files_under(root: Path, extensions: tuple[str, ...]) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in extensions and p.is_file())


def find_recordings(collection: Collection, data_dir: Path) -> list[Recording]:
    """Every recording of ``collection`` under ``data_dir/<collection id>``, sorted by attrs.

    A collection without a pattern (a folder of XDF/EDF/BDF files) has one recording per
    file, with the attribute ``file``: its path below the folder, without the extension.
    """
    root = data_dir / collection.id
    if not root.is_dir():
        return []
    if not collection.pattern:
        return [
            Recording({"file": path.relative_to(root).with_suffix("").as_posix()}, {"*": path})
            for path in _files_under(root, SELF_DESCRIBING_EXTENSIONS)
        ]
    scheme, template = split_pattern(collection.pattern)
    extensions = extensions_of(scheme)
    if not extensions:
        get_format(scheme)  # raises InvalidRequest naming the supported formats
    regex, names = _template_regex(template, extensions)
    by_attrs: dict[tuple[tuple[str, str], ...], dict[str, Path]] = {}
    for path in _files_under(root, extensions):
        match = regex.fullmatch(path.relative_to(root).as_posix())
        if match is None:
            continue
        groups = match.groupdict()
        stream_id = groups.pop("stream", "*")
        if stream_id != "*" and collection.streams and stream_id not in collection.streams:
            continue
        key = tuple((name, groups[name]) for name in names if name != "stream")
        by_attrs.setdefault(key, {})[stream_id] = path
    return [Recording(dict(key), files) for key, files in sorted(by_attrs.items())]


def select_recording(
    recordings: Sequence[Recording], attrs: Mapping[str, Any], collection_id: str
) -> Recording:
    """The one recording whose attributes match ``attrs``.

    Raises:
        InvalidRequest: an attribute the collection does not have, or attrs that match
            more than one recording.
        NotFound: no recording matches.
    """
    known = {name for r in recordings for name in r.attrs}
    wanted = {str(k): str(v) for k, v in attrs.items()}
    unknown = sorted(set(wanted) - known)
    if unknown and recordings:
        raise InvalidRequest(
            f"collection {collection_id!r} has no attribute {unknown}; "
            f"recordings are selected by {sorted(known)}"
        )
    matches = [r for r in recordings if all(r.attrs.get(k) == v for k, v in wanted.items())]
    if not matches:
        examples = ", ".join(str(dict(r.attrs)) for r in recordings[:5]) or "none"
        raise NotFound(
            f"no recording of {collection_id!r} matches {wanted}; recordings: {examples}"
        )
    if len(matches) > 1:
        examples = ", ".join(str(dict(r.attrs)) for r in matches[:5])
        raise InvalidRequest(
            f"{len(matches)} recordings of {collection_id!r} match {wanted}; "
            f"add attributes to pick one: {examples}"
        )
    return matches[0]


def open_reader(
    recording: Recording, stream: Stream, *, block_bytes: int = 4 << 20
) -> Callable[[], Iterator[Chunk]]:
    """A factory of block iterators for one stream of one recording."""
    path = recording.file_for(stream.id)
    if path is None:
        raise NotFound(f"recording {dict(recording.attrs)} has no file for stream {stream.id!r}")
    reader = format_for_path(path)
    return lambda: reader.blocks(path, stream, block_bytes)


async def _blocks_in_thread(make_blocks: Callable[[], Iterator[Chunk]]) -> AsyncIterator[Chunk]:
    """Read blocks in a worker thread, one block ahead of the consumer."""
    blocks = make_blocks()
    done = object()
    pending = asyncio.ensure_future(asyncio.to_thread(next, blocks, done))
    try:
        while True:
            block = await pending
            if block is done:
                return
            pending = asyncio.ensure_future(asyncio.to_thread(next, blocks, done))
            yield block
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
    ) -> None:
        super().__init__(stream)
        if not isinstance(speed, int | float) or isinstance(speed, bool) or speed < 0:
            raise InvalidRequest(f"speed must be a number >= 0, not {speed!r}")
        self.make_blocks = make_blocks
        self.speed = float(speed)
        self.framing = framing
        self.loop = loop
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
        """Wait until the frame's last sample is due (at once at speed 0)."""
        if self.speed > 0 and self.started_at is not None:
            due = self.started_at + (float(frame[0][-1]) - first_ts) / self.speed
            await self._sleep_until(due)
