"""The one sample clock: timestamps for samples from their arrival times and the rate.

Serial reads and BLE notifications both arrive in bursts; both stamp their samples with
a :class:`SampleClock` rather than with arrival times, which bunch up.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["CLOCK_FOLLOW_S", "CLOCK_MAX_LAG_S", "SampleClock"]

# How far behind its arrival a sample may be stamped before the clock re-anchors, at
# least: a gap in the data, or a device much slower than its nominal rate.
CLOCK_MAX_LAG_S = 0.1
# Time constant with which the clock follows a device slower than its nominal rate.
CLOCK_FOLLOW_S = 1.0


class SampleClock:
    """Sample timestamps (``time.time()`` seconds) from arrival times and the nominal rate.

    A serial read returns whatever arrived since the last one, so arrival times are
    bursty. For a regular stream, sample ``k`` is stamped ``t0 + k / rate``: ``k`` counts
    samples (or comes from the device's counter, unwrapped, so lost samples leave gaps),
    and ``t0`` is set by the first batch so that its last sample is stamped at its
    arrival. Each later batch checks the model against its arrival time:

    - arrived *before* the model says its last sample was taken: the model is late, so
      ``t0`` moves earlier, by at most half a sample period per batch;
    - arrived later: ``t0`` follows slowly (time constant :data:`CLOCK_FOLLOW_S`), which
      absorbs a device slower than its nominal rate and ignores read jitter;
    - arrived later by more than ``max(CLOCK_MAX_LAG_S, 2 / rate)``: a gap (the device
      paused or samples were lost without a counter): ``t0`` re-anchors at this batch.
    - arrived earlier by more than that: the device counter jumped forward (a reset
      read as a wrap, a corrupted counter): ``t0`` re-anchors so the batch's last sample
      is stamped at its arrival (or just after the previous stamp, if later).

    Corrections within the allowed lag never exceed half a period per batch, and a
    batch whose stamps would not follow the previous ones is pushed after them, so
    timestamps always increase. Irregular streams (rate 0) are stamped with
    their arrival time.

    A ``steady`` clock (BLE) makes no correction within the allowed lag: several
    notifications arrive per connection event, so an early arrival says nothing about
    the device's clock. Further ahead than the allowed lag (a device faster than its
    rate) it squeezes the batch between the previous stamp and arrival plus that lag,
    so stamps never run ahead of arrival by more than it.

    Args:
        rate: nominal sampling rate in Hz; 0 for irregular streams.
        counter_bits: the device counter wraps at ``2**counter_bits`` (None: never).
        steady: no correction within the allowed lag; squeeze when ahead (see above).
    """

    def __init__(
        self, rate: float, counter_bits: int | None = None, *, steady: bool = False
    ) -> None:
        self.rate = rate
        self.steady = steady
        self.period = 1.0 / rate if rate > 0 else 0.0
        self.max_lag = max(CLOCK_MAX_LAG_S, 2.0 * self.period)
        self.modulus = float(2**counter_bits) if counter_bits else None
        self.reanchors = 0
        self._t0: float | None = None
        self._next = 0.0  # the next sample index without a counter
        self._last_raw: float | None = None  # the last raw device counter
        self._last_k = -1.0
        self._last_t = -math.inf
        self._last_arrival = -math.inf

    def stamp(self, n: int, arrival: float, counters: np.ndarray | None = None) -> np.ndarray:
        """Timestamps of the next ``n`` samples, which arrived at ``arrival``."""
        if n == 0:
            return np.empty(0)
        if self.rate <= 0:
            stamps = np.full(n, max(arrival, self._last_t))
            self._last_t = float(stamps[-1])
            return stamps
        k = self._indices(n, counters)
        if self._t0 is None:
            self._t0 = arrival - k[-1] * self.period
        else:
            lag = arrival - (self._t0 + k[-1] * self.period)
            if self.steady and lag < -self.max_lag:
                return self._squeeze(n, arrival, k)
            if not self.steady or lag > self.max_lag:
                self._correct(lag, arrival, k)
        self._last_arrival = arrival
        stamps = self._t0 + k * self.period
        if stamps[0] <= self._last_t:  # only after a device counter reset: keep order
            stamps = np.maximum(stamps, self._last_t + np.arange(1, n + 1) * 1e-6)
        self._last_t = float(stamps[-1])
        return stamps

    def _squeeze(self, n: int, arrival: float, k: np.ndarray) -> np.ndarray:
        # Between the previous stamp and arrival + max_lag, at most a period apart; the
        # model then continues from the last of them.
        room = max(arrival + self.max_lag - self._last_t, 0.0)
        stamps = self._last_t + np.arange(1, n + 1, dtype=np.float64) * min(self.period, room / n)
        self._last_t = float(stamps[-1])
        self._t0 = self._last_t - k[-1] * self.period
        self._last_arrival = arrival
        return stamps

    def _correct(self, lag: float, arrival: float, k: np.ndarray) -> None:
        assert self._t0 is not None
        half = 0.5 * self.period
        if lag > self.max_lag:  # a gap: start a new run at this batch
            self._t0 = arrival - k[-1] * self.period
            self.reanchors += 1
        elif lag < -self.max_lag:
            # The model runs far ahead of arrival: the counter jumped forward (a reset
            # read as a wrap, a corrupted value). Half a period per batch would take
            # minutes to catch up, stamping samples in the future meanwhile: re-anchor so
            # the last sample lands at arrival (never before the last stamp).
            last = max(arrival, self._last_t + self.period)
            self._t0 = last - k[-1] * self.period
            self.reanchors += 1
        elif lag < 0:
            self._t0 += max(lag, -half)
        else:
            gain = min(0.5, max(arrival - self._last_arrival, 0.0) / CLOCK_FOLLOW_S)
            self._t0 += min(lag * gain, half)

    def _indices(self, n: int, counters: np.ndarray | None) -> np.ndarray:
        if counters is None:
            k = self._next + np.arange(n, dtype=np.float64)
            self._next += n
            return k
        raw = counters.astype(np.float64)
        first = raw[0] - 1 if self._last_raw is None else self._last_raw
        steps = np.diff(raw, prepend=first)
        if self.modulus is not None:
            steps = np.mod(steps, self.modulus)  # a wrap is a step forward
        # A counter that goes back (or repeats) was reset: count on by one.
        steps = np.where(steps > 0, steps, 1.0)
        k = self._last_k + np.cumsum(steps)
        self._last_raw, self._last_k = float(raw[-1]), float(k[-1])
        return k
