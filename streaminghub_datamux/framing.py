"""Framing: when a task turns buffered samples into a frame.

A frame is flushed when it holds ``max_samples`` samples or when its oldest sample is
``max_latency_ms`` old, whichever comes first. Presets cover the usual trade-offs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import InvalidRequest

__all__ = ["MIN_SOURCE_PERIOD_S", "PRESETS", "Framing"]

# No live source delivers more often than this: below it, wake-ups cost more than they
# save (epoll rounds timeouts up to 1 ms anyway).
MIN_SOURCE_PERIOD_S = 0.001


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
