"""Presence: the agent's retained birth message, its state at shutdown, discovery answers.

The birth says who the agent is and what it serves (nodes, collections, drivers,
codecs, clocks); the broker keeps it, and publishes the will ("offline") should the
agent vanish. Clients that cannot rely on retained messages ask on the discover topic
(docs/protocol.md, "Discovery").
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from .. import __version__
from ..api import API
from ..clocks import CLOCKS
from ..codec import CODECS, encode
from ..mqttio import MqttLink
from ..protocol import PROTOCOL_VERSION, Topics

__all__ = ["DISCOVER_COALESCE_S", "Presence", "state_message"]

log = logging.getLogger(__name__)

DISCOVER_COALESCE_S = 0.05


def state_message(agent_id: str, boot: str, codec: str, state: str, **extra: Any) -> bytes:
    """A message for the agent's state topic (the birth, the will, the last word)."""
    return encode({"state": state, "agent": agent_id, "boot": boot, **extra}, codec)


@dataclass(eq=False, kw_only=True)
class Presence:
    """Announces the agent on its state topic.

    Args:
        agent_id: this agent.
        boot: this run of it (a new value at every start).
        codec: of the agent's own messages.
        started: when it started (unix time).
        topics: builds the topics.
        link: the broker connection.
        api: what the agent serves (its drivers, nodes and collections).
        request_budget: each client's request budget (``per_s``, ``burst``), announced
            so that clients pace themselves (docs/protocol.md, "Rate limit").
    """

    agent_id: str
    boot: str
    codec: str
    started: float
    topics: Topics
    link: MqttLink
    api: API
    request_budget: dict[str, float]
    # The node and collection ids the birth message names.
    _summary: tuple[list[str], list[str]] = field(
        default_factory=lambda: ([], []), init=False, repr=False
    )
    _discover_answer: asyncio.TimerHandle | None = field(default=None, init=False, repr=False)

    def state(self, state: str, **extra: Any) -> bytes:
        """A state message of this agent."""
        return state_message(self.agent_id, self.boot, self.codec, state, **extra)

    def birth(self) -> bytes:
        """The birth message, with the node and collection ids known so far."""
        nodes, collections = self._summary
        return self.state(
            "online",
            version=__version__,
            protocol=PROTOCOL_VERSION,
            codecs=list(CODECS),
            since=self.started,
            nodes=nodes,
            collections=collections,
            drivers=self.driver_states(),
            # Live timestamps are on this clock ("lsl" for streams proxied from LSL);
            # the `clock` method reads every clock in `clocks` (docs/remote-api.md).
            clock="unix",
            clocks=list(CLOCKS),
            request_budget=self.request_budget,
        )

    def driver_states(self) -> list[dict[str, Any]]:
        """How each driver is doing (in the birth and the health messages)."""
        return [status.to_dict() for status in self.api.driver_states()]

    def announce(self) -> None:
        """Publish the birth, retained."""
        birth = self.birth()
        self.link.publish_nowait(self.topics.agent_state(self.agent_id), birth, qos=1, retain=True)
        v1_state = self.topics.v1_state(self.agent_id)
        if v1_state:  # a v1 client then asks, and learns that it must upgrade
            self.link.publish_nowait(v1_state, birth, qos=1, retain=True)

    async def announce_nodes(self) -> None:
        """Publish the birth message again with node and collection ids, once known."""
        try:
            nodes = [n.id for n in await self.api.list_live_nodes()]
            collections = [c.id for c in await self.api.list_collections()]
        except Exception as exc:  # a broken driver must not keep the agent from serving
            log.warning("listing nodes for the birth message failed: %s", exc)
            return
        self._summary = (nodes, collections)
        self.announce()

    def on_discover(self, *, stopping: bool = False) -> None:
        """A client looks for agents: announce again, for brokers that do not deliver
        the retained birth (docs/protocol.md, "Discovery"). Requests within
        DISCOVER_COALESCE_S share one answer, so a flood of them costs one message.
        An agent that is ``stopping`` says nothing: it is about to go offline."""
        if self._discover_answer is not None or stopping:
            return

        def answer() -> None:
            self._discover_answer = None
            self.link.publish_nowait(self.topics.agent_state(self.agent_id), self.birth(), qos=1)

        loop = asyncio.get_running_loop()
        self._discover_answer = loop.call_later(DISCOVER_COALESCE_S, answer)

    def last_words(self) -> list[tuple[str, bytes, int, bool]]:
        """The retained "offline" a clean shutdown leaves, and stops answering discovery."""
        if self._discover_answer is not None:
            self._discover_answer.cancel()
        # `since`: when it went offline (the will, made at start, cannot know).
        offline = self.state("offline", since=time.time())
        return [
            (topic, offline, 1, True)
            for topic in (
                self.topics.agent_state(self.agent_id),
                self.topics.v1_state(self.agent_id),
            )
            if topic
        ]
