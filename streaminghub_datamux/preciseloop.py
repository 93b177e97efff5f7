"""An asyncio event loop whose timers fire on time (Linux), for the agent and the CLI.

asyncio on Linux waits in ``epoll_wait``, which takes its timeout in whole milliseconds,
and rounds the timeout up: every ``asyncio.sleep`` and ``call_at`` wakes up to 1 ms late,
0.5 ms on average. A live source that hands over samples every millisecond or two pays
that on every sample (issue #12: half the sample-to-sink p50 of a bare loop).

:class:`PreciseSelector` arms a ``timerfd`` at the exact timeout before each wait that
has one; the timer's descriptor is in the epoll set (edge-triggered, never read), so
the wait ends on the nanosecond deadline, and asyncio never sees its event. Cost: one
``timerfd_settime`` per timed wait (bench/transport.py measures both loops).

Where there is no timerfd (not Linux, or a 32-bit libc whose ``time_t`` layout ctypes
cannot be sure of, before Python 3.13's ``os.timerfd_*``), :func:`new_event_loop` gives
asyncio's default loop: timers are then up to 1 ms late, nothing else changes.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import math
import os
import select
import selectors
import sys
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["PreciseSelector", "new_event_loop", "run"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_CLOCK_MONOTONIC = 1  # asyncio's loop.time() is time.monotonic(): the same clock
_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_CLOEXEC = os.O_CLOEXEC
_MS = 1e-3
_MIN_TIMER_S = 1e-6  # a zero timerfd deadline disarms it
# How long a busy worker thread may keep the GIL from the loop (Python's default: 5 ms).
GIL_SWITCH_INTERVAL_S = 0.0005
# A wait that epoll's whole milliseconds (rounded up) end this close to its timeout needs
# no timer: epoll is exact enough.
_WHOLE_MS_SLACK_S = 1e-6


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class _TimerFd:
    """A one-shot CLOCK_MONOTONIC timerfd: os.timerfd_* (Python 3.13+) or libc via ctypes."""

    def __init__(self) -> None:
        self.fd, self._settime = _os_timerfd() or _libc_timerfd()

    def arm(self, seconds: float) -> None:
        """Fire once, ``seconds`` from now (replaces any earlier deadline)."""
        self._settime(seconds)

    def close(self) -> None:
        os.close(self.fd)


def _os_timerfd() -> tuple[int, Callable[[float], None]] | None:
    create, settime = getattr(os, "timerfd_create", None), getattr(os, "timerfd_settime", None)
    if create is None or settime is None:  # before Python 3.13
        return None
    fd = create(_CLOCK_MONOTONIC, flags=_TFD_NONBLOCK | _TFD_CLOEXEC)
    return fd, lambda seconds: settime(fd, initial=seconds)


def _libc_timerfd() -> tuple[int, Callable[[float], None]]:
    # time_t is a long on 64-bit Linux; a 32-bit libc may use 64-bit time_t (musl,
    # glibc with _TIME_BITS=64), which ctypes cannot detect: no timerfd there.
    if not sys.platform.startswith("linux") or ctypes.sizeof(ctypes.c_long) != 8:
        raise OSError("no timerfd here (needs Linux with a 64-bit libc, or Python 3.13)")
    libc = ctypes.CDLL(None, use_errno=True)
    create, settime_c = libc.timerfd_create, libc.timerfd_settime
    create.argtypes, create.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settime_c.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    settime_c.restype = ctypes.c_int
    fd = create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "timerfd_create failed")
    spec = _Itimerspec()
    value, pointer = spec.it_value, ctypes.byref(spec)

    def settime(seconds: float) -> None:
        # Rounded up: a timer that fires a few ns before asyncio's deadline would cost
        # one more wait.
        whole = int(seconds)
        value.tv_sec, value.tv_nsec = whole, max(math.ceil((seconds - whole) * 1e9), 1)
        if value.tv_nsec >= 1_000_000_000:
            value.tv_sec, value.tv_nsec = whole + 1, 0
        if settime_c(fd, 0, pointer, None) != 0:
            raise OSError(ctypes.get_errno(), "timerfd_settime failed")

    return fd, settime


if sys.platform == "linux":
    _EpollSelector = selectors.EpollSelector
else:  # importable everywhere; _TimerFd() refuses first, so new_event_loop falls back
    _EpollSelector = selectors.DefaultSelector


class PreciseSelector(_EpollSelector):
    """An epoll selector whose timed waits end on time: a timerfd holds the deadline."""

    def __init__(self) -> None:
        self._timer = _TimerFd()  # OSError where there is none: before any other resource
        try:
            super().__init__()
            # Straight into the epoll set, edge-triggered, and not in the selector's map:
            # its wake-ups end the wait, select() never reports it and nobody reads it
            # (each expiry is a new edge, so an unread count does not keep it ready).
            epoll: select.epoll = self._selector  # type: ignore[attr-defined]  # typeshed lacks it
            epoll.register(self._timer.fd, select.EPOLLIN | select.EPOLLET)
        except BaseException:
            self._timer.close()
            raise

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is not None and timeout > 0:
            # What epoll would wait: selectors rounds up to whole ms, so a timeout just
            # above one (1.0000005 ms, or below 1 us) waits a whole ms more without a timer.
            epoll_s = math.ceil(timeout * 1e3) * 1e-3
            if epoll_s - timeout > _WHOLE_MS_SLACK_S:
                self._timer.arm(max(timeout, _MIN_TIMER_S))
                # epoll's own (rounded-up) timeout is only a backstop now: the timer ends
                # the wait first. A timer left armed by a wait that I/O ended early costs
                # at most one spare wake-up; the next timed wait moves it.
                timeout += _MS
        return super().select(timeout)

    def close(self) -> None:
        self._timer.close()
        super().close()


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A loop with on-time timers where the system allows, else asyncio's default loop."""
    try:
        selector = PreciseSelector()
    except (OSError, AttributeError) as exc:
        log.debug("timers may wake up to 1 ms late: %s", exc)
        return asyncio.new_event_loop()
    return asyncio.SelectorEventLoop(selector)


def run(main: Coroutine[Any, Any, T], *, debug: bool | None = None) -> T:
    """Like :func:`asyncio.run`, on a loop from :func:`new_event_loop`.

    While it runs, a thread that holds the GIL (a parser, a decoder) hands it to a
    waiting loop within GIL_SWITCH_INTERVAL_S instead of Python's 5 ms: a timer that
    fires on time must also get to run.

    For analytics code with live low-latency streams:
    ``streaminghub_datamux.preciseloop.run(main())`` instead of ``asyncio.run(main())``.
    """
    # asyncio.Runner on Python 3.11 does not check this itself: it made a second loop,
    # failed to run it, and left an un-awaited coroutine behind (a RuntimeWarning).
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass  # none running: the usual case
    else:
        raise RuntimeError("preciseloop.run() cannot be called from a running event loop")
    _lower_switch_interval()
    try:
        with asyncio.Runner(debug=debug, loop_factory=new_event_loop) as runner:
            return runner.run(main)
    finally:
        _restore_switch_interval()


# The switch interval is process-wide: with run() in several threads, the first to enter
# saves it and the last to leave restores it (else one that ends first raises it under
# the others, and the last one to end leaves it lowered for good).
_switch_lock = threading.Lock()
_switch_users = 0
_switch_saved = 0.0


def _lower_switch_interval() -> None:
    global _switch_users, _switch_saved
    with _switch_lock:
        if _switch_users == 0:
            _switch_saved = sys.getswitchinterval()
            sys.setswitchinterval(min(_switch_saved, GIL_SWITCH_INTERVAL_S))
        _switch_users += 1


def _restore_switch_interval() -> None:
    global _switch_users
    with _switch_lock:
        _switch_users -= 1
        if _switch_users == 0:
            sys.setswitchinterval(_switch_saved)
