"""Steering a running replay: pause, resume, seek, speed, loop, start/end window.

A :class:`ReplayControl` belongs to one replay task. The API's ``control_task`` changes
it; the :class:`~streaminghub_datamux.drivers.replay.ReplaySource` reads it between
frames and while it waits for the next frame's due time, so a change takes effect at
once, never in the middle of a frame. Every change the consumer must know about becomes
a :class:`~streaminghub_datamux.model.StreamStatus` on the sink, in order with the
frames (docs/replay-control.md):

- ``paused`` / ``resumed``: the stream stops and goes on (no sample is skipped);
- ``seek``: the next frame starts at ``data["position"]`` seconds into the recording;
- ``loop``: the window starts again (``data["pass"]`` counts from 1);
- ``speed``: pacing changes to ``data["speed"]`` from the next frame on.

Positions are seconds after the recording's first sample.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from typing import Any

from ..errors import InvalidRequest

__all__ = ["ACTIONS", "FOREVER", "ReplayControl", "check_loop", "check_position"]

#: ``loop=FOREVER`` (or ``True``) repeats the window until the task is stopped.
FOREVER = -1
ACTIONS = ("pause", "resume", "seek", "speed", "loop", "state")


def check_position(value: Any, name: str) -> float | None:
    """A position in seconds (>= 0), or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRequest(f"{name} must be a number of seconds, not {value!r:.40}")
    if value < 0:
        raise InvalidRequest(f"{name} must be >= 0 seconds into the recording, not {value}")
    return float(value)


def check_loop(value: Any, name: str = "loop") -> int:
    """How many times to play the window: ``False``/1 once, ``True``/-1 forever, N times."""
    if value is True:
        return FOREVER
    if value is False or value is None:
        return 1
    if isinstance(value, int) and (value >= 1 or value == FOREVER):
        return value
    raise InvalidRequest(
        f"{name} must be true (forever), false (once) or a number of passes >= 1, not {value!r:.40}"
    )


class ReplayControl:
    """The steerable state of one replay.

    Args:
        speed: 1.0 real time, 2.0 twice as fast, 0 as fast as possible.
        start: where each pass starts (seconds into the recording; default 0).
        end: where each pass ends (default: the end of the recording).
        loop: passes in all (:func:`check_loop`).
    """

    def __init__(
        self,
        speed: float = 1.0,
        *,
        start: float | None = None,
        end: float | None = None,
        loop: Any = False,
    ) -> None:
        self.speed = _check_speed(speed)
        self.start = check_position(start, "start") or 0.0
        self.end = check_position(end, "end")
        if self.end is not None and self.end <= self.start:
            raise InvalidRequest(f"end ({self.end} s) must be after start ({self.start} s)")
        self.passes = check_loop(loop)
        self.pass_number = 1
        self.paused = False
        self.seek_to: float | None = None
        self.position = self.start  # of the last sample released
        self.notices: list[tuple[str, str, dict[str, Any]]] = []
        self.changed = asyncio.Event()
        self.version = 0  # bumped on every change, so a waiting source notices it

    # -- what the API calls --------------------------------------------------------------

    def apply(self, action: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """Run one control action; returns :meth:`state`.

        Raises:
            InvalidRequest: an unknown action or a bad parameter.
        """
        match action:
            case "pause":
                if not self.paused:
                    self.paused = True
                    self._notice("paused", f"paused at {self.position:.3f} s", {})
            case "resume":
                if self.paused:
                    self.paused = False
                    self._notice("resumed", f"resumed at {self.position:.3f} s", {})
            case "seek":
                position = check_position(params.get("position"), "position")
                if position is None:
                    raise InvalidRequest("seek needs position (seconds into the recording)")
                if self.end is not None and position >= self.end:
                    raise InvalidRequest(f"position {position} s is past the end ({self.end} s)")
                self.seek_to = position
                self._bump()
            case "speed":
                speed = _check_speed(params.get("speed"))
                if speed != self.speed:
                    old, self.speed = self.speed, speed
                    self._notice("speed", f"speed {speed:g} (was {old:g})", {"speed": speed})
            case "loop":
                self.passes = check_loop(params.get("loop"))
                self._bump()
            case "state":
                pass
            case _:
                raise InvalidRequest(f"unknown action {action!r}; actions: {list(ACTIONS)}")
        return self.state()

    def state(self) -> dict[str, Any]:
        return {
            "paused": self.paused,
            "speed": self.speed,
            "position": self.position,
            "start": self.start,
            "end": self.end,
            "loop": True if self.passes == FOREVER else self.passes,
            "pass": self.pass_number,
        }

    # -- what the source calls -----------------------------------------------------------

    def another_pass(self) -> bool:
        """At the end of the window: whether to play it again (and count the pass)."""
        if self.passes != FOREVER and self.pass_number >= self.passes:
            return False
        self.pass_number += 1
        return True

    def _notice(self, status: str, reason: str, data: dict[str, Any]) -> None:
        self.notices.append((status, reason, data))
        self._bump()

    def _bump(self) -> None:
        self.version += 1
        self.changed.set()


def _check_speed(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRequest(f"speed must be a number >= 0, not {value!r:.40}")
    if value < 0:
        raise InvalidRequest(f"speed must be >= 0 (0 means as fast as possible), not {value}")
    return float(value)
