"""This client on the broker: its presence, the heartbeat that is the agents' lease, and
discovery of the agents (docs/protocol.md, "Clients", "Discovery").
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..codec import decode, encode
from ..errors import InvalidRequest, Timeout
from .agents import Agents
from .rpc import Endpoint

__all__ = ["Presence"]

# Without retained births, a fleet client waits this long for the first agent to answer
# its discovery request, then this long for the others.
DISCOVERY_WAIT_S = 1.0
DISCOVERY_SETTLE_S = 0.2


class Presence:
    """The client's retained presence and will, its heartbeat, and discovery.

    Args:
        endpoint: who and where the client is.
        agents: filled by the births that discovery brings.
        owns_tasks: whether the client has tasks now (the heartbeat is their lease).
    """

    def __init__(self, endpoint: Endpoint, agents: Agents, owns_tasks: Callable[[], bool]) -> None:
        self.endpoint = endpoint
        self.agents = agents
        self.owns_tasks = owns_tasks
        self.since = time.time()
        self.heartbeat_stop = threading.Event()
        self._sync_marker: str | None = None
        self._synced: asyncio.Event | None = None

    def absence(self) -> bytes:
        """The will, and the last word of a clean close."""
        # Not an empty message (which would clear the retained presence): some brokers
        # refuse an empty will. A clean close clears it instead.
        me = self.endpoint
        absence = {"state": "offline", "client": me.client_id, "session": me.session}
        return encode(absence, me.codec)

    def presence(self, **extra: Any) -> bytes:
        """The retained presence: online, since when, and the keepalive it is renewed by."""
        me = self.endpoint
        presence: dict[str, Any] = {
            "state": "online",
            "client": me.client_id,
            "session": me.session,
            "since": self.since,
            "keepalive": me._require_link().settings.keepalive_s,
        }
        return encode({**presence, **extra}, me.codec)

    def on_connect(self, session_present: bool) -> None:
        """Each (re)connection announces the client again."""
        me = self.endpoint
        topic = me.topics.client_state(me.client_id)
        me._require_link().publish_nowait(topic, self.presence(), qos=1, retain=True)

    def start_heartbeat(self) -> None:
        """Re-send our presence every keepalive/2 while we own tasks: the agents' lease.

        A thread, not a coroutine: analytics code that blocks the event loop for a
        while must not cost the client its tasks.
        """
        me = self.endpoint
        link, topic = me._require_link(), me.topics.client_state(me.client_id)
        payload, period = self.presence(), max(link.settings.keepalive_s / 2, 1.0)
        stop = self.heartbeat_stop = threading.Event()

        def beat() -> None:
            while not stop.wait(period):
                if self.owns_tasks():
                    link.publish_from_thread(topic, payload)

        threading.Thread(target=beat, name=f"heartbeat-{me.client_id}", daemon=True).start()

    async def discover(self) -> None:
        """Learn which agents are online: their retained births, and their answers to a
        discovery request for brokers that do not deliver retained messages to wildcard
        subscriptions (RabbitMQ) or keep none (docs/protocol.md, "Discovery")."""
        me, agents = self.endpoint, self.agents
        agents.seen.clear()
        request = encode({"client": me.client_id}, me.codec)
        me._require_link().publish_nowait(me.topics.discover(me.client_id), request, qos=1)
        await self.sync()
        wanted_one = agents.agent_id
        if wanted_one is not None:
            wanted, wait = wanted_one in agents.states, float(me.timeout or 10.0)
        else:
            wanted, wait = bool(agents.states), DISCOVERY_WAIT_S
        if wanted:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                while not (wanted_one in agents.states if wanted_one else agents.states):
                    agents.seen.clear()
                    await agents.seen.wait()
        if agents.states and wanted_one is None:
            await asyncio.sleep(DISCOVERY_SETTLE_S)  # the others answer about as fast

    async def sync(self) -> None:
        """Wait until the broker has sent every retained agent state.

        Our own presence comes back after them: the broker sends retained messages right
        after the SUBACK, in order. (Only agents may publish replies, so the echo is the
        presence, on the one topic this client may both write and read.)

        Raises:
            Timeout: the echo did not come in time.
        """
        me = self.endpoint
        self._sync_marker = secrets.token_hex(8)
        self._synced = asyncio.Event()
        try:
            payload = self.presence(sync=self._sync_marker)
            me._require_link().publish_nowait(
                me.topics.client_state(me.client_id), payload, qos=1, retain=True
            )
            async with asyncio.timeout(me.timeout):
                await self._synced.wait()
        except TimeoutError:
            raise Timeout("the broker did not echo a message in time") from None
        finally:
            self._sync_marker = None

    def on_own_presence(self, payload: bytes) -> None:
        """Our presence, back from the broker: the echo :meth:`sync` waits for."""
        if self._sync_marker is None or self._synced is None:
            return
        with contextlib.suppress(InvalidRequest):
            presence = decode(payload)
            if isinstance(presence, Mapping) and presence.get("sync") == self._sync_marker:
                self._synced.set()
