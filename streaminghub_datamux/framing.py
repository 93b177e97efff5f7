"""Framing: the limits of a frame, and the cutting of samples into frames.

A frame is flushed when it holds ``max_samples`` samples or when its oldest sample is
``max_latency_ms`` old, whichever comes first. Presets cover the usual trade-offs.

Two policies apply these limits, because "old" means two different things:

- :class:`Framer`, for live chunks: age is arrival time (a frame leaves when its oldest
  sample has waited ``max_latency_ms`` of wall time); it holds a bounded backlog and
  drops the oldest chunks when the consumer stalls.
- :class:`FrameCutter` (with :func:`frame_bounds`), for recorded blocks: age is known in
  advance from the timestamps (a frame spans at most ``max_latency_ms`` of recording
  time) and nothing is dropped; replay paces the frames itself.

Both keep the start of an unfinished frame in :class:`Pieces`, which joins it once.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InvalidRequest

__all__ = [
    "MIN_SOURCE_PERIOD_S",
    "PRESETS",
    "WAKE_JITTER_S",
    "Chunk",
    "FrameCutter",
    "Framer",
    "Framing",
    "Pieces",
    "frame_bounds",
]

#: Timestamps (one per sample) and values (one row per sample).
Chunk = tuple[np.ndarray, np.ndarray]

# No live source delivers more often than this: below it, wake-ups cost more than they
# save (epoll rounds timeouts up to 1 ms anyway).
MIN_SOURCE_PERIOD_S = 0.001
# How late a live source's wake may come on a loaded box (the loop's timers: p99 0.2-0.4
# ms here, docs/performance.md): the margin by which a frame leaves before the next chunk.
WAKE_JITTER_S = 0.001


@dataclass(frozen=True)
class Framing:
    """How many samples, and how much waiting, a frame may hold."""

    max_samples: int = 1024
    max_latency_ms: float = 50.0

    def __post_init__(self) -> None:
        samples, latency = self.max_samples, self.max_latency_ms
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise InvalidRequest(f"max_samples must be an integer >= 1, not {samples!r}")
        if (
            isinstance(latency, bool)
            or not isinstance(latency, int | float)
            or not math.isfinite(latency)
            or latency <= 0
        ):
            raise InvalidRequest(f"max_latency_ms must be a finite number > 0, not {latency!r}")

    @property
    def max_latency_s(self) -> float:
        """``max_latency_ms`` in seconds."""
        return self.max_latency_ms / 1000.0

    def source_period_s(self, longest_s: float) -> float:
        """How often a live source hands chunks to the loop under this framing.

        Half the latency budget, so a sample's wait for its chunk leaves the other half
        for the frame; at most ``longest_s`` (the source's own period, what it uses with
        a loose budget) and at least :data:`MIN_SOURCE_PERIOD_S`. Every live driver
        (simulator, LSL, serial) paces its deliveries with this.
        """
        return max(min(longest_s, self.max_latency_s / 2), MIN_SOURCE_PERIOD_S)

    @classmethod
    def coerce(cls, value: Framing | str | dict[str, Any] | None) -> Framing:
        """Accept a Framing, a preset name or a dict of fields (from config or a request)."""
        if value is None:
            return PRESETS["balanced"]
        if isinstance(value, Framing):
            return value
        if isinstance(value, str):
            if value not in PRESETS:
                raise InvalidRequest(
                    f"unknown framing preset {value!r}; use one of {sorted(PRESETS)}"
                )
            return PRESETS[value]
        if isinstance(value, dict):
            unknown = set(value) - {"max_samples", "max_latency_ms", "preset"}
            if unknown:
                raise InvalidRequest(f"unknown framing keys {sorted(unknown)}")
            base = cls.coerce(value.get("preset"))
            return cls(
                max_samples=value.get("max_samples", base.max_samples),
                max_latency_ms=value.get("max_latency_ms", base.max_latency_ms),
            )
        raise InvalidRequest(f"framing must be a preset name or a dict, not {type(value).__name__}")


PRESETS: dict[str, Framing] = {
    # Interactive feedback, BCI loops: a frame every few milliseconds. 2 ms, not 5: a
    # sample also waits for its source's next chunk and for the loop's timer (epoll
    # rounds up to 1 ms), so 5 ms of framing gave a p99 of 8-9 ms end to end (issue #12;
    # docs/performance.md). The simulator then delivers every 1 ms.
    "low-latency": Framing(max_samples=256, max_latency_ms=2.0),
    # Dashboards and online analytics.
    "balanced": Framing(max_samples=1024, max_latency_ms=50.0),
    # Recording and bulk transfer: few, large frames.
    "throughput": Framing(max_samples=16384, max_latency_ms=500.0),
}


class Pieces:
    """Samples held in the pieces they came in, joined only when they leave as a frame.

    Pieces go in as they are (views, no copy). Taking a frame copies only when it spans
    several pieces, with one ``np.concatenate`` per array; a frame of one piece leaves
    as that piece. Empty pieces are never held, so they never cause a copy.
    """

    __slots__ = ("_pieces", "samples")

    def __init__(self) -> None:
        self._pieces: deque[Chunk] = deque()
        self.samples = 0  # samples held, over all pieces

    def __len__(self) -> int:
        return self.samples

    @property
    def pieces(self) -> int:
        """How many pieces the samples are held in."""
        return len(self._pieces)

    def first_timestamp(self) -> Any:
        """The timestamp of the oldest held sample (something must be held)."""
        return self._pieces[0][0][0]

    def add(self, timestamps: np.ndarray, values: np.ndarray) -> None:
        """Hold one more piece, after the others."""
        if len(timestamps):
            self._pieces.append((timestamps, values))
            self.samples += len(timestamps)

    def drop_first(self) -> int:
        """Drop the oldest piece; returns how many samples it held."""
        timestamps, _ = self._pieces.popleft()
        self.samples -= len(timestamps)
        return len(timestamps)

    def take(self, limit: int | None = None) -> Chunk:
        """The oldest ``limit`` samples (all by default) as one chunk; something must be held.

        A piece that straddles the limit is split: its rest stays, as a view.
        """
        pieces = self._pieces
        if limit is None or limit >= self.samples:
            if len(pieces) == 1:
                self.samples = 0
                return pieces.pop()
            limit = self.samples
        ts_parts, value_parts, taken = [], [], 0
        while taken < limit:
            timestamps, values = pieces.popleft()
            room = limit - taken
            if len(timestamps) > room:
                pieces.appendleft((timestamps[room:], values[room:]))
                timestamps, values = timestamps[:room], values[:room]
            ts_parts.append(timestamps)
            value_parts.append(values)
            taken += len(timestamps)
        self.samples -= taken
        if len(ts_parts) == 1:
            return ts_parts[0], value_parts[0]
        return np.concatenate(ts_parts), np.concatenate(value_parts)


class Framer:
    """Groups live chunks into frames of <= ``max_samples``, flushed at ``max_latency``.

    Holds at most ``capacity`` samples; past that the oldest chunks are dropped and
    counted in :attr:`dropped`, so a stalled consumer never stalls the device.

    ``early`` (seconds, at most half the latency budget): a frame whose deadline comes
    within ``early`` of now counts as ready. The task passes its source's period, so a
    frame that would fall due before the next chunk leaves with this one, at a wake the
    source causes anyway, instead of at a timer wake of its own. The next chunk may
    come late by the loop's jitter, so a deadline up to :data:`WAKE_JITTER_S` (at most
    half a period) beyond it counts too: when the budget is a whole number of periods
    (low-latency: 2 ms, chunks every 1 ms) the deadline falls on the next chunk, and
    without the margin the jitter of two wakes decided whether the frame left now or
    one period past its budget (2.6-2.8 chunks per frame instead of 2; issue #12).
    """

    def __init__(self, framing: Framing, capacity: int, early: float = 0.0) -> None:
        self.framing = framing
        self.capacity = capacity
        self.early = min(max(early, 0.0), framing.max_latency_s / 2)
        self._lead = self.early + min(self.early / 2, WAKE_JITTER_S)
        self.dropped = 0
        self._held = Pieces()
        self._oldest_birth: float | None = None  # when the oldest held sample was taken

    def __len__(self) -> int:
        return len(self._held)

    def push(self, timestamps: np.ndarray, values: np.ndarray, now: float) -> None:
        """Hold a chunk that arrived at ``now``, dropping the oldest chunks past capacity."""
        if len(timestamps) == 0:
            return
        # A chunk's first sample was taken before the chunk arrived by its time span.
        span = float(timestamps[-1] - timestamps[0]) if timestamps.dtype.kind == "f" else 0.0
        birth = now - min(max(span, 0.0), self.framing.max_latency_s)
        was_empty = self._oldest_birth is None
        if was_empty:
            self._oldest_birth = birth
        held = self._held
        held.add(timestamps, values)
        while held.samples > self.capacity and held.pieces > 1:
            self.dropped += held.drop_first()

    def deadline(self) -> float | None:
        """When the oldest held sample reaches max latency (None when empty)."""
        if self._oldest_birth is None:
            return None
        return self._oldest_birth + self.framing.max_latency_s

    def ready(self, now: float) -> bool:
        """Whether a frame should leave now: full, or its deadline is (nearly) reached."""
        deadline = self.deadline()
        return self._held.samples >= self.framing.max_samples or (
            deadline is not None and now + self._lead >= deadline
        )

    def pop(self, now: float) -> Chunk:
        """Take up to ``max_samples`` samples from the front, as one frame."""
        frame = self._held.take(self.framing.max_samples)
        # What stays behind arrived after what left: it is at most as old as now.
        self._oldest_birth = now if self._held.samples else None
        return frame


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
        self._held = Pieces()  # the unfinished frame

    def feed(self, timestamps: np.ndarray, values: np.ndarray) -> list[Chunk]:
        """The frames completed by one more block."""
        frames: list[Chunk] = []
        held = self._held
        if len(held):
            take = self.max_samples - len(held)
            if self.max_span > 0:
                end = held.first_timestamp() + self.max_span - self.tolerance
                take = min(take, int(np.searchsorted(timestamps, end, side="right")))
            held.add(timestamps[:take], values[:take])
            timestamps, values = timestamps[take:], values[take:]
            if len(timestamps) == 0 and len(held) < self.max_samples:
                return frames  # the whole block fit: the frame may still go on
            frames.append(held.take())
        if len(timestamps) == 0:
            return frames
        bounds = list(frame_bounds(timestamps, self.max_samples, self.max_span, self.tolerance))
        start, stop = bounds[-1]
        if stop - start < self.max_samples:
            held.add(timestamps[start:], values[start:])
            bounds.pop()
        frames.extend((timestamps[a:b], values[a:b]) for a, b in bounds)
        return frames

    def flush(self) -> Chunk | None:
        """The held frame, at the end of the data."""
        return self._held.take() if len(self._held) else None
