"""Which clock a stream's timestamps are on, and reading the clocks datamux knows.

Three time bases occur (docs/remote-api.md, "Clocks"):

- ``"lsl"``: LSL's ``local_clock()`` (CLOCK_MONOTONIC on Linux), for streams proxied
  from LSL outlets;
- ``"unix"``: wall-clock seconds (``time.time()``), for every other live source
  (simulation, serial, BLE);
- ``"recording"``: whatever the recording's file says, for replayed streams; it has no
  relation to any machine's clock.
"""

from __future__ import annotations

import os
import time
from typing import Literal

from .model import Stream

__all__ = ["CLOCKS", "TEST_OFFSET_ENV", "ClockName", "read_clocks", "stream_clock"]

ClockName = Literal["lsl", "unix", "recording"]
#: The clocks an agent reports in its birth message and its ``clock`` replies.
CLOCKS: tuple[str, ...] = ("unix", "lsl")
#: Test hook: an agent shifts its clocks (replies and live timestamps) by this many
#: seconds, as if its host's clock were off. Never set it in production.
TEST_OFFSET_ENV = "DATAMUX_TEST_CLOCK_OFFSET"


def stream_clock(stream: Stream) -> ClockName:
    """The time base of a stream's timestamps."""
    if stream.collection_id is not None and stream.node_id is None:
        return "recording"
    if stream.attrs.get("mode") == "lsl":
        return "lsl"
    return "unix"


def monotonic() -> float:
    """LSL's ``local_clock()`` without importing pylsl (the same CLOCK_MONOTONIC)."""
    return time.monotonic()


def read_clocks(shift: float = 0.0) -> dict[str, float]:
    """Every clock datamux knows, read now (each shifted by ``shift`` seconds)."""
    return {"unix": time.time() + shift, "lsl": monotonic() + shift}


def injected_offset() -> float:
    """The clock shift the test hook asks for (0 when unset).

    Raises:
        ValueError: the variable is set but not a number.
    """
    raw = os.environ.get(TEST_OFFSET_ENV, "").strip()
    if not raw:
        return 0.0
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{TEST_OFFSET_ENV}={raw!r} is not a number of seconds") from None
