"""Signal generators for simulated devices, whole chunks at a time.

Every generator is a pure function of ``(seed, sample index)``: periodic signals are
computed from the index, and random draws come from per-purpose numpy Generators that
are consumed strictly in sample order. Cutting a run into chunks of any size therefore
gives exactly the same samples, which is what makes simulated runs reproducible.

The spec parsing here validates one channel of the ``simulate.nodes`` config and raises
:class:`~streaminghub_datamux.errors.ConfigError` naming the key path and the fix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..checks import check_keys, config_number, config_text
from ..errors import ConfigError

__all__ = [
    "SIGNALS",
    "ChannelGenerator",
    "ChannelSpec",
    "EventClock",
    "StreamSynth",
    "cast_values",
    "parse_channel",
]

#: The signal kinds a channel may declare.
SIGNALS = ("sine", "square", "sawtooth", "noise", "random_walk", "marker")

# Keys each signal accepts besides the common ones; anything else is a typo we report.
_COMMON_KEYS = {"signal", "unit", "name", "description"}
_SIGNAL_KEYS: dict[str, set[str]] = {
    "sine": {"freq_hz", "amplitude", "offset", "phase", "noise"},
    "square": {"freq_hz", "amplitude", "offset", "phase", "duty", "noise"},
    "sawtooth": {"freq_hz", "amplitude", "offset", "phase", "noise"},
    "noise": {"amplitude", "offset"},
    "random_walk": {"step", "offset", "noise"},
    "marker": {"labels", "rate_hz"},
}

# Spawn keys of the SeedSequence tree: one Generator per purpose, so adding noise to a
# channel or drops to a stream never shifts another sequence.
_SIGNAL_DRAWS, _NOISE_DRAWS = 0, 1
# Marker draws are refilled in fixed batches so chunking cannot change their order.
_EVENT_BATCH = 256
# Noise of periodic channels is drawn this many samples ahead (StreamSynth._next_noise).
_NOISE_BATCH = 256


@dataclass(frozen=True)
class ChannelSpec:
    """One simulated channel: which signal, and its parameters (see docs/simulate.md)."""

    signal: str
    freq_hz: float = 1.0
    amplitude: float = 1.0
    offset: float = 0.0
    phase: float = 0.0  # radians
    noise: float = 0.0  # standard deviation of added gaussian noise
    duty: float = 0.5  # fraction of a square period spent high
    step: float = 0.1  # random walk increments are uniform in [-step, step]
    labels: tuple[str, ...] = ("stimulus", "response")
    rate_hz: float = 1.0  # mean marker events per second
    unit: str = ""
    name: str = ""
    description: str = ""

    @property
    def is_marker(self) -> bool:
        return self.signal == "marker"


def parse_channel(data: Any, path: str) -> ChannelSpec:
    """Validate one channel spec (``{"signal": "sine", "freq_hz": 10, ...}``).

    Args:
        data: the channel's JSON object.
        path: its key path, e.g. ``simulate.nodes.lab1.streams.ecg.channels.lead1``.

    Raises:
        ConfigError: naming the offending key path and how to fix it.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"a channel must be a JSON object, got {type(data).__name__}",
            key=path,
            fix='write it as {"signal": "sine", ...}',
        )
    signal = data.get("signal")
    if signal not in SIGNALS:
        raise ConfigError(
            f"unknown or missing signal {signal!r}",
            key=f"{path}.signal",
            fix=f"set it to one of {list(SIGNALS)}",
        )
    check_keys(data, path, _COMMON_KEYS | _SIGNAL_KEYS[signal], f"{signal} channel")
    labels: tuple[str, ...] = ChannelSpec.labels
    if "labels" in data:
        raw = data["labels"]
        if (
            not isinstance(raw, list | tuple)
            or not raw
            or not all(isinstance(x, str) and x for x in raw)
        ):
            raise ConfigError(
                f"expected a non-empty list of non-empty strings, got {raw!r}",
                key=f"{path}.labels",
                fix='write e.g. ["stimulus", "response"]',
            )
        labels = tuple(raw)
    return ChannelSpec(
        signal=signal,
        freq_hz=config_number(data, "freq_hz", path, 1.0, low=0),
        amplitude=config_number(data, "amplitude", path, 1.0, low=0),
        offset=config_number(data, "offset", path, 0.0),
        phase=config_number(data, "phase", path, 0.0),
        noise=config_number(data, "noise", path, 0.0, low=0),
        duty=config_number(data, "duty", path, 0.5, low=0, high=1),
        step=config_number(data, "step", path, 0.1, low=0),
        labels=labels,
        rate_hz=config_number(data, "rate_hz", path, 1.0, positive=True),
        unit=config_text(data, "unit", path),
        name=config_text(data, "name", path),
        description=config_text(data, "description", path),
    )


def _generator(seed: int, *key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))


class ChannelGenerator:
    """Sequential samples of one channel; ``take(n)`` continues where the last call ended.

    Args:
        spec: the channel.
        frequency: the stream's sampling rate in Hz (unused for markers).
        seed: the stream's seed.
        index: the channel's column, so every channel gets its own random sequence.
    """

    def __init__(self, spec: ChannelSpec, frequency: float, seed: int, index: int) -> None:
        self.spec = spec
        self.frequency = frequency
        self.next_index = 0
        self._draws = _generator(seed, 0, index, _SIGNAL_DRAWS)
        self._noise = _generator(seed, 0, index, _NOISE_DRAWS)
        self._walk = spec.offset  # value before the first random-walk step
        self._labels = np.array(spec.labels, dtype=np.str_)
        self._label_buffer = np.empty(0, dtype=np.intp)

    def take(self, n: int) -> np.ndarray:
        """The next ``n`` samples: float64, or str for marker channels."""
        start, self.next_index = self.next_index, self.next_index + n
        spec = self.spec
        if spec.is_marker:
            return self._labels[self._label_indices(n)]
        if spec.signal == "noise":
            return spec.offset + spec.amplitude * self._draws.standard_normal(n)
        if spec.signal == "random_walk":
            steps = self._draws.uniform(-spec.step, spec.step, n)
            # Accumulate from the carried value so the float sums match an unchunked run.
            walk = np.cumsum(np.concatenate(([self._walk], steps)))[1:]
            if n:
                self._walk = float(walk[-1])
            out = walk
        else:
            out = self._periodic(np.arange(start, start + n, dtype=np.float64))
        if spec.noise > 0:
            out = out + spec.noise * self._noise.standard_normal(n)
        return out

    def _periodic(self, k: np.ndarray) -> np.ndarray:
        spec = self.spec
        cycles = spec.freq_hz * (k / self.frequency) + spec.phase / (2 * np.pi)
        if spec.signal == "sine":
            return spec.offset + spec.amplitude * np.sin(2 * np.pi * cycles)
        frac = cycles - np.floor(cycles)
        if spec.signal == "square":
            return spec.offset + spec.amplitude * np.where(frac < spec.duty, 1.0, -1.0)
        return spec.offset + spec.amplitude * (2.0 * frac - 1.0)  # sawtooth: -A..+A ramp

    def _label_indices(self, n: int) -> np.ndarray:
        # Fixed-size refills keep the draw order independent of how events are chunked.
        while len(self._label_buffer) < n:
            batch = self._draws.integers(0, len(self._labels), _EVENT_BATCH)
            self._label_buffer = np.concatenate((self._label_buffer, batch))
        out, self._label_buffer = self._label_buffer[:n], self._label_buffer[n:]
        return out


class EventClock:
    """Poisson event times (seconds since the start) for irregular marker streams.

    Args:
        rate_hz: mean events per second.
        seed: the stream's seed.
    """

    def __init__(self, rate_hz: float, seed: int) -> None:
        self._scale = 1.0 / rate_hz
        self._draws = _generator(seed, 3)
        self._last = 0.0
        self._pending = np.empty(0, dtype=np.float64)

    def until(self, t: float, *, inclusive: bool = True) -> np.ndarray:
        """Pop the event times up to ``t`` (``<= t``, or ``< t`` if not inclusive)."""
        while len(self._pending) == 0 or self._pending[-1] <= t:
            gaps = self._draws.exponential(self._scale, _EVENT_BATCH)
            times = np.cumsum(np.concatenate(([self._last], gaps)))[1:]
            self._last = float(times[-1])
            self._pending = np.concatenate((self._pending, times))
        cut = int(np.searchsorted(self._pending, t, side="right" if inclusive else "left"))
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out


def cast_values(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast float64 samples to ``dtype``; integers (and bool) are rounded and clipped."""
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        low, high = float(info.min), float(info.max)
        if int(high) > info.max:  # 64-bit max rounds up as a float; stay below it
            high = float(np.nextafter(high, 0.0))
        return np.clip(np.rint(values), low, high).astype(dtype)
    if dtype.kind == "b":
        return np.clip(np.rint(values), 0.0, 1.0).astype(dtype)
    return values.astype(dtype, copy=False)


def _columns(indices: list[int]) -> slice | np.ndarray:
    """Index of the columns ``indices``: a slice when they are a run (no gather, no copy).

    Usually every channel of a stream is the same kind, so this is the whole row.
    """
    if indices and indices == list(range(indices[0], indices[-1] + 1)):
        return slice(indices[0], indices[-1] + 1)
    return np.array(indices, dtype=np.intp)


@dataclass
class _PeriodicGroup:
    """The channels of one periodic kind, parameters as vectors (one entry per channel)."""

    kind: str
    columns: list[int]
    specs: list[ChannelSpec]

    def __post_init__(self) -> None:
        self.where = _columns(self.columns)
        chosen = [self.specs[i] for i in self.columns]
        self.freq = np.array([s.freq_hz for s in chosen])
        self.shift = np.array([s.phase for s in chosen]) / (2 * np.pi)
        self.offset = np.array([s.offset for s in chosen])
        self.amplitude = np.array([s.amplitude for s in chosen])
        self.duty = np.array([s.duty for s in chosen])

    def values(self, k: np.ndarray, frequency: float) -> np.ndarray:
        """``(len(k), channels)``: ChannelGenerator._periodic, broadcast over channels."""
        cycles = self.freq * (k / frequency)[:, None] + self.shift
        if self.kind == "sine":
            return self.offset + self.amplitude * np.sin(2 * np.pi * cycles)
        frac = cycles - np.floor(cycles)
        if self.kind == "square":
            return self.offset + self.amplitude * np.where(frac < self.duty, 1.0, -1.0)
        return self.offset + self.amplitude * (2.0 * frac - 1.0)


class StreamSynth:
    """All channels of one stream, generated together as ``(n, channels)`` chunks.

    Periodic channels (sine, square, sawtooth) are computed for all channels in one
    vectorised call per signal kind, with each channel's noise drawn from its own
    generator into one buffer: a handful of numpy calls per chunk instead of about ten
    per channel. The arithmetic is :class:`ChannelGenerator`'s, element by element, so
    the samples are the same bit for bit (tests compare the two).

    Args:
        channels: channel id -> spec, in column order.
        frequency: sampling rate in Hz; 0 for an irregular (marker) stream.
        dtype: the values' dtype.
        seed: the stream's seed; equal seeds give equal samples.
    """

    def __init__(
        self, channels: Mapping[str, ChannelSpec], frequency: float, dtype: np.dtype, seed: int
    ) -> None:
        self.frequency = frequency
        self.dtype = dtype
        self.next_index = 0
        self._channels = [
            ChannelGenerator(spec, frequency, seed, i) for i, spec in enumerate(channels.values())
        ]
        specs = list(channels.values())
        self.clock = EventClock(specs[0].rate_hz, seed) if specs[0].is_marker else None
        periodic = [i for i, s in enumerate(specs) if s.signal in ("sine", "square", "sawtooth")]
        # Column groups with their parameters as row vectors (broadcast over samples).
        self._groups = [
            _PeriodicGroup(kind, [i for i in periodic if specs[i].signal == kind], specs)
            for kind in ("sine", "square", "sawtooth")
            if any(specs[i].signal == kind for i in periodic)
        ]
        self._others = [(i, self._channels[i]) for i in range(len(specs)) if i not in periodic]
        noisy = [i for i in periodic if specs[i].noise > 0]
        self._noisy = np.array(noisy, dtype=np.intp)
        self._noisy_where = _columns(noisy)
        self._noise_scale = np.array([specs[i].noise for i in noisy])
        self._noise_draws = [self._channels[i]._noise for i in noisy]
        # Noise drawn ahead, one row per noisy channel, and how much of it is used.
        self._noise_ahead = np.empty((len(noisy), 0))
        self._noise_used = 0

    def take(self, n: int) -> np.ndarray:
        """The next ``n`` samples of every channel, shape ``(n, channels)``."""
        start = self.next_index
        self.next_index += n
        if self.dtype.kind == "U":
            columns = [channel.take(n) for channel in self._channels]
            return np.stack(columns, axis=1) if columns else np.empty((n, 0), np.str_)
        out = np.empty((n, len(self._channels)))
        if self._groups:
            k = np.arange(start, start + n, dtype=np.float64)
            for group in self._groups:
                out[:, group.where] = group.values(k, self.frequency)
            if len(self._noisy):
                out[:, self._noisy_where] += self._noise_scale * self._next_noise(n).T
        for column, channel in self._others:
            out[:, column] = channel.take(n)
        return cast_values(out, self.dtype)

    def _next_noise(self, n: int) -> np.ndarray:
        """The next ``n`` standard normal draws of each noisy channel, ``(channels, n)``.

        Drawn ahead in batches of :data:`_NOISE_BATCH`: a call per channel per chunk cost
        about 1.5 us x 64 channels for a live chunk of one sample (issue #12). Each
        channel's generator is still consumed strictly in order, so the values are the
        same for any batch or chunk size.
        """
        ahead, used = self._noise_ahead, self._noise_used
        left = ahead.shape[1] - used
        if left < n:
            fresh = np.empty((len(self._noise_draws), left + max(_NOISE_BATCH, n - left)))
            fresh[:, :left] = ahead[:, used:]
            for row, generator in zip(fresh[:, left:], self._noise_draws, strict=True):
                generator.standard_normal(out=row)
            self._noise_ahead = ahead = fresh
            used = 0
        self._noise_used = used + n
        return ahead[:, used : used + n]

    def upto(self, t: float, *, inclusive: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Samples due by ``t`` seconds after the start: ``(relative times, values)``.

        A regular stream's sample k is due at ``k / frequency``; an irregular stream's
        events come from its :class:`EventClock`. ``inclusive=False`` stops before ``t``.
        """
        if self.clock is not None:
            times = self.clock.until(t, inclusive=inclusive)
            return times, self.take(len(times))
        end = t * self.frequency
        due = math.floor(end) + 1 if inclusive else math.ceil(end)
        start = self.next_index
        n = max(0, due - start)
        times = np.arange(start, start + n, dtype=np.float64) / self.frequency
        return times, self.take(n)
