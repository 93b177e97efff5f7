"""Keeping this client's requests within each agent's request budget.

An agent serves each client ``burst`` requests at once and ``per_s`` a second
(docs/protocol.md, "Rate limit"), and says so in its birth message. Past that it refuses
requests, and those sent before the time it names get no reply at all. So the client
paces itself: a script that asks 200 questions in a loop, or gathers 200 calls at once,
waits its turn instead of failing at the 61st or timing out on the silent ones.

The pace is a reservation schedule (GCRA): each request reserves the next free slot, so
concurrent callers queue without a lock and none is woken to find the slot taken. The
client keeps a little below the agent's budget (burst and rate) so that jitter on the
way, which can bunch requests up, never tips the agent's bucket. A refusal still
happens when the agent's bucket was drained by someone else under the same client id
(another process, an earlier connection): then the agent's "retry after" moves the
schedule, and the refused request is sent again once (:class:`~.rpc.Requests`).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import RateLimited

__all__ = ["AgentBudget", "RequestPacer", "budget_of"]

# Below the agent's budget by this much: a few requests of burst, a few percent of rate.
BURST_MARGIN = 0.1  # of the burst, at least 1 request
RATE_MARGIN = 0.95
# Budgets outside these bounds are not believed (nothing from the network is trusted):
# the client then does not pace, and the agent's refusals still say when to retry.
MAX_RATE_PER_S = 1e6
MAX_BURST = 1e6


class AgentBudget:
    """One agent's budget for this client, as it advertised it."""

    __slots__ = ("burst", "per_s")

    def __init__(self, per_s: float, burst: float) -> None:
        self.per_s = per_s
        self.burst = burst


def budget_of(state: Mapping[str, Any] | None) -> AgentBudget | None:
    """The ``request_budget`` of an agent's birth message, if it is a sane one."""
    budget = state.get("request_budget") if state is not None else None
    if not isinstance(budget, Mapping):
        return None
    per_s, burst = budget.get("per_s"), budget.get("burst")
    for value, top in ((per_s, MAX_RATE_PER_S), (burst, MAX_BURST)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        if not (math.isfinite(value) and 0 < value <= top):
            return None
    assert isinstance(per_s, int | float) and isinstance(burst, int | float)
    if burst < 1:
        return None
    return AgentBudget(float(per_s), float(burst))


class RequestPacer:
    """Per agent, when this client may send its next request.

    Args:
        budget: the agent's advertised budget (None: do not pace, only honour refusals).
        clock: seconds, monotonic (the loop's time).
    """

    def __init__(
        self, budget: Callable[[str], AgentBudget | None], clock: Callable[[], float]
    ) -> None:
        self._budget = budget
        self._clock = clock
        # agent -> when its next request may go (the GCRA's theoretical arrival time)
        self._next_at: dict[str, float] = {}
        self._told: dict[str, float] = {}  # agent -> no request before this time

    async def wait_turn(self, agent: str, method: str, deadline: float | None) -> None:
        """Wait until a request to ``agent`` fits its budget, and take that slot.

        Raises:
            RateLimited: the slot comes after ``deadline`` (the call's timeout).
        """
        now = self._clock()
        start = self._told.get(agent, -math.inf)
        if start <= now:
            self._told.pop(agent, None)
        budget = self._budget(agent)
        slot = start
        if budget is not None:
            burst = max(1.0, budget.burst - max(1.0, budget.burst * BURST_MARGIN))
            interval = 1.0 / (budget.per_s * RATE_MARGIN)
            # Up to a burst of requests may go at once: the schedule never lags more.
            slot = max(self._next_at.get(agent, -math.inf), now - (burst - 1) * interval, start)
        if deadline is not None and slot > deadline:
            raise self._too_long(agent, method, slot - now)
        if budget is not None:
            self._next_at[agent] = slot + interval
        if slot > now:
            await asyncio.sleep(slot - now)

    def told(self, agent: str, retry_after_s: float) -> None:
        """The agent refused a request: nothing before ``retry_after_s`` from now."""
        until = self._clock() + retry_after_s
        self._told[agent] = max(until, self._told.get(agent, -math.inf))
        if agent in self._next_at:  # the agent's bucket is empty: no burst from here
            self._next_at[agent] = max(self._next_at[agent], until)

    def _too_long(self, agent: str, method: str, wait: float) -> RateLimited:
        budget = self._budget(agent)
        why = (
            f"its budget of {budget.burst:g} requests at once and {budget.per_s:g} a second"
            if budget is not None
            else "it refused this client's requests until then"
        )
        error = RateLimited(
            f"{method}: not sent: a request to agent {agent!r} within {why} (the agent's "
            f"agent.request_burst and agent.max_requests_per_s) could go only in "
            f"{wait:.2f} s, after this call's timeout; send fewer requests, or raise the "
            "timeout or the agent's budget"
        )
        error.retry_after_s = wait
        return error
