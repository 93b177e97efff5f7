"""The agents a RemoteAPI sees behind the broker, and how ids name them.

Without ``agent_id`` the client sees every agent, and ids are qualified with the agent's
id (``pi-lab1/demo``) so they are unique in the fleet; with ``agent_id`` it talks to that
one agent and ids are exactly as the local API's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from ..codec import decode
from ..errors import InvalidRequest, NotFound, Unavailable
from ..protocol import PROTOCOL_VERSION, V1_PREFIX, check_id

__all__ = ["Agents"]

log = logging.getLogger(__name__)


class Agents:
    """The agents seen on the broker, by id, with their last state message.

    Args:
        agent_id: the one agent the client talks to; ``None``: every agent.
    """

    def __init__(self, agent_id: str | None) -> None:
        self.agent_id = agent_id
        self.states: dict[str, Mapping[str, Any]] = {}
        self.v1: set[str] = set()  # seen under the v1 prefix: named in errors
        self.seen = asyncio.Event()  # set by each birth (discovery waits for it)

    def online(self) -> list[str]:
        """Online agents that speak our protocol version."""
        return sorted(
            a
            for a, s in self.states.items()
            if s.get("state") == "online" and s.get("protocol") == PROTOCOL_VERSION
        )

    def targets(self) -> list[str]:
        """The agents a fleet-wide listing asks."""
        return [self.agent_id] if self.agent_id is not None else self.online()

    def check_reachable(self, agent: str) -> None:
        """Refuse a request to an agent that cannot answer it.

        Raises:
            NotFound: never seen.
            Unavailable: offline, or speaks another protocol version.
        """
        state = self.states.get(agent)
        if state is None:
            raise NotFound(
                f"no agent {agent!r} behind the broker (online: {self.online()})"
                + self.v1_hint(agent)
            )
        if state.get("state") != "online":
            raise Unavailable(f"agent {agent!r} is offline")
        if state.get("protocol") != PROTOCOL_VERSION:
            raise Unavailable(
                f"agent {agent!r} speaks protocol {state.get('protocol')!r:.20}, this client "
                f"v{PROTOCOL_VERSION}: upgrade the older one (docs/protocol.md, Versioning)"
            )

    def v1_hint(self, agent: str | None = None) -> str:
        """Why an agent (or any) is not used, if it speaks protocol v1; else ""."""
        old = sorted(self.v1) if agent is None else sorted({agent} & self.v1)
        if not old:
            return ""
        return (
            f"; agents {old} speak protocol v1 under {V1_PREFIX}: upgrade them to "
            f"v{PROTOCOL_VERSION} (docs/protocol.md, Versioning)"
        )

    def route(self, qualified: str, what: str) -> tuple[str, str]:
        """(agent, local id) for an id the caller passed.

        Raises:
            InvalidRequest: not a string, or in a fleet an id that names no agent.
        """
        if not isinstance(qualified, str):
            raise InvalidRequest(f"{what} must be a string, not {type(qualified).__name__}")
        if self.agent_id is not None:
            return self.agent_id, qualified
        agent, sep, local = qualified.partition("/")
        if sep:
            return check_id(agent, f"the agent part of {what}"), local
        online = self.online()
        if len(online) == 1:
            return online[0], qualified
        raise InvalidRequest(
            f"{what} {qualified!r} names no agent; in a fleet ids look like 'agent/id' "
            f"(online agents: {online or 'none'})"
        )

    def qualify(self, agent: str, local: str) -> str:
        """The id the caller sees for ``local`` on ``agent``."""
        return local if self.agent_id is not None else f"{agent}/{local}"

    def on_state(
        self, agent: str, payload: bytes
    ) -> tuple[Mapping[str, Any] | None, Mapping[str, Any]] | None:
        """Record an agent's state message; (its previous state, the new one), or None
        for a message that is not one. An empty payload (a cleared birth) is offline."""
        if not payload:
            self.states.pop(agent, None)
            state: Mapping[str, Any] = {"state": "offline"}
        else:
            try:
                decoded = decode(payload)
            except InvalidRequest:
                log.warning("ignored an unreadable state message of agent %s", agent)
                return None
            if not isinstance(decoded, Mapping):
                return None
            state = decoded
        previous = self.states.get(agent)
        if payload:
            self.states[agent] = state
            self.seen.set()
        return previous, state

    def on_v1_state(self, agent: str, payload: bytes) -> None:
        """An agent under the v1 prefix: v1 itself, or a v2 agent that also shows there."""
        with contextlib.suppress(InvalidRequest):
            state = decode(payload) if payload else None
            if isinstance(state, Mapping) and state.get("protocol") != PROTOCOL_VERSION:
                self.v1.add(agent)
