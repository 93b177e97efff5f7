"""RemoteAPI: the local API's methods, served by agents behind an MQTT broker.

::

    api = dm.RemoteAPI("mqtt", "cbor")
    await api.connect(server_host="127.0.0.1", server_port=1883)
    nodes = await api.list_live_nodes()

Without ``agent_id`` the client sees every agent behind the broker, and ids are
qualified with the agent's id (``pi-lab1/demo``) so they are unique in the fleet; with
``agent_id`` it talks to that one agent and ids are exactly as the local API's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, Literal, Self

from .. import protocol
from ..checks import check_sink
from ..codec import CODECS
from ..config import Config, load_config
from ..errors import DatamuxError, InvalidRequest, NotFound, Timeout, Unavailable
from ..framing import Framing
from ..interface import DatamuxAPI
from ..lslout import Publications, publish_collection_stream
from ..model import Frame, StreamAck, StreamError
from ..mqttio import BrokerSettings, MqttLink, Will
from ..protocol import DEFAULT_PREFIX, V1_PREFIX, Topics, check_id, is_id
from .agents import Agents
from .clocksync import EXCHANGES, ClockEstimate, Clocks, ClockTracker
from .incoming import Inbox
from .plain import with_plain_methods
from .presence import Presence
from .rpc import Requests
from .taskstream import TaskStream

__all__ = ["RemoteAPI"]

log = logging.getLogger(__name__)

STOP_WAIT_S = 5.0  # how long stop_task waits for END_OF_STREAM to reach the sink
CLOCK_REFRESH_S = 30.0


@with_plain_methods
class RemoteAPI(DatamuxAPI):
    """The local API's interface over MQTT (docs/remote-api.md).

    It subclasses the interface to be given its plain methods from protocol.TABLE
    (client/plain.py); the methods with more to do on the client are written here.

    Args:
        rpc_name: the transport; ``"mqtt"``.
        codec_name: ``"cbor"`` (default) or ``"json"``.
        agent_id: talk to this agent only (ids as in the local API); default: every agent.
        config: broker settings and timeouts come from here (``broker.*``, ``client.*``).
        timeout: seconds a request may take; default ``client.timeout_s``.
        qos: data QoS of the tasks this client starts: 1 (no loss, default) or 0.
        client_id: who this client is in topics, and who owns its tasks. On a broker
            with one of the shipped ACL profiles it must be the broker user name (with
            certificates: the certificate's CN). Default: ``client.id``, else the user
            name if one is set, else a random id.
        clock_refresh_s: how often the clock offsets of the agents measured so far are
            measured again (docs/remote-api.md, "Clocks").
        network: who serves the MQTT socket. ``"thread"`` (default): paho's thread, so
            the connection and this client's leases outlive a loop that your code blocks.
            ``"loop"``: this asyncio loop, with no thread hop per frame (about 0.2 ms less
            latency) for programs whose loop never blocks for long (docs/remote-api.md,
            "Latency").
    """

    def __init__(
        self,
        rpc_name: str = "mqtt",
        codec_name: str = "cbor",
        *,
        agent_id: str | None = None,
        config: Config | None = None,
        timeout: float | None = None,
        qos: int = 1,
        client_id: str | None = None,
        clock_refresh_s: float = CLOCK_REFRESH_S,
        network: Literal["thread", "loop"] = "thread",
    ) -> None:
        if rpc_name != "mqtt":
            raise InvalidRequest(f"unknown rpc {rpc_name!r}; the transport is 'mqtt'")
        if codec_name not in CODECS:
            raise InvalidRequest(f"unknown codec {codec_name!r}; use one of {list(CODECS)}")
        if qos not in (0, 1) or isinstance(qos, bool):
            raise InvalidRequest("qos must be 0 or 1")
        if network not in ("thread", "loop"):
            raise InvalidRequest(f"network must be 'thread' or 'loop', not {network!r}")
        self.network: Literal["thread", "loop"] = network
        self.codec = codec_name
        self.agent_id = check_id(agent_id, "agent_id") if agent_id is not None else None
        self.config = config
        self.timeout = timeout
        self.qos = qos
        self._chosen_id = check_id(client_id, "client_id") if client_id is not None else None
        self.client_id = self._chosen_id or "c" + secrets.token_hex(8)
        # This connection among the client's (one user may run several): its tasks'
        # lease follows this connection's presence only.
        self.session = secrets.token_hex(8)
        self.link: MqttLink | None = None
        self.topics = Topics()
        self._agents = Agents(self.agent_id)
        self._requests = Requests(self, self._agents)
        self._streams: dict[tuple[str, str], TaskStream] = {}
        self._presence = Presence(self, self._agents, lambda: bool(self._streams))
        self._jobs: set[asyncio.Task[Any]] = set()
        self._lsl_out = Publications()
        self.clock_refresh_s = float(clock_refresh_s)
        self._clock_set = Clocks(
            lambda agent: self._requests.rpc(agent, "clock"),
            lambda agent: self._agents.states.get(agent, {}).get("state") == "online",
            self.clock_refresh_s,
            lambda: f"clocks-{self.client_id}",
        )

    # -- connection ----------------------------------------------------------------------

    async def connect(
        self, server_host: str | None = None, server_port: int | None = None, **options: Any
    ) -> Self:
        """Connect to the broker and learn which agents are online.

        Keyword options override ``broker.*`` settings: ``protocol``, ``username``,
        ``password``, ``ca_file``, ``cert_file``, ``key_file``, ``keepalive_s``, ``prefix``.

        Raises:
            Unavailable: no broker answers.
            NotFound: ``agent_id`` was given and that agent never announced itself.
        """
        if self.link is not None:
            raise InvalidRequest("already connected; close() first")
        config = self.config if self.config is not None else load_config()
        self.config = config
        if self.timeout is None:
            self.timeout = float(config.get("client.timeout_s"))
        settings = BrokerSettings.from_config(config, host=server_host, port=server_port, **options)
        self.topics = Topics(settings.prefix)
        if self._chosen_id is None:
            configured = config.get("client.id") or settings.username
            if is_id(configured):
                # The broker's identity of us: what the ACL profiles pin topics to (%u).
                self.client_id = configured
            elif configured:
                log.warning(
                    "broker user name %r cannot be a client id (letters, digits, '_', '.', "
                    "'-'); using %s. With an ACL profile the broker will refuse it: set "
                    "client.id",
                    configured[:64],
                    self.client_id,
                )
        self.link = MqttLink(
            # Unique per connection: one user may run several clients at once.
            f"{self.client_id}-{secrets.token_hex(4)}",
            settings,
            on_message=Inbox(
                self.topics,
                self.client_id,
                self._agents,
                self._requests,
                self._presence,
                self._streams,
            ).on_message,
            on_connect=self._presence.on_connect,
            will=Will(self.topics.client_state(self.client_id), self._presence.absence()),
            network=self.network,
        )
        try:
            await self.link.connect(timeout=self.timeout)
        except BaseException:
            self.link = None
            raise
        try:
            await self.link.subscribe(self.topics.replies_to(self.client_id), qos=1)
            await self.link.subscribe(self.topics.client_state(self.client_id), qos=1)
            states = (
                self.topics.agent_state(self.agent_id)
                if self.agent_id
                else self.topics.every_agent_state
            )
            await self.link.subscribe(states, qos=1)
            if self.topics.prefix == DEFAULT_PREFIX:
                # Old agents, only to say why they are not used.
                await self.link.subscribe(f"{V1_PREFIX}/agents/+/state", qos=1)
            await self._presence.discover()
        except BaseException:
            link, self.link = self.link, None
            await link.close()
            raise
        self._presence.start_heartbeat()
        if self.agent_id and self.agent_id not in self._agents.states:
            await self.close()
            raise NotFound(
                f"agent {self.agent_id!r} has never announced itself on {settings.address} "
                f"under {self.topics.prefix}{self._agents.v1_hint(self.agent_id)}"
            )
        return self

    async def close(self) -> None:
        """Stop this client's tasks (each sink gets END_OF_STREAM) and disconnect."""
        link, streams = self.link, list(self._streams.values())
        if link is None:
            return
        if streams and link.connected:
            stops = [self._stop_quietly(s) for s in streams]
            await asyncio.gather(*stops)
        for stream in list(self._streams.values()):
            stream.end(StreamError(stream.stream_id, "unavailable", "the client closed"))
        await self._lsl_out.wait_closed()
        self._requests.fail(lambda agent: True, "the client closed")
        self.link = None
        self._clock_set.close()
        self._presence.heartbeat_stop.set()
        # "offline" for this connection's lease, then clear the retained presence.
        state = self.topics.client_state(self.client_id)
        absence = self._presence.absence()
        await link.close(final=[(state, absence, 1, False), (state, b"", 1, True)])

    async def _stop_quietly(self, stream: TaskStream) -> None:
        with contextlib.suppress(DatamuxError):
            await self._stop(stream.agent, stream.task_id)

    async def __aenter__(self) -> Self:
        if self.link is None:
            await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    aclose = close

    def agents(self) -> dict[str, Mapping[str, Any]]:
        """The agents seen on the broker, by id, with their last state message."""
        return dict(self._agents.states)

    def _require_link(self) -> MqttLink:
        if self.link is None:
            raise Unavailable("not connected: call `await api.connect(...)` first")
        return self.link

    async def _call(self, agent: str, method: str, params: Mapping[str, Any]) -> Any:
        """A raw request (no table involved), for tools and tests."""
        return await self._requests.call(agent, method, params)

    @property
    def _heartbeat_stop(self) -> threading.Event:
        return self._presence.heartbeat_stop

    @property
    def _clocks(self) -> dict[str, ClockTracker]:
        return self._clock_set.trackers

    # -- tasks: the methods with more to do than a call ------------------------------------

    async def replay_collection_stream(
        self,
        collection_id: str,
        stream_id: str,
        attrs: Mapping[str, Any],
        sink: asyncio.Queue[Any],
        *,
        speed: float | None = None,
        rate_limit: bool | None = None,
        strict_time: bool | None = None,
        use_relative_ts: bool | None = None,
        framing: Framing | str | dict[str, Any] | None = None,
        qos: int | None = None,
        start: float | None = None,
        end: float | None = None,
        loop: bool | int = False,
    ) -> StreamAck:
        """As :meth:`API.replay_collection_stream`; ``qos`` overrides the client's.

        ``transform`` is local only (a callable cannot travel): apply it to the frames
        taken from ``sink``.
        """
        agent, local = self._agents.route(collection_id, "collection_id")
        params = {
            "collection_id": local,
            "stream_id": stream_id,
            "speed": speed,
            "rate_limit": rate_limit,
            "strict_time": strict_time,
            "use_relative_ts": use_relative_ts,
            "start": start,
            "end": end,
            "loop": None if loop is False else loop,  # the agent's default
        }
        return await self._start(
            agent, "replay_collection_stream", params, attrs, sink, framing, qos
        )

    async def proxy_live_stream(
        self,
        node_id: str,
        stream_id: str,
        attrs: Mapping[str, Any],
        sink: asyncio.Queue[Any],
        *,
        framing: Framing | str | dict[str, Any] | None = None,
        qos: int | None = None,
        clock: str = "agent",
    ) -> StreamAck:
        """As :meth:`API.proxy_live_stream`; ``qos`` overrides the client's.

        ``clock="client"`` delivers timestamps on this machine's clocks: each frame is
        corrected by the agent's current clock offset (:meth:`clock_offset`).
        """
        agent, local = self._agents.route(node_id, "node_id")
        if clock not in ("agent", "client"):
            raise InvalidRequest(f"clock must be 'agent' or 'client', not {clock!r}")
        params: dict[str, Any] = {"node_id": local, "stream_id": stream_id}
        restamp = await self._clock_set.restamper(agent) if clock == "client" else None
        return await self._start(
            agent, "proxy_live_stream", params, attrs, sink, framing, qos, restamp
        )

    async def _start(
        self,
        agent: str,
        method: str,
        params: dict[str, Any],
        attrs: Mapping[str, Any] | None,
        sink: asyncio.Queue[Any],
        framing: Framing | str | dict[str, Any] | None,
        qos: int | None,
        restamp: Callable[[Frame], None] | None = None,
    ) -> StreamAck:
        check_sink(sink)
        link = self._require_link()
        task_qos = self.qos if qos is None else qos
        task_id = secrets.token_hex(8)
        params = {**params, "task_id": task_id, "qos": task_qos}
        params["attrs"] = protocol.check_attrs(attrs, "attrs")  # the agent's schema, here
        params["qos"] = protocol.check_qos(task_qos, "qos")
        if framing is not None:
            params["framing"] = protocol.check_framing(_framing_wire(framing), "framing")
        stream = TaskStream(agent, task_id, sink, self._forget)
        stream.restamp = restamp
        self._streams[(agent, task_id)] = stream
        topic = self.topics.task_any(agent, self.client_id, task_id)
        try:
            # Subscribe first: frames may flow before the reply arrives.
            await link.subscribe(topic, qos=task_qos, timeout=self.timeout or 10.0)
            result = await self._requests.rpc(agent, method, **params)
        except BaseException as exc:
            self._streams.pop((agent, task_id), None)
            stream.delivery.cancel()
            if isinstance(exc, Timeout | asyncio.CancelledError):
                # The agent may have started it after all: it must not stream to nobody.
                self._spawn(_quietly(self._requests.rpc(agent, "stop_task", task_id=task_id)))
            self._spawn(_quietly(link.unsubscribe(topic)))
            raise
        status = bool(result.get("status", True)) if isinstance(result, Mapping) else True
        return StreamAck(status=status, randseq=self._agents.qualify(agent, task_id))

    async def publish_collection_stream(
        self, collection_id: str, stream_id: str, attrs: Mapping[str, Any], **options: Any
    ) -> StreamAck:
        """As :meth:`API.publish_collection_stream`: an agent replays, the LSL outlet is
        on this machine (docs/lsl-out.md)."""
        publication = await publish_collection_stream(
            self, collection_id, stream_id, attrs, **options
        )
        self._lsl_out.add(publication)
        return StreamAck(status=True, randseq=publication.task_id)

    async def stop_task(self, randseq: str) -> StreamAck:
        """Stop a task; its sink gets END_OF_STREAM. Stopping an ended task is a no-op.

        Raises:
            NotFound: no such task on that agent.
            Forbidden: another client started it.
        """
        agent, local = self._agents.route(randseq, "randseq")
        await self._stop(agent, local)
        return StreamAck(status=True, randseq=randseq)

    async def control_task(self, randseq: str, action: str, **params: Any) -> dict[str, Any]:
        """As :meth:`API.control_task`: steer a running replay; returns its state."""
        agent, local = self._agents.route(randseq, "randseq")
        state: dict[str, Any] = await self._requests.rpc(
            agent, "control_task", task_id=local, action=action, **params
        )
        return state

    async def _stop(self, agent: str, task_id: str) -> None:
        # Look the task up first: its end message comes before the reply, and may already
        # have been handled (and the task forgotten) when the reply is.
        stream = self._streams.get((agent, task_id))
        await self._requests.rpc(agent, "stop_task", task_id=task_id)
        if stream is None:
            return
        # Wait until END_OF_STREAM is on the sink, as with the local API. Should the end
        # message have got lost, end the sink here: a stop never leaves it open. (A full
        # bounded sink gets it as soon as there is room.)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_WAIT_S):
                await stream.ended.wait()
        if not stream.ended.is_set():
            stream.end()

    # -- clocks (client/clocksync.py) ------------------------------------------------------

    async def clock_offset(
        self, agent_id: str | None = None, *, exchanges: int = EXCHANGES
    ) -> ClockEstimate:
        """Measure an agent's clock offset now (``exchanges`` more exchanges); the
        estimate from the best recent one. Refreshed every ``clock_refresh_s`` after.

        Raises:
            InvalidRequest: no agent given in a fleet of several.
        """
        agent = self._agent_for_clock(agent_id)
        return await self._clock_set.tracker(agent).measure(exchanges)

    def clock_estimates(self) -> dict[str, ClockEstimate]:
        """The latest estimate of every agent measured so far, by agent id."""
        return self._clock_set.estimates()

    def _agent_for_clock(self, agent_id: str | None) -> str:
        if agent_id is not None:
            return check_id(agent_id, "agent_id")
        if self.agent_id is not None:
            return self.agent_id
        online = self._agents.online()
        if len(online) == 1:
            return online[0]
        raise InvalidRequest(f"which agent? online agents: {online or 'none'}")

    def _spawn(self, coro: Any) -> None:
        job = asyncio.get_running_loop().create_task(coro)
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)

    def _forget(self, stream: TaskStream) -> None:
        self._streams.pop((stream.agent, stream.task_id), None)
        link = self.link
        if link is not None:
            topic = self.topics.task_any(stream.agent, self.client_id, stream.task_id)
            self._spawn(_quietly(link.unsubscribe(topic)))


def _framing_wire(framing: Framing | str | Mapping[str, Any]) -> str | dict[str, Any]:
    if isinstance(framing, Framing):
        return {"max_samples": framing.max_samples, "max_latency_ms": framing.max_latency_ms}
    if isinstance(framing, str):
        return framing
    return dict(framing)


async def _quietly(awaitable: Awaitable[Any]) -> None:
    with contextlib.suppress(DatamuxError, asyncio.CancelledError):
        await awaitable
