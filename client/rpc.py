"""Requests to agents and their replies: correlation, deadlines, the method table.

Each request gets an unpredictable id, so that nobody who sees or guesses ids can answer
in the agent's place, and a reply counts only on the reply topic of the agent asked.
One deadline covers sending and waiting: a stalled broker must not stall the caller.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from ..codec import decode, encode
from ..errors import (
    DatamuxError,
    InvalidRequest,
    RateLimited,
    Timeout,
    Unavailable,
    error_from_code,
)
from ..mqttio import MqttLink
from ..paging import fetch_all_pages
from ..protocol import TABLE, Topics
from .agents import Agents
from .pacing import RequestPacer, budget_of

__all__ = ["Endpoint", "Requests"]

log = logging.getLogger(__name__)

MAX_RETRY_AFTER_S = 3600.0  # a longer wait in a reply is not believed


class Endpoint(Protocol):
    """Who and where this client is (the RemoteAPI; some of it set by ``connect``)."""

    codec: str
    client_id: str
    session: str
    timeout: float | None
    topics: Topics

    def _require_link(self) -> MqttLink: ...


class Requests:
    """The requests in flight, by id, and how to make one."""

    def __init__(self, endpoint: Endpoint, agents: Agents) -> None:
        self.endpoint = endpoint
        self.agents = agents
        # request id -> (the agent asked, its reply)
        self.waiting: dict[str, tuple[str, asyncio.Future[Any]]] = {}
        # Each agent's request budget, kept by this client (the loop's clock).
        self.pacer = RequestPacer(lambda a: budget_of(agents.states.get(a)), time.monotonic)

    async def call(self, agent: str, method: str, params: Mapping[str, Any]) -> Any:
        """One request and its reply's result, as sent (no table involved).

        Paced within the agent's request budget (client/pacing.py). A request the agent
        refused over budget all the same (its bucket was drained under this client id
        elsewhere) is sent again once, when the agent says, if that is before the
        timeout, which covers the waits too.

        Raises:
            NotFound, Unavailable: the agent cannot answer (see Agents.check_reachable).
            RateLimited: the agent's budget leaves no turn before the timeout.
            Timeout: no answer in time.
            DatamuxError: the agent's error, or a malformed reply.
        """
        me = self.endpoint
        link = me._require_link()
        self.agents.check_reachable(agent)
        timeout = me.timeout
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        for attempt in (1, 2):
            await self.pacer.wait_turn(agent, method, deadline)
            try:
                return await self._ask(link, agent, method, params, deadline)
            except RateLimited as refused:
                if attempt == 2 or refused.retry_after_s is None:
                    raise
                self.pacer.told(agent, refused.retry_after_s)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _ask(
        self,
        link: MqttLink,
        agent: str,
        method: str,
        params: Mapping[str, Any],
        deadline: float | None,
    ) -> Any:
        me = self.endpoint
        request_id = secrets.token_urlsafe(16)
        params = dict(params)
        request = {"id": request_id, "method": method, "params": params, "session": me.session}
        future = asyncio.get_running_loop().create_future()
        self.waiting[request_id] = (agent, future)
        try:
            async with asyncio.timeout_at(deadline):
                sent = await link.publish(
                    me.topics.rpc(agent, me.client_id), encode(request, me.codec), qos=1
                )
                if not sent:
                    raise Unavailable(f"not connected to the broker {link.settings.address}")
                reply = await future
        except TimeoutError:
            why = f"{method}: no answer from agent {agent!r} within {me.timeout} s"
            raise Timeout(why) from None
        finally:
            self.waiting.pop(request_id, None)
        if not isinstance(reply, Mapping):
            raise DatamuxError(f"{method}: malformed reply from agent {agent!r}")
        if reply.get("ok") is True:
            return reply.get("result")
        error = reply.get("error")
        if not isinstance(error, Mapping):
            raise DatamuxError(f"{method}: malformed error reply from agent {agent!r}")
        raise _error_of(error)

    async def rpc(self, agent: str, method: str, **params: Any) -> Any:
        """Call ``method`` as protocol.TABLE declares it: its parameters (``None``: not
        given), every page of a listing, its result read back into model objects."""
        declared = TABLE[method]
        wire = declared.build(params)
        if declared.paged:
            result = await fetch_all_pages(self.call, agent, method, wire)
        else:
            result = await self.call(agent, method, wire)
        if declared.result is None:
            return result
        try:
            return declared.result.from_wire(result)
        except (KeyError, TypeError, ValueError) as exc:
            raise DatamuxError(f"{method}: malformed reply from agent {agent!r}") from exc

    async def each_agent(self, method: str, convert: Callable[[str, Any], list[Any]]) -> list[Any]:
        """Ask every target agent; a fleet answer leaves out (and logs) agents that fail."""
        self.endpoint._require_link()
        targets = self.agents.targets()
        results = await asyncio.gather(
            *(self.rpc(agent, method) for agent in targets), return_exceptions=True
        )
        merged: list[Any] = []
        failures = []
        for agent, result in zip(targets, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, DatamuxError):
                    raise result
                failures.append((agent, result))
                log.warning("agent %s did not list: %s", agent, result)
            else:
                merged.extend(convert(agent, result))
        if failures and (self.agents.agent_id is not None or len(failures) == len(targets)):
            raise failures[0][1]
        return merged

    def on_reply(self, agent: str, payload: bytes) -> None:
        """A reply from ``agent``: it ends the wait of the request it answers, if that
        request went to that agent."""
        try:
            reply = decode(payload)
        except InvalidRequest as exc:
            log.warning("ignored an unreadable reply from agent %s: %s", agent, exc)
            return
        if not isinstance(reply, Mapping) or not isinstance(reply.get("id"), str):
            return
        waiting = self.waiting.get(reply["id"])
        if waiting is None or waiting[0] != agent:
            return  # not ours, or not from the agent we asked
        if not waiting[1].done():
            waiting[1].set_result(reply)

    def fail(self, which: Callable[[str], bool], why: str) -> None:
        """End the waits of requests to the agents ``which`` selects, with Unavailable."""
        for agent, future in self.waiting.values():
            if agent and which(agent) and not future.done():
                future.set_exception(Unavailable(why))


def _error_of(error: Mapping[str, Any]) -> DatamuxError:
    """An agent's error reply as our exception; a ``rate_limited`` one keeps when to
    retry, if the agent said so sensibly (nothing from the network is trusted)."""
    exc = error_from_code(str(error.get("code", "internal")), str(error.get("message", "")))
    retry = error.get("retry_after_s")
    if (
        isinstance(exc, RateLimited)
        and isinstance(retry, int | float)
        and not isinstance(retry, bool)
        and 0 <= retry <= MAX_RETRY_AFTER_S
    ):
        exc.retry_after_s = float(retry)
    return exc
