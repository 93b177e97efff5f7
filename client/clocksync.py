"""Clock offsets between this client and each agent (docs/remote-api.md, "Clocks").

As LSL's time correction does: the client asks the agent for its clocks several times
(the ``clock`` method), notes its own clocks before sending and after the reply, and
keeps the exchange with the smallest round trip, whose error is at most half that
round trip. Exchanges are kept for a while, so every refresh can only improve on a
quiet moment seen recently, and a slow exchange never spoils the estimate.

``offset = agent clock - client clock``: a timestamp ``t`` of the agent's clock is
``t - offset`` on this client's clock of the same name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..clocks import CLOCKS, read_clocks
from ..errors import DatamuxError
from ..model import Frame

__all__ = ["EXCHANGES", "KEEP_EXCHANGES", "ClockEstimate", "ClockTracker", "Clocks"]

log = logging.getLogger(__name__)

EXCHANGES = 8  # exchanges per measurement
KEEP_EXCHANGES = 64  # the best of this many recent exchanges counts
MAX_AGE_S = 300.0  # exchanges older than this are forgotten (clocks drift)


@dataclass(frozen=True)
class ClockEstimate:
    """What the client knows about one agent's clocks.

    Attributes:
        agent: the agent's id.
        offsets: agent clock minus client clock, per clock (``"unix"``, ``"lsl"``).
        uncertainty: the bound on the offsets' error: half the best round trip (s).
        rtt: that round trip (s).
        measured_at: when the best exchange was made (client ``time.time()``).
        exchanges: how many exchanges the estimate chose from.
    """

    agent: str
    offsets: Mapping[str, float]
    uncertainty: float
    rtt: float
    measured_at: float
    exchanges: int

    @property
    def offset(self) -> float:
        """The wall-clock (``unix``) offset."""
        return self.offsets["unix"]


@dataclass(frozen=True)
class _Exchange:
    rtt: float
    offsets: dict[str, float]
    at: float


class ClockTracker:
    """Exchanges and estimates for one agent.

    Args:
        agent: the agent's id.
        ask: sends one ``clock`` request and returns the reply's result.
    """

    def __init__(self, agent: str, ask: Callable[[], Awaitable[Any]]) -> None:
        self.agent = agent
        self.ask = ask
        self._exchanges: deque[_Exchange] = deque(maxlen=KEEP_EXCHANGES)

    async def measure(self, exchanges: int = EXCHANGES) -> ClockEstimate:
        """Make ``exchanges`` more exchanges; the estimate from the best one kept."""
        for _ in range(max(1, exchanges)):
            before = read_clocks()
            reply = await self.ask()
            after = read_clocks()
            agent = _clocks_of(reply, self.agent)
            rtt = after["lsl"] - before["lsl"]  # monotonic: immune to wall-clock steps
            offsets = {
                name: agent[name] - (before[name] + after[name]) / 2
                for name in CLOCKS
                if name in agent
            }
            self._exchanges.append(_Exchange(rtt, offsets, after["unix"]))
        return self.estimate()

    def estimate(self) -> ClockEstimate:
        """The estimate from the best recent exchange.

        Raises:
            DatamuxError: no exchange yet.
        """
        now = time.time()
        while self._exchanges and now - self._exchanges[0].at > MAX_AGE_S:
            self._exchanges.popleft()
        if not self._exchanges:
            raise DatamuxError(f"no clock exchange with agent {self.agent!r} yet")
        best = min(self._exchanges, key=lambda e: e.rtt)
        return ClockEstimate(
            agent=self.agent,
            offsets=dict(best.offsets),
            uncertainty=best.rtt / 2,
            rtt=best.rtt,
            measured_at=best.at,
            exchanges=len(self._exchanges),
        )


def _clocks_of(reply: Any, agent: str) -> dict[str, float]:
    """The agent's clock readings, checked (nothing from the network is trusted)."""
    if not isinstance(reply, Mapping):
        raise DatamuxError(f"clock: malformed reply from agent {agent!r}")
    clocks = {}
    for name in CLOCKS:
        value = reply.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            with contextlib.suppress(OverflowError):  # an integer too large for a float
                if math.isfinite(value):
                    clocks[name] = float(value)
    if "unix" not in clocks:
        raise DatamuxError(f"clock: agent {agent!r} did not send its unix clock")
    return clocks


class Clocks:
    """The clock trackers of the agents measured so far, refreshed in the background.

    Args:
        ask: ``ask(agent)`` asks an agent for its clocks (the ``clock`` method).
        is_online: whether an agent is online now (only those are refreshed).
        refresh_s: how often every tracker measures again; 0: never.
        name: gives the refresh task's name when it starts.
    """

    def __init__(
        self,
        ask: Callable[[str], Awaitable[Any]],
        is_online: Callable[[str], bool],
        refresh_s: float,
        name: Callable[[], str],
    ) -> None:
        self.ask = ask
        self.is_online = is_online
        self.refresh_s = float(refresh_s)
        self.name = name
        self.trackers: dict[str, ClockTracker] = {}
        self._refresher: asyncio.Task[None] | None = None

    def tracker(self, agent: str) -> ClockTracker:
        """The agent's tracker (made on first use, which starts the refreshes)."""
        tracker = self.trackers.get(agent)
        if tracker is None:
            tracker = self.trackers[agent] = ClockTracker(agent, lambda: self.ask(agent))
        if self._refresher is None and self.refresh_s > 0:
            self._refresher = asyncio.get_running_loop().create_task(
                self._refresh(), name=self.name()
            )
        return tracker

    def estimates(self) -> dict[str, ClockEstimate]:
        """The latest estimate of every agent measured so far, by agent id."""
        estimates = {}
        for agent, tracker in self.trackers.items():
            with contextlib.suppress(DatamuxError):
                estimates[agent] = tracker.estimate()
        return estimates

    async def restamper(self, agent: str) -> Callable[[Frame], None]:
        """A function moving a frame's timestamps onto this client's clocks."""
        tracker = self.tracker(agent)
        try:
            tracker.estimate()
        except DatamuxError:
            await tracker.measure()

        def restamp(frame: Frame) -> None:
            estimate = tracker.estimate()
            clock = "lsl" if frame.attrs.get("mode") == "lsl" else "unix"
            frame.timestamps = frame.timestamps - estimate.offsets.get(clock, estimate.offset)

        return restamp

    def close(self) -> None:
        """Stop the refreshes."""
        if self._refresher is not None:
            self._refresher.cancel()
            self._refresher = None

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            for agent, tracker in list(self.trackers.items()):
                if not self.is_online(agent):
                    continue
                try:
                    await tracker.measure(EXCHANGES // 2)
                except DatamuxError as exc:
                    log.info("clock refresh of agent %s failed: %s", agent, exc)
