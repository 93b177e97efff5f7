"""Client leases: a client's tasks live while the client shows signs of life.

Signs of life are its presence message (retained at connect, re-sent every keepalive/2
while it has tasks) and its requests. Its last will, or a clean close, ends its tasks
at once; silence ends them ``LEASE_FACTOR`` x keepalive after the last sign, which stays
within 1.5 x keepalive even when the broker notices a dead connection a second late
(mosquitto checks keepalives with one-second granularity). docs/agent.md, "Leases".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..checks import is_id
from ..codec import decode
from ..errors import InvalidRequest

__all__ = ["LEASE_FACTOR", "OFFLINE_CONFIRM_S", "LeaseBook", "lease_key"]

log = logging.getLogger(__name__)

# A client silent for this many keepalives loses its tasks.
LEASE_FACTOR = 1.25
# A last will ends tasks after this long, unless our own connection dropped meanwhile:
# a broker that shuts down sends every client's will just before it drops us.
OFFLINE_CONFIRM_S = 0.5
MAX_CLIENT_KEEPALIVE_S = 3600.0


def lease_key(client: str, session: str) -> str:
    """A lease is per client connection: ``client#session`` ("#" is never in an id)."""
    return f"{client}#{session}"


@dataclass
class _Lease:
    online: bool = False
    keepalive_s: float = 0.0
    check: asyncio.TimerHandle | None = None


class LeaseBook:
    """The leases of the clients that own tasks here (and the keepalives of those online).

    Args:
        owns_tasks: whether a client owns tasks on this agent now.
        connected: whether the agent is connected to the broker now.
        release: ends a client's tasks, saying why.
        default_keepalive_s: for a client that never said its keepalive.
        will_grace_s: how long a last will waits for the client to come back (a broker
            restart behind a bridge sends every client's will; ``agent.will_grace_s``).
        max_state_bytes: presence messages larger than this are ignored
            (``agent.max_request_bytes``).
    """

    def __init__(
        self,
        owns_tasks: Callable[[str], bool],
        connected: Callable[[], bool],
        release: Callable[[str, str], None],
        default_keepalive_s: float,
        will_grace_s: float = OFFLINE_CONFIRM_S,
        max_state_bytes: int = 1 << 16,
    ) -> None:
        self.max_state_bytes = max_state_bytes
        self._owns_tasks = owns_tasks
        self.will_grace_s = will_grace_s
        self._connected = connected
        self._release = release
        self.default_keepalive_s = default_keepalive_s
        self._leases: dict[str, _Lease] = {}

    def __len__(self) -> int:
        return len(self._leases)

    def on_state_message(self, client: str, payload: bytes, retained: bool) -> None:
        """A presence message, on the topic only ``client`` may write (ACL profiles).

        Its ``session`` (one of the client's connections) picks the lease: one user
        with two notebooks loses only the tasks of the one that went away. An empty
        message (a cleared presence) concerns the connection without a session.
        """
        if not is_id(client) or len(payload) > self.max_state_bytes:
            return
        state: Mapping[str, Any] = {}
        if payload:
            try:
                decoded = decode(payload)
            except InvalidRequest:
                log.warning("unreadable state message of client %s", client)
                return
            state = decoded if isinstance(decoded, Mapping) else {}
            session = state.get("session", "")
            if (
                state.get("state") not in ("online", "offline")
                or state.get("client", client) != client
                or not (session == "" or is_id(session))
            ):
                return  # not a presence message of this client
        self.on_presence(lease_key(client, state.get("session", "")), state, retained)

    def touch(self, lease: str) -> None:
        """A request is a sign of life too: renew the lease, if it owns tasks."""
        if self._owns_tasks(lease):
            self.renew(lease)

    def on_presence(self, client: str, state: Mapping[str, Any], retained: bool) -> None:
        """A presence message: ``state`` is ``{}`` for an empty (cleared) presence."""
        online = state.get("state") == "online"
        if not online and not self._owns_tasks(client):
            self.forget(client)  # gone, and nothing of ours to end
            return
        # Known while online (for its keepalive), forgotten when it leaves.
        lease = self._leases.setdefault(client, _Lease())
        keepalive = state.get("keepalive")
        if isinstance(keepalive, int | float) and not isinstance(keepalive, bool) and keepalive > 0:
            lease.keepalive_s = min(float(keepalive), MAX_CLIENT_KEEPALIVE_S)
        lease.online = online
        if not self._owns_tasks(client):
            return
        if online or retained:
            # A retained "offline" may be stale (a broker restart): the client gets its
            # lease period to show up before its tasks end.
            self.renew(client)
        else:
            self.renew(client, self.will_grace_s)  # a last will, to be confirmed

    def renew(self, client: str, delay: float | None = None) -> None:
        """(Re)start the countdown after which a silent client loses its tasks."""
        lease = self._leases.setdefault(client, _Lease())
        if lease.check is not None:
            lease.check.cancel()
        wait = self.period_s(client) if delay is None else delay

        def expire() -> None:
            lease.check = None
            if not self._connected():
                return  # we are the one cut off; leases restart when we reconnect
            lease.online = False
            why = (
                "went offline" if delay is not None else f"showed no sign of life for {wait:.1f} s"
            )
            self._release(client, why)
            self.forget(client)

        lease.check = asyncio.get_running_loop().call_later(wait, expire)

    def period_s(self, client: str) -> float:
        lease = self._leases.get(client)
        keepalive = lease.keepalive_s if lease and lease.keepalive_s else self.default_keepalive_s
        return LEASE_FACTOR * keepalive

    def forget(self, client: str) -> None:
        lease = self._leases.pop(client, None)
        if lease is not None and lease.check is not None:
            lease.check.cancel()

    def close(self) -> None:
        for client in list(self._leases):
            self.forget(client)
