"""Hostile checks of the precise event loop: odd timeouts, odd lifetimes, other Pythons.

Written by the review of preciseloop.py; each test names what it once broke or what held.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from streaminghub_datamux import preciseloop

MODULE = Path(preciseloop.__file__)
OTHER_PYTHONS = [
    Path("/root/.pyenv/versions/3.12.1/bin/python"),
    Path("/root/.pyenv/versions/3.13.0/bin/python"),
]


def _median_wait_ms(timeout: float, runs: int = 40) -> float:
    selector = preciseloop.PreciseSelector()
    try:
        waits = []
        for _ in range(runs):
            began = time.perf_counter()
            selector.select(timeout)
            waits.append((time.perf_counter() - began) * 1e3)
        return statistics.median(waits)
    finally:
        selector.close()


@pytest.mark.parametrize("timeout_ms", [1.0005, 3.0000004])
def test_a_wait_just_above_a_whole_millisecond_is_not_a_millisecond_late(timeout_ms: float):
    """Found: a timeout within 1 us above a whole ms skipped the timer as "whole", and
    epoll (rounding up) waited a whole millisecond more."""
    waited = _median_wait_ms(timeout_ms / 1e3)
    assert timeout_ms <= waited + 0.05 < timeout_ms + 0.6, f"{waited:.3f} ms for {timeout_ms} ms"


@pytest.mark.parametrize("timeout_s", [5e-7, 5e-8])
def test_a_sub_microsecond_wait_is_not_a_millisecond(timeout_s: float):
    """Found: timeouts below 1 us waited epoll's smallest timeout, a whole millisecond."""
    waited = _median_wait_ms(timeout_s)
    assert waited < 0.5, f"{waited:.3f} ms for a {timeout_s * 1e6} us timeout"


def test_a_whole_millisecond_wait_stays_on_time():
    waited = _median_wait_ms(0.002)
    assert 2.0 <= waited + 0.05 < 2.6


def test_a_huge_timeout_arms_and_io_still_ends_the_wait():
    """asyncio caps a wait at one day: the timer takes it, and a ready socket ends it."""
    selector = preciseloop.PreciseSelector()
    left, right = socket.socketpair()
    try:
        selector.register(left, 1)  # EVENT_READ
        right.send(b"x")
        began = time.perf_counter()
        ready = selector.select(24 * 3600.0)
        assert [key.fileobj for key, _ in ready] == [left]
        assert time.perf_counter() - began < 1.0
    finally:
        selector.close()
        left.close()
        right.close()


def test_many_timers_fire_in_order_and_none_early():
    async def body() -> list[tuple[float, float]]:
        loop = asyncio.get_running_loop()
        fired: list[tuple[float, float]] = []
        start = loop.time()
        done = asyncio.Event()
        delays = [((k * 7919) % 2000) / 1e4 for k in range(2000)]  # 0 .. 0.2 s, shuffled

        def fire(due: float) -> None:
            fired.append((due, loop.time()))
            if len(fired) == len(delays):
                done.set()

        for delay in delays:
            loop.call_at(start + delay, fire, start + delay)
        await asyncio.wait_for(done.wait(), 10)
        return fired

    fired = preciseloop.run(body())
    dues = [due for due, _ in fired]
    assert dues == sorted(dues)
    assert all(at >= due for due, at in fired)


def test_zero_and_negative_delays_run_at_once():
    async def body() -> float:
        loop = asyncio.get_running_loop()
        began = loop.time()
        for delay in (0, -1, 0.0, 1e-12):
            await asyncio.sleep(delay)
        return loop.time() - began

    assert preciseloop.run(body()) < 0.05


def test_closing_a_loop_twice_and_a_selector_after_its_loop_is_harmless():
    before = len(os.listdir("/proc/self/fd"))
    loop = preciseloop.new_event_loop()
    loop.run_until_complete(asyncio.sleep(0.0015))
    loop.close()
    loop.close()
    assert len(os.listdir("/proc/self/fd")) <= before
    never_run = asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="closed"):
        loop.run_until_complete(never_run)
    never_run.close()


def test_run_twice_in_a_row_and_after_asyncio_run():
    async def which() -> bool:
        return isinstance(asyncio.get_running_loop()._selector, preciseloop.PreciseSelector)  # type: ignore[attr-defined]

    assert asyncio.run(which()) is False
    assert preciseloop.run(which()) is True
    assert preciseloop.run(which()) is True


def test_run_inside_a_running_loop_refuses_clearly_and_leaves_no_warning():
    """Found (Python 3.11): a second loop was made, failed to run ("Cannot run the event
    loop while another loop is running") and left an un-awaited coroutine (a warning)."""
    before = sys.getswitchinterval()

    async def nested() -> None:
        inner = asyncio.sleep(0)
        try:
            with pytest.raises(RuntimeError, match="cannot be called from a running event loop"):
                preciseloop.run(inner)
        finally:
            inner.close()

    preciseloop.run(nested())
    assert sys.getswitchinterval() == before


def test_the_switch_interval_is_restored_when_main_raises():
    before = sys.getswitchinterval()

    async def fails() -> None:
        assert sys.getswitchinterval() == preciseloop.GIL_SWITCH_INTERVAL_S
        raise KeyError("boom")

    with pytest.raises(KeyError):
        preciseloop.run(fails())
    assert sys.getswitchinterval() == before


def test_run_in_overlapping_threads_restores_the_switch_interval_once_all_end():
    """Found: each run() restored what it saw on entry, so with two threads the one that
    ended first raised the interval under the other, and the last to end left it at
    0.5 ms for the rest of the process."""
    before = sys.getswitchinterval()
    seen: list[float] = []

    async def nap(seconds: float, look: bool = False) -> None:
        await asyncio.sleep(seconds)
        if look:
            seen.append(sys.getswitchinterval())

    first = threading.Thread(target=preciseloop.run, args=(nap(0.2),))
    first.start()
    time.sleep(0.05)  # the second starts while the first runs, and ends after it
    preciseloop.run(nap(0.4, look=True))
    first.join(10)
    assert seen == [preciseloop.GIL_SWITCH_INTERVAL_S], "raised under a running loop"
    assert sys.getswitchinterval() == before, "left lowered after every loop ended"


_OTHER_PYTHON_CHECK = """
import asyncio, importlib.util, os, statistics, sys, time
spec = importlib.util.spec_from_file_location("preciseloop", sys.argv[1])
pl = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pl)
selector = pl.PreciseSelector()
def median_ms(timeout):
    waits = []
    for _ in range(30):
        began = time.perf_counter(); selector.select(timeout)
        waits.append((time.perf_counter() - began) * 1e3)
    return statistics.median(waits)
print(median_ms(0.0010005), median_ms(5e-7), median_ms(0.0013))
selector.close()
before = len(os.listdir("/proc/self/fd"))
for _ in range(5):
    assert pl.run(asyncio.sleep(0.0013, result=3)) == 3
assert len(os.listdir("/proc/self/fd")) <= before
assert sys.getswitchinterval() == 0.005
"""


@pytest.mark.parametrize("python", OTHER_PYTHONS, ids=lambda p: p.parent.parent.name)
def test_other_pythons_load_the_module_by_path_and_wait_on_time(python: Path):
    if not python.exists():
        pytest.skip(f"{python} is not installed")
    done = subprocess.run(
        [str(python), "-c", _OTHER_PYTHON_CHECK, str(MODULE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    just_above, tiny, plain = (float(x) for x in done.stdout.split())
    assert 1.0 <= just_above + 0.05 < 1.6, just_above
    assert tiny < 0.5, tiny
    assert 1.3 <= plain + 0.05 < 1.9, plain
