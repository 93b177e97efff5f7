"""Run ``python -m streaminghub_datamux`` with its event loop's wake-ups counted.

The bench starts the agent through this script. It counts the calls of the loop's
selector (``epoll_wait``: one per loop turn) and those with timeout 0 (a turn that
found more work already queued), and writes both as JSON to ``$BENCH_LOOP_COUNTS``
when the process gets SIGUSR1. With ``$BENCH_PROFILE`` set, SIGUSR2 starts cProfile on
the loop's thread and the next SIGUSR2 stops it and writes the stats there (for
``python -m pstats``). Nothing else changes: the agent runs as ``python -m
streaminghub_datamux <args>`` would.

    python bench/loop_counter.py serve --port 1883 ...
"""

from __future__ import annotations

import cProfile
import json
import os
import runpy
import selectors
import signal
import sys
from pathlib import Path
from typing import Any

from streaminghub_datamux.preciseloop import PreciseSelector

COUNTS = {"selects": 0, "zero_timeout": 0}
_select = selectors.EpollSelector.select


def _counting_select(self: Any, timeout: float | None = None) -> Any:
    COUNTS["selects"] += 1
    if timeout is not None and timeout <= 0:
        COUNTS["zero_timeout"] += 1
    return _select(self, timeout)


class CountingSelector(PreciseSelector):
    """The agent's selector, counting its own calls (for a loop made in the bench)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts = {"selects": 0, "zero_timeout": 0}

    def select(self, timeout: float | None = None) -> Any:
        self.counts["selects"] += 1
        if timeout is not None and timeout <= 0:
            self.counts["zero_timeout"] += 1
        return super().select(timeout)


def _dump_counts(signum: int, frame: Any) -> None:
    Path(os.environ["BENCH_LOOP_COUNTS"]).write_text(json.dumps(COUNTS))


_profiler: list[cProfile.Profile] = []


def _toggle_profile(signum: int, frame: Any) -> None:
    if _profiler:
        profiler = _profiler.pop()
        profiler.disable()
        profiler.dump_stats(os.environ["BENCH_PROFILE"])
    else:
        _profiler.append(cProfile.Profile())
        _profiler[0].enable()


def main() -> None:
    selectors.EpollSelector.select = _counting_select  # type: ignore[method-assign]
    if os.environ.get("BENCH_LOOP_COUNTS"):
        signal.signal(signal.SIGUSR1, _dump_counts)
    if os.environ.get("BENCH_PROFILE"):
        signal.signal(signal.SIGUSR2, _toggle_profile)
    sys.argv = ["streaminghub_datamux", *sys.argv[1:]]
    runpy.run_module("streaminghub_datamux", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
