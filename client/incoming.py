"""Where each message from the broker goes: agent states, replies, this client's own
presence, task frames and control messages.

Who published a message is in its topic (the ACL profiles let only agent X write under
``agents/X/``), so each kind of message is taken only from where it belongs. A task's
stream follows its agent: offline is a ``disconnected`` status and a wait, back is
``reconnected``, restarted (a new boot) or gone too long ends the task.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..codec import decode, decode_frame
from ..errors import InvalidRequest
from ..model import StreamError, StreamStatus
from ..mqttio import Incoming
from ..protocol import V1_PREFIX, Topics
from .agents import Agents
from .presence import Presence
from .rpc import Requests
from .taskstream import TaskStream

__all__ = ["AGENT_RETURN_S", "Inbox"]

log = logging.getLogger(__name__)

# How long a task's consumer waits for its agent to come back before the task ends.
AGENT_RETURN_S = 30.0


@dataclass(eq=False)  # routes by identity: its on_message is a callback
class Inbox:
    """Routes the client's incoming messages to the part that handles them.

    Made by ``connect``, when the client's topics and id are settled.

    Args:
        streams: the client's running tasks by (agent, task id); shared, not copied.
    """

    topics: Topics
    client_id: str
    agents: Agents
    requests: Requests
    presence: Presence
    streams: dict[tuple[str, str], TaskStream]

    def on_message(self, message: Incoming) -> None:
        """Route one message by its topic."""
        me = self.client_id
        root, agent, kind, rest = self.topics.levels(message.topic, 4)
        if root == "agents" and kind == "state" and rest == "":
            self._on_agent_state(agent, message.payload)
        elif root == "agents" and kind == "reply" and rest == me:
            self.requests.on_reply(agent, message.payload)
        elif root == "clients" and agent == me and kind == "state" and rest == "":
            self.presence.on_own_presence(message.payload)
        elif root == "":
            root, agent, kind, owner, task, channel = self.topics.levels(message.topic, 6)
            if root == "agents" and kind == "tasks" and owner == me:
                self._on_task_message(agent, task, channel, message)
            elif message.topic.startswith(f"{V1_PREFIX}/agents/"):
                self.agents.on_v1_state(message.topic.split("/")[-2], message.payload)

    def _on_task_message(self, agent: str, task_id: str, kind: str, message: Incoming) -> None:
        stream = self.streams.get((agent, task_id))
        if stream is None:
            return
        try:
            if kind == "data":
                wire = decode_frame(message.payload)
                if wire.task_id != task_id:
                    log.warning("task %s: ignored a frame of task %r", task_id, wire.task_id[:64])
                    return
                stream.on_frame(wire.frame)
            elif kind == "ctrl":
                ctrl = decode(message.payload)
                if isinstance(ctrl, Mapping):
                    stream.on_ctrl(ctrl)
        except InvalidRequest as exc:
            log.warning("task %s: ignored an unreadable %s message: %s", task_id, kind, exc)

    def _on_agent_state(self, agent: str, payload: bytes) -> None:
        change = self.agents.on_state(agent, payload)
        if change is None:
            return
        previous, state = change
        if state.get("state") != "online":
            self.requests.fail(lambda target: target == agent, f"agent {agent!r} went offline")
        for stream in [s for s in self.streams.values() if s.agent == agent]:
            _follow_agent(stream, previous, state)


def _follow_agent(
    stream: TaskStream, previous: Mapping[str, Any] | None, state: Mapping[str, Any]
) -> None:
    online = state.get("state") == "online"
    if previous is not None and online and previous.get("boot") != state.get("boot"):
        reason = f"agent {stream.agent} restarted; its tasks ended"
        stream.end(StreamError(stream.stream_id, "unavailable", reason))
    elif not online and stream.agent_lost is None:
        reason = f"agent {stream.agent} went offline"
        stream.put(StreamStatus(stream.stream_id, "disconnected", reason))

        def give_up() -> None:
            why = f"agent {stream.agent} did not come back within {AGENT_RETURN_S:.0f} s"
            stream.end(StreamError(stream.stream_id, "unavailable", why))

        stream.agent_lost = asyncio.get_running_loop().call_later(AGENT_RETURN_S, give_up)
    elif online and stream.agent_lost is not None:
        stream.agent_lost.cancel()
        stream.agent_lost = None
        stream.put(StreamStatus(stream.stream_id, "reconnected", f"agent {stream.agent}"))
