"""Store-and-forward: QoS 1 messages wait in the on-disk spool while the broker is away.

Every message a task or the agent must not lose goes through :meth:`Outbox.send`; the
drain sends what was spooled, oldest first and rate-limited, once the broker is back
(docs/spool.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from ..mqttio import MqttLink
from .counters import Counters
from .spool import Spool

__all__ = ["CTRL_QOS", "Outbox"]

log = logging.getLogger(__name__)

CTRL_QOS = 1  # end, error and status messages are never dropped
DRAIN_BATCH = 32
RESEND_WAIT_S = 10.0  # how long the spool waits for paho's resends to be acknowledged


@dataclass(eq=False)
class Outbox:
    """Publishes through the link, or into the spool while QoS 1 cannot go out.

    Args:
        link: the agent's broker connection.
        spool: where QoS 1 messages wait.
        counters: counts the QoS 0 frames that met no connection.
        drain_per_s: at most this many spooled messages a second
            (``agent.spool_drain_per_s``).
    """

    link: MqttLink
    spool: Spool
    counters: Counters
    drain_per_s: float
    _ready: asyncio.Event = field(default_factory=asyncio.Event, init=False, repr=False)
    # After a reconnect paho resends, from its own thread, the QoS 1 messages it held when
    # the broker went away. Until the broker has acknowledged them, new and spooled
    # messages wait in the spool: one that overtook a resend would reach the client first,
    # and the client would take the late one for a duplicate and drop it.
    _resending: bool = field(default=False, init=False, repr=False)

    async def send(self, topic: str, payload: bytes, qos: int = CTRL_QOS) -> None:
        """Publish; QoS 1 goes to the spool while the broker is away (or the spool drains)."""
        if qos == 1 and (len(self.spool) or not self.link.connected or self._resending):
            self._to_spool(topic, payload)
            return
        if await self.link.publish(topic, payload, qos):
            return
        if qos == 1:
            self._to_spool(topic, payload)
        else:
            self.counters.frames_dropped += 1

    def resume(self) -> None:
        """Send what the spool holds (at start, after a reconnect), after paho's resends."""
        if self.link.unacknowledged:
            self._resending = True
            self._ready.set()
        if len(self.spool):
            self._ready.set()

    def _to_spool(self, topic: str, payload: bytes) -> None:
        self.spool.append(topic, payload, 1)
        self._ready.set()

    async def drain(self) -> None:
        """Send spooled messages, oldest first, at most ``agent.spool_drain_per_s``."""
        while True:
            try:
                await self._drain_until_error()
            except Exception:  # a disk error must not stop the drain for good
                log.exception("sending spooled messages failed; retrying in 1 s")
                await asyncio.sleep(1.0)

    async def _drain_until_error(self) -> None:
        while True:
            await self._ready.wait()
            if self._resending:
                if not await self.link.flush(timeout=RESEND_WAIT_S):
                    log.warning("paho's resends are not acknowledged yet; sending the spool")
                self._resending = False
            if not len(self.spool):
                self._ready.clear()
                continue
            if not self.link.connected:
                await asyncio.sleep(0.1)
                continue
            began = time.monotonic()
            messages = self.spool.peek(DRAIN_BATCH)
            sent = 0
            for message in messages:
                if not await self.link.publish(message.topic, message.payload, message.qos):
                    break
                sent += 1
            self.spool.commit(sent)
            if sent < len(messages):
                continue
            # Rate limit: a reconnecting fleet must not flood the broker.
            await asyncio.sleep(max(0.0, sent / self.drain_per_s - (time.monotonic() - began)))
